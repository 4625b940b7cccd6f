-- Ids are 16-byte UUIDs (v7, time-ordered). Times are milliseconds since the Unix epoch.

CREATE TABLE users (
    id            BLOB PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    last_seen_at  INTEGER
);

CREATE TABLE devices (
    id           BLOB PRIMARY KEY,
    user_id      BLOB NOT NULL REFERENCES users(id),
    name         TEXT NOT NULL,
    -- SHA-256 of the session token; the token itself is never stored.
    token_hash   BLOB NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    last_seen_at INTEGER
);
CREATE INDEX devices_by_user ON devices(user_id);

CREATE TABLE threads (
    id         BLOB PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('direct', 'group')),
    -- Direct threads: the two user ids, smaller first. Unique: one thread per pair, ever.
    pair_key   BLOB UNIQUE,
    title      TEXT,
    last_seq   INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE members (
    thread_id          BLOB NOT NULL REFERENCES threads(id),
    user_id            BLOB NOT NULL REFERENCES users(id),
    role               TEXT NOT NULL DEFAULT 'member',
    -- The member sees messages with seq > joined_seq.
    joined_seq         INTEGER NOT NULL DEFAULT 0,
    last_read_seq      INTEGER NOT NULL DEFAULT 0,
    last_delivered_seq INTEGER NOT NULL DEFAULT 0,
    muted              INTEGER NOT NULL DEFAULT 0,
    joined_at          INTEGER NOT NULL,
    PRIMARY KEY (thread_id, user_id)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON members(user_id, thread_id);

-- Append-only, in insertion (rowid) order; found by (thread_id, seq) or by the dedupe key.
CREATE TABLE messages (
    id               BLOB NOT NULL,
    thread_id        BLOB NOT NULL,
    seq              INTEGER NOT NULL,
    sender_id        BLOB NOT NULL,
    sender_device_id BLOB NOT NULL,
    client_msg_id    TEXT NOT NULL,
    kind             TEXT NOT NULL,
    body             TEXT NOT NULL,
    created_at       INTEGER NOT NULL
);
CREATE UNIQUE INDEX messages_by_thread_seq ON messages(thread_id, seq);
CREATE UNIQUE INDEX messages_by_dedupe_key ON messages(sender_id, client_msg_id);

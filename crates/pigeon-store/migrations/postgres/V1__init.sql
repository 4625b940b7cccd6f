-- The PostgreSQL schema: the same data as the SQLite one, shaped for several server nodes
-- sharing one database. Ids are UUIDs (v7, time-ordered). Times are milliseconds since the
-- Unix epoch. Rows that belong to a thread have primary keys starting with thread_id, and
-- rows that belong to a user start with that user's id, so each table can later be
-- distributed by that column (Citus, CockroachDB, YugabyteDB).

CREATE TABLE users (
    id             uuid PRIMARY KEY,
    -- Byte order, as SQLite compares: prefix search and listings sort by it.
    username       text COLLATE "C" NOT NULL UNIQUE,
    password_hash  text NOT NULL,
    created_at     bigint NOT NULL,
    last_seen_at   bigint,
    hide_last_seen boolean NOT NULL DEFAULT false,
    -- Seq of the user's newest event; its row lock serialises writers of the user's log.
    last_event_seq bigint NOT NULL DEFAULT 0
);

CREATE TABLE devices (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users(id),
    name         text NOT NULL,
    -- SHA-256 of the session token; the token itself is never stored.
    token_hash   bytea NOT NULL UNIQUE,
    created_at   bigint NOT NULL,
    last_seen_at bigint
);
CREATE INDEX devices_by_user ON devices(user_id);

CREATE TABLE threads (
    id                uuid PRIMARY KEY,
    kind              text NOT NULL CHECK (kind IN ('direct', 'group')),
    title             text,
    topic             text,
    avatar            text,
    -- Whether members joining from now on see earlier messages (their joined_seq is 0).
    share_history     boolean NOT NULL DEFAULT false,
    -- SHA-256 of the sorted member ids of a group: "do these people already have a chat?"
    participants_hash bytea,
    member_count      integer NOT NULL DEFAULT 0,
    -- Bumped by every membership change, under this row's lock: a node's cached member
    -- list is good exactly while this number is unchanged.
    members_version   bigint NOT NULL DEFAULT 0,
    closed            boolean NOT NULL DEFAULT false,
    -- Seq of the newest message. Senders take this row's lock to assign the next one.
    last_seq          bigint NOT NULL DEFAULT 0,
    created_at        bigint NOT NULL,
    updated_at        bigint NOT NULL
);
CREATE INDEX threads_by_participants ON threads(participants_hash) WHERE participants_hash IS NOT NULL;

-- One direct thread per pair of users, ever; the smaller id first.
CREATE TABLE direct_threads (
    user_low  uuid NOT NULL,
    user_high uuid NOT NULL,
    thread_id uuid NOT NULL REFERENCES threads(id),
    PRIMARY KEY (user_low, user_high)
);

CREATE TABLE members (
    thread_id          uuid NOT NULL REFERENCES threads(id),
    user_id            uuid NOT NULL REFERENCES users(id),
    role               text NOT NULL DEFAULT 'member',
    -- The member sees messages with seq > joined_seq.
    joined_seq         bigint NOT NULL DEFAULT 0,
    last_read_seq      bigint NOT NULL DEFAULT 0,
    last_delivered_seq bigint NOT NULL DEFAULT 0,
    muted              boolean NOT NULL DEFAULT false,
    pinned             boolean NOT NULL DEFAULT false,
    archived           boolean NOT NULL DEFAULT false,
    nickname           text,
    joined_at          bigint NOT NULL,
    PRIMARY KEY (thread_id, user_id)
);
CREATE INDEX members_by_user ON members(user_id, thread_id);

-- Append-only.
CREATE TABLE messages (
    thread_id        uuid NOT NULL,
    seq              bigint NOT NULL,
    id               uuid NOT NULL,
    sender_id        uuid NOT NULL,
    sender_device_id uuid NOT NULL,
    client_msg_id    text NOT NULL,
    kind             text NOT NULL,
    body             text NOT NULL,
    created_at       bigint NOT NULL,
    PRIMARY KEY (thread_id, seq)
);

-- The dedupe key of every message: (sender, client_msg_id) → where it was first stored.
-- Keyed by sender rather than thread, so it stays unique wherever threads are placed; a
-- resend naming another thread still finds the original, as in SQLite.
CREATE TABLE message_keys (
    sender_id     uuid NOT NULL,
    client_msg_id text NOT NULL,
    thread_id     uuid NOT NULL,
    seq           bigint NOT NULL,
    PRIMARY KEY (sender_id, client_msg_id)
);

-- One row per (owner, peer) with any relationship: a friend state, a block, an alias.
CREATE TABLE contacts (
    owner_id   uuid NOT NULL REFERENCES users(id),
    peer_id    uuid NOT NULL REFERENCES users(id),
    state      text CHECK (state IN ('requested', 'incoming', 'friend')),
    blocked    boolean NOT NULL DEFAULT false,
    alias      text,
    updated_at bigint NOT NULL,
    PRIMARY KEY (owner_id, peer_id)
);
CREATE INDEX contacts_by_peer ON contacts(peer_id, owner_id);

-- Per-user log of changes to the user's own state, for multi-device sync. Bounded: old
-- entries are pruned, and a client behind the oldest one refetches lists instead.
CREATE TABLE user_events (
    user_id    uuid NOT NULL,
    seq        bigint NOT NULL,
    body       text NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (user_id, seq)
);

-- Groups, per-member settings, contacts and the per-user event log.

ALTER TABLE users ADD COLUMN hide_last_seen INTEGER NOT NULL DEFAULT 0;

ALTER TABLE threads ADD COLUMN topic TEXT;
ALTER TABLE threads ADD COLUMN avatar TEXT;
-- Whether members joining from now on see earlier messages (their joined_seq is 0).
ALTER TABLE threads ADD COLUMN share_history INTEGER NOT NULL DEFAULT 0;
-- SHA-256 of the sorted member ids of a group: "do these people already have a chat?"
ALTER TABLE threads ADD COLUMN participants_hash BLOB;
ALTER TABLE threads ADD COLUMN member_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE threads ADD COLUMN closed INTEGER NOT NULL DEFAULT 0;
CREATE INDEX threads_by_participants ON threads(participants_hash) WHERE participants_hash IS NOT NULL;
UPDATE threads SET member_count = (SELECT count(*) FROM members WHERE members.thread_id = threads.id);

ALTER TABLE members ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN archived INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN nickname TEXT;

-- One row per (owner, peer) with any relationship: a friend state, a block, an alias.
CREATE TABLE contacts (
    owner_id   BLOB NOT NULL REFERENCES users(id),
    peer_id    BLOB NOT NULL REFERENCES users(id),
    state      TEXT CHECK (state IN ('requested', 'incoming', 'friend')),
    blocked    INTEGER NOT NULL DEFAULT 0,
    alias      TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (owner_id, peer_id)
) WITHOUT ROWID;
CREATE INDEX contacts_by_peer ON contacts(peer_id, owner_id);

-- Per-user log of changes to the user's own state, for multi-device sync. Bounded: old
-- entries are pruned, and a client behind the oldest one refetches lists instead.
CREATE TABLE user_events (
    user_id    BLOB NOT NULL,
    seq        INTEGER NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;

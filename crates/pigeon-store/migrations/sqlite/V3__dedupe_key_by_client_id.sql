-- The dedupe key, client id first. Clients make time-ordered ids (UUIDv7), so new keys
-- land at the end of this index, a page or two per commit, where the old order
-- (sender_id first) put every sender's next key on a page of its own.
DROP INDEX messages_by_dedupe_key;
CREATE UNIQUE INDEX messages_by_client_id ON messages(client_msg_id, sender_id);

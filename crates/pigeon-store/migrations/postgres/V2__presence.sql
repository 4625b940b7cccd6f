-- Cluster presence: a row per user and node with connections open, kept alive by the
-- node's refresh and counted only until expires_at (ms), so a node that dies takes its
-- users offline within one heartbeat timeout.
CREATE TABLE presence (
    user_id    uuid   NOT NULL,
    node_id    bigint NOT NULL,
    expires_at bigint NOT NULL,
    PRIMARY KEY (user_id, node_id)
);
CREATE INDEX presence_node ON presence (node_id);
-- Every refresh forgets expired rows of dead nodes.
CREATE INDEX presence_expiry ON presence (expires_at);

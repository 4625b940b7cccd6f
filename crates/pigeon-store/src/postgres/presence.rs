//! Cluster presence: which users have a connection on some live node.
//!
//! Times come from the database's clock (`NOW_MS`), so a node whose clock runs ahead
//! cannot expire the others' records.

use pigeon_proto::UserId;
use uuid::Uuid;

use super::Shared;
use super::error::PgResult;
use super::sql::{execute, query};

/// Milliseconds since the epoch, by the database's clock.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

pub(super) async fn set(
    shared: &Shared,
    node: i64,
    user: UserId,
    online: bool,
    ttl_ms: i64,
) -> PgResult<()> {
    let client = shared.client().await?;
    if online {
        execute(
            &client,
            &format!(
                "INSERT INTO presence (user_id, node_id, expires_at) VALUES ($1, $2, {NOW_MS} + $3)
                 ON CONFLICT (user_id, node_id) DO UPDATE SET expires_at = EXCLUDED.expires_at"
            ),
            &[user.as_uuid(), &node, &ttl_ms],
        )
        .await?;
    } else {
        execute(
            &client,
            "DELETE FROM presence WHERE user_id = $1 AND node_id = $2",
            &[user.as_uuid(), &node],
        )
        .await?;
    }
    Ok(())
}

/// Extends (or writes) the records of the node's users and forgets expired ones. A user
/// who left without their record being deleted (the database was away) is not in
/// `users`, so their record simply expires.
pub(super) async fn refresh(
    shared: &Shared,
    node: i64,
    users: &[UserId],
    ttl_ms: i64,
) -> PgResult<()> {
    let ids: Vec<Uuid> = users.iter().map(|user| *user.as_uuid()).collect();
    let client = shared.client().await?;
    execute(
        &client,
        &format!(
            "INSERT INTO presence (user_id, node_id, expires_at)
             SELECT user_id, $2, {NOW_MS} + $3 FROM unnest($1::uuid[]) AS user_id
             ON CONFLICT (user_id, node_id) DO UPDATE SET expires_at = EXCLUDED.expires_at"
        ),
        &[&ids, &node, &ttl_ms],
    )
    .await?;
    execute(
        &client,
        &format!("DELETE FROM presence WHERE expires_at < {NOW_MS}"),
        &[],
    )
    .await?;
    Ok(())
}

pub(super) async fn online(shared: &Shared, users: &[UserId]) -> PgResult<Vec<UserId>> {
    let ids: Vec<Uuid> = users.iter().map(|user| *user.as_uuid()).collect();
    let client = shared.client().await?;
    let rows = query(
        &client,
        &format!(
            "SELECT DISTINCT user_id FROM presence
             WHERE user_id = ANY($1::uuid[]) AND expires_at > {NOW_MS}"
        ),
        &[&ids],
    )
    .await?;
    Ok(rows
        .iter()
        .map(|row| UserId::from_uuid(row.get(0)))
        .collect())
}

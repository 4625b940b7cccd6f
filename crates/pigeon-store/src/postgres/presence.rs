//! Cluster presence: which users have a connection on some live node.

use pigeon_proto::UserId;
use uuid::Uuid;

use super::Shared;
use super::error::PgResult;
use super::sql::{execute, query};

pub(super) async fn set(
    shared: &Shared,
    node: i64,
    user: UserId,
    online: bool,
    expires_at: i64,
) -> PgResult<()> {
    let client = shared.client().await?;
    if online {
        execute(
            &client,
            "INSERT INTO presence (user_id, node_id, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (user_id, node_id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
            &[user.as_uuid(), &node, &expires_at],
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

pub(super) async fn refresh(
    shared: &Shared,
    node: i64,
    users: &[UserId],
    expires_at: i64,
    now: i64,
) -> PgResult<()> {
    let ids: Vec<Uuid> = users.iter().map(|user| *user.as_uuid()).collect();
    let client = shared.client().await?;
    // Rows of this node's users, including any a failed join missed.
    execute(
        &client,
        "INSERT INTO presence (user_id, node_id, expires_at)
         SELECT user_id, $2, $3 FROM unnest($1::uuid[]) AS user_id
         ON CONFLICT (user_id, node_id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
        &[&ids, &node, &expires_at],
    )
    .await?;
    // Users who left while a leave could not be written.
    execute(
        &client,
        "DELETE FROM presence WHERE node_id = $1 AND NOT (user_id = ANY($2::uuid[]))",
        &[&node, &ids],
    )
    .await?;
    // Rows of nodes that died: no longer counted, now gone.
    execute(
        &client,
        "DELETE FROM presence WHERE expires_at < $1",
        &[&now],
    )
    .await?;
    Ok(())
}

pub(super) async fn online(shared: &Shared, users: &[UserId], now: i64) -> PgResult<Vec<UserId>> {
    let ids: Vec<Uuid> = users.iter().map(|user| *user.as_uuid()).collect();
    let client = shared.client().await?;
    let rows = query(
        &client,
        "SELECT DISTINCT user_id FROM presence WHERE user_id = ANY($1::uuid[]) AND expires_at > $2",
        &[&ids, &now],
    )
    .await?;
    Ok(rows
        .iter()
        .map(|row| UserId::from_uuid(row.get(0)))
        .collect())
}

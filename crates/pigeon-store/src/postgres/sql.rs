//! Running cached statements on a pooled connection or a transaction, and decoding rows.
//!
//! Each helper prepares its statement through the connection's statement cache (one round
//! trip the first time, none after). Several helpers joined with `try_join` on one
//! connection are pipelined, but their order is **not** guaranteed: a statement already
//! cached is sent at once, ahead of an earlier one still being prepared. Statements that
//! must run in order (a lock before the reads it protects, a row before the rows that
//! reference it) are therefore awaited one after the other; only independent ones are
//! joined. (A suite test once failed on exactly that: a foreign key row inserted before
//! its parent.)

use deadpool_postgres::GenericClient;
use pigeon_proto::{DeviceId, Message, MessageId, ThreadId, UserId};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::error::PgResult;
use crate::common::{decode_body, message_kind, to_u64};
use crate::{Device, User};

/// Statement parameters.
pub(super) type Params<'a> = [&'a (dyn ToSql + Sync)];

pub(super) async fn query<C: GenericClient>(
    client: &C,
    sql: &str,
    params: &Params<'_>,
) -> PgResult<Vec<Row>> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query(&statement, params).await?)
}

pub(super) async fn query_opt<C: GenericClient>(
    client: &C,
    sql: &str,
    params: &Params<'_>,
) -> PgResult<Option<Row>> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query_opt(&statement, params).await?)
}

pub(super) async fn query_one<C: GenericClient>(
    client: &C,
    sql: &str,
    params: &Params<'_>,
) -> PgResult<Row> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query_one(&statement, params).await?)
}

/// Runs a statement and returns the number of rows it changed.
pub(super) async fn execute<C: GenericClient>(
    client: &C,
    sql: &str,
    params: &Params<'_>,
) -> PgResult<u64> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.execute(&statement, params).await?)
}

/// Reads the 9 message columns starting at `at`, in the order
/// id, thread_id, seq, sender_id, sender_device_id, client_msg_id, kind, body, created_at.
pub(super) fn message_at(row: &Row, at: usize) -> PgResult<Message> {
    let kind = message_kind(row.try_get(at + 6)?);
    let (body, system) = decode_body(kind, row.try_get(at + 7)?);
    Ok(Message {
        message_id: MessageId::from_uuid(row.try_get(at)?),
        thread_id: ThreadId::from_uuid(row.try_get(at + 1)?),
        seq: to_u64(row.try_get(at + 2)?),
        sender_id: UserId::from_uuid(row.try_get(at + 3)?),
        sender_device_id: DeviceId::from_uuid(row.try_get(at + 4)?),
        client_msg_id: row.try_get(at + 5)?,
        kind,
        body,
        system,
        created_at: row.try_get(at + 8)?,
    })
}

/// Reads id, username, password_hash, created_at, last_seen_at, hide_last_seen from `at` on.
pub(super) fn user_at(row: &Row, at: usize) -> PgResult<User> {
    Ok(User {
        id: UserId::from_uuid(row.try_get(at)?),
        username: row.try_get(at + 1)?,
        password_hash: row.try_get(at + 2)?,
        created_at: row.try_get(at + 3)?,
        last_seen_at: row.try_get(at + 4)?,
        hide_last_seen: row.try_get(at + 5)?,
    })
}

/// Reads id, user_id, name, created_at, last_seen_at from `at` on.
pub(super) fn device_at(row: &Row, at: usize) -> PgResult<Device> {
    Ok(Device {
        id: DeviceId::from_uuid(row.try_get(at)?),
        user_id: UserId::from_uuid(row.try_get(at + 1)?),
        name: row.try_get(at + 2)?,
        created_at: row.try_get(at + 3)?,
        last_seen_at: row.try_get(at + 4)?,
    })
}

/// Reads a column of user ids (a `uuid[]`).
pub(super) fn user_ids(row: &Row, at: usize) -> PgResult<Vec<UserId>> {
    let ids: Vec<Uuid> = row.try_get(at)?;
    Ok(ids.into_iter().map(UserId::from_uuid).collect())
}

/// Locks these users' rows until COMMIT, in id order, so writers that lock overlapping
/// sets wait for each other instead of deadlocking. Awaited before the statements it
/// protects (see the module comment on ordering).
pub(super) async fn lock_users<C: GenericClient>(client: &C, ids: &[Uuid]) -> PgResult<()> {
    query(
        client,
        "SELECT 1 FROM users WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        &[&ids],
    )
    .await?;
    Ok(())
}

/// The UUIDs of some user ids, as an array parameter.
pub(super) fn uuids(users: &[UserId]) -> Vec<Uuid> {
    users.iter().map(|user| *user.as_uuid()).collect()
}

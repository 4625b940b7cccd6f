//! Users and their devices (session tokens).

use pigeon_proto::{DeviceId, UserId};

use super::Shared;
use super::error::PgResult;
use super::sql::{device_at, execute, query, query_opt, user_at};
use crate::common::now_ms;
use crate::{Device, User};

pub(super) async fn create_user(
    shared: &Shared,
    username: &str,
    password_hash: &str,
) -> PgResult<User> {
    let user = User {
        id: UserId::new(),
        username: username.to_owned(),
        password_hash: password_hash.to_owned(),
        created_at: now_ms(),
        last_seen_at: None,
        hide_last_seen: false,
    };
    let client = shared.client().await?;
    execute(
        &client,
        "INSERT INTO users (id, username, password_hash, created_at) VALUES ($1, $2, $3, $4)",
        &[
            user.id.as_uuid(),
            &user.username,
            &user.password_hash,
            &user.created_at,
        ],
    )
    .await?;
    Ok(user)
}

pub(super) async fn get_user(shared: &Shared, id: UserId) -> PgResult<Option<User>> {
    let client = shared.client().await?;
    query_opt(
        &client,
        "SELECT id, username, password_hash, created_at, last_seen_at, hide_last_seen
         FROM users WHERE id = $1",
        &[id.as_uuid()],
    )
    .await?
    .map(|row| user_at(&row, 0))
    .transpose()
}

pub(super) async fn get_user_by_username(
    shared: &Shared,
    username: &str,
) -> PgResult<Option<User>> {
    let client = shared.client().await?;
    query_opt(
        &client,
        "SELECT id, username, password_hash, created_at, last_seen_at, hide_last_seen
         FROM users WHERE username = $1",
        &[&username],
    )
    .await?
    .map(|row| user_at(&row, 0))
    .transpose()
}

pub(super) async fn set_last_seen(shared: &Shared, user_id: UserId, at: i64) -> PgResult<()> {
    let client = shared.client().await?;
    execute(
        &client,
        "UPDATE users SET last_seen_at = $2 WHERE id = $1",
        &[user_id.as_uuid(), &at],
    )
    .await?;
    Ok(())
}

pub(super) async fn create_device(
    shared: &Shared,
    user_id: UserId,
    name: &str,
    token_hash: [u8; 32],
) -> PgResult<Device> {
    let device = Device {
        id: DeviceId::new(),
        user_id,
        name: name.to_owned(),
        created_at: now_ms(),
        last_seen_at: None,
    };
    let client = shared.client().await?;
    let token_hash: &[u8] = &token_hash;
    execute(
        &client,
        "INSERT INTO devices (id, user_id, name, token_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        &[
            device.id.as_uuid(),
            user_id.as_uuid(),
            &device.name,
            &token_hash,
            &device.created_at,
        ],
    )
    .await?;
    Ok(device)
}

pub(super) async fn get_device_by_token(
    shared: &Shared,
    token_hash: [u8; 32],
) -> PgResult<Option<(Device, User)>> {
    let client = shared.client().await?;
    let token_hash: &[u8] = &token_hash;
    let Some(row) = query_opt(
        &client,
        "SELECT d.id, d.user_id, d.name, d.created_at, d.last_seen_at,
                u.id, u.username, u.password_hash, u.created_at, u.last_seen_at, u.hide_last_seen
         FROM devices d JOIN users u ON u.id = d.user_id
         WHERE d.token_hash = $1",
        &[&token_hash],
    )
    .await?
    else {
        return Ok(None);
    };
    Ok(Some((device_at(&row, 0)?, user_at(&row, 5)?)))
}

pub(super) async fn list_devices(shared: &Shared, user_id: UserId) -> PgResult<Vec<Device>> {
    let client = shared.client().await?;
    query(
        &client,
        "SELECT id, user_id, name, created_at, last_seen_at FROM devices
         WHERE user_id = $1 ORDER BY created_at, id",
        &[user_id.as_uuid()],
    )
    .await?
    .iter()
    .map(|row| device_at(row, 0))
    .collect()
}

pub(super) async fn delete_device(
    shared: &Shared,
    user_id: UserId,
    device_id: DeviceId,
) -> PgResult<bool> {
    let client = shared.client().await?;
    let deleted = execute(
        &client,
        "DELETE FROM devices WHERE id = $1 AND user_id = $2",
        &[device_id.as_uuid(), user_id.as_uuid()],
    )
    .await?;
    Ok(deleted > 0)
}

pub(super) async fn touch_device(shared: &Shared, device_id: DeviceId, at: i64) -> PgResult<()> {
    let client = shared.client().await?;
    execute(
        &client,
        "UPDATE devices SET last_seen_at = $2 WHERE id = $1",
        &[device_id.as_uuid(), &at],
    )
    .await?;
    Ok(())
}

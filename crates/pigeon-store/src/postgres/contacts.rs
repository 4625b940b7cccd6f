//! Contacts (friend requests, blocks, aliases), user search and privacy.
//!
//! A contact action locks both users' rows in id order first: the two sides of a
//! relationship change together, one action at a time, whichever node runs it.

use deadpool_postgres::Transaction;
use pigeon_proto::{
    ContactAction, ContactInfo, ContactState, UserEvent, UserEventRecord, UserId, UserRef,
};
use uuid::Uuid;

use super::Shared;
use super::error::PgResult;
use super::sql::{execute, query, query_one, query_opt};
use super::user_events::append_user_events;
use crate::common::{ContactSide as Side, apply_contact_action, now_ms};
use crate::{ContactChanged, StoreError};

const READ_SIDE: &str =
    "SELECT state, blocked, alias FROM contacts WHERE owner_id = $1 AND peer_id = $2";

fn side_from(row: Option<tokio_postgres::Row>) -> PgResult<Side> {
    let Some(row) = row else {
        return Ok(Side::default());
    };
    Ok(Side {
        state: row
            .try_get::<_, Option<&str>>(0)?
            .and_then(ContactState::parse),
        blocked: row.try_get(1)?,
        alias: row.try_get(2)?,
    })
}

async fn write_side(
    tx: &Transaction<'_>,
    owner: UserId,
    peer: UserId,
    side: &Side,
) -> PgResult<()> {
    if side == &Side::default() {
        execute(
            tx,
            "DELETE FROM contacts WHERE owner_id = $1 AND peer_id = $2",
            &[owner.as_uuid(), peer.as_uuid()],
        )
        .await?;
    } else {
        execute(
            tx,
            "INSERT INTO contacts (owner_id, peer_id, state, blocked, alias, updated_at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (owner_id, peer_id) DO UPDATE SET
                state = excluded.state, blocked = excluded.blocked, alias = excluded.alias, updated_at = excluded.updated_at",
            &[
                owner.as_uuid(),
                peer.as_uuid(),
                &side.state.map(ContactState::as_str),
                &side.blocked,
                &side.alias,
                &now_ms(),
            ],
        )
        .await?;
    }
    Ok(())
}

fn info(peer: UserId, username: String, side: &Side) -> ContactInfo {
    ContactInfo {
        user_id: peer,
        username,
        state: side.state,
        blocked: side.blocked,
        alias: side.alias.clone(),
        online: None,
        last_seen: None,
    }
}

pub(super) async fn contact_action(
    tx: &Transaction<'_>,
    owner: UserId,
    peer: UserId,
    action: ContactAction,
) -> PgResult<ContactChanged> {
    if owner == peer {
        return Err(StoreError::Forbidden("that is you").into());
    }
    let pair = [*owner.as_uuid(), *peer.as_uuid()];
    // One after the other: a statement cached on this connection would otherwise be
    // sent before an earlier one still being prepared, and run first.
    let users = query(
        tx,
        "SELECT id, username FROM users WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        &[&&pair[..]],
    )
    .await?;
    let (mine, theirs) = futures::future::try_join(
        query_opt(tx, READ_SIDE, &[owner.as_uuid(), peer.as_uuid()]),
        query_opt(tx, READ_SIDE, &[peer.as_uuid(), owner.as_uuid()]),
    )
    .await?;
    let username_of = |user: UserId| -> PgResult<String> {
        for row in &users {
            if row.try_get::<_, Uuid>(0)? == *user.as_uuid() {
                return Ok(row.try_get(1)?);
            }
        }
        Err(StoreError::UnknownUser.into())
    };
    let peer_name = username_of(peer)?;
    let owner_name = username_of(owner)?;
    let mut mine = side_from(mine)?;
    let mut theirs = side_from(theirs)?;
    let (old_mine, old_theirs) = (mine.clone(), theirs.clone());
    // Whether the peer may learn of this change (never of a block).
    let tell_peer = apply_contact_action(action, &mut mine, &mut theirs)?;
    futures::future::try_join(
        write_side(tx, owner, peer, &mine),
        write_side(tx, peer, owner, &theirs),
    )
    .await?;
    let contact = info(peer, peer_name, &mine);
    let mut events = Vec::new();
    if mine != old_mine {
        events.push((
            owner,
            UserEvent::Contact {
                contact: contact.clone(),
            },
        ));
    }
    if tell_peer && theirs != old_theirs {
        events.push((
            peer,
            UserEvent::Contact {
                contact: info(owner, owner_name, &theirs),
            },
        ));
    }
    Ok(ContactChanged {
        contact,
        user_events: append_user_events(tx, events).await?,
    })
}

pub(super) async fn set_alias(
    tx: &Transaction<'_>,
    owner: UserId,
    peer: UserId,
    alias: Option<&str>,
) -> PgResult<ContactChanged> {
    // The owner's row lock orders this against contact actions touching the same side.
    // One after the other: a statement cached on this connection would otherwise be
    // sent before an earlier one still being prepared, and run first.
    query_opt(
        tx,
        "SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE",
        &[owner.as_uuid()],
    )
    .await?;
    let (peer_row, mine) = futures::future::try_join(
        query_opt(
            tx,
            "SELECT username FROM users WHERE id = $1",
            &[peer.as_uuid()],
        ),
        query_opt(tx, READ_SIDE, &[owner.as_uuid(), peer.as_uuid()]),
    )
    .await?;
    let peer_name: String = peer_row.ok_or(StoreError::UnknownUser)?.try_get(0)?;
    let mut mine = side_from(mine)?;
    mine.alias = alias.filter(|a| !a.is_empty()).map(str::to_owned);
    write_side(tx, owner, peer, &mine).await?;
    let contact = info(peer, peer_name, &mine);
    let user_events = append_user_events(
        tx,
        vec![(
            owner,
            UserEvent::Contact {
                contact: contact.clone(),
            },
        )],
    )
    .await?;
    Ok(ContactChanged {
        contact,
        user_events,
    })
}

pub(super) async fn set_privacy(
    tx: &Transaction<'_>,
    user_id: UserId,
    hide_last_seen: bool,
) -> PgResult<UserEventRecord> {
    execute(
        tx,
        "UPDATE users SET hide_last_seen = $2 WHERE id = $1",
        &[user_id.as_uuid(), &hide_last_seen],
    )
    .await?;
    let mut records =
        append_user_events(tx, vec![(user_id, UserEvent::Privacy { hide_last_seen })]).await?;
    records
        .pop()
        .map(|(_, record)| record)
        .ok_or_else(|| StoreError::Internal("no user event written".into()).into())
}

pub(super) async fn is_blocked(
    shared: &Shared,
    blocker: UserId,
    blocked: UserId,
) -> PgResult<bool> {
    let client = shared.client().await?;
    let row = query_one(
        &client,
        "SELECT EXISTS (SELECT 1 FROM contacts WHERE owner_id = $1 AND peer_id = $2 AND blocked)",
        &[blocker.as_uuid(), blocked.as_uuid()],
    )
    .await?;
    Ok(row.try_get(0)?)
}

pub(super) async fn list_contacts(shared: &Shared, owner: UserId) -> PgResult<Vec<ContactInfo>> {
    let client = shared.client().await?;
    query(
        &client,
        "SELECT c.peer_id, u.username, c.state, c.blocked, c.alias, u.last_seen_at, u.hide_last_seen
         FROM contacts c JOIN users u ON u.id = c.peer_id
         WHERE c.owner_id = $1 ORDER BY u.username",
        &[owner.as_uuid()],
    )
    .await?
    .iter()
    .map(|row| {
        let state = row
            .try_get::<_, Option<&str>>(2)?
            .and_then(ContactState::parse);
        let hidden: bool = row.try_get(6)?;
        Ok(ContactInfo {
            user_id: UserId::from_uuid(row.try_get(0)?),
            username: row.try_get(1)?,
            state,
            blocked: row.try_get(3)?,
            alias: row.try_get(4)?,
            online: None,
            // Last seen goes to friends only, and never when hidden.
            last_seen: if state == Some(ContactState::Friend) && !hidden {
                row.try_get(5)?
            } else {
                None
            },
        })
    })
    .collect()
}

pub(super) async fn search_users(
    shared: &Shared,
    viewer: UserId,
    prefix: &str,
    limit: u32,
) -> PgResult<Vec<UserRef>> {
    // Usernames are [a-z0-9_.-] and compare bytewise ("C"); '{' sorts right after 'z',
    // closing the prefix range.
    let high = format!("{prefix}{{");
    let client = shared.client().await?;
    query(
        &client,
        "SELECT u.id, u.username FROM users u
         WHERE u.username >= $1 AND u.username < $2 AND u.id <> $3
           AND NOT EXISTS (SELECT 1 FROM contacts c WHERE c.owner_id = u.id AND c.peer_id = $3 AND c.blocked)
         ORDER BY u.username LIMIT $4",
        &[&prefix, &high, viewer.as_uuid(), &i64::from(limit)],
    )
    .await?
    .iter()
    .map(|row| {
        Ok(UserRef {
            user_id: UserId::from_uuid(row.try_get(0)?),
            username: row.try_get(1)?,
        })
    })
    .collect()
}

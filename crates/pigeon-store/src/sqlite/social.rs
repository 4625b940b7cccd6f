//! Writer jobs for groups, member settings, contacts and the per-user event log.
//!
//! Each job checks the rules and applies the change in the same transaction, so a role or
//! a block cannot change between the check and the write. Jobs touch the writer's caches
//! only after every statement succeeded.

use std::collections::BTreeSet;
use std::sync::Arc;

use pigeon_proto::{
    ContactAction, ContactInfo, ContactState, GroupInfo, Message, MessageKind, Role, SystemEvent,
    ThreadId, ThreadKind, ThreadSettings, UserEvent, UserEventRecord, UserId,
};
use rusqlite::{Connection, OptionalExtension, params};

use super::{WriterState, insert_message};
use crate::common::{
    ContactSide as Side, apply_contact_action, check_group_change, now_ms, participants_hash,
    require, to_i64, to_u64, user_events_prune_upto,
};
use crate::{
    Actor, ContactChanged, GroupChange, GroupChanged, GroupLimits, NewGroup, Result, SettingsPatch,
    StoreError,
};

/// Appends an event to a user's log and returns it with its seq.
pub(super) fn append_user_event(
    conn: &Connection,
    user_id: UserId,
    event: UserEvent,
) -> Result<UserEventRecord> {
    let last: Option<i64> = conn
        .prepare_cached("SELECT max(seq) FROM user_events WHERE user_id = ?1")?
        .query_row([user_id.as_bytes()], |row| row.get(0))?;
    let last = to_u64(last.unwrap_or(0));
    let seq = last + 1;
    let body = serde_json::to_string(&event).map_err(|e| StoreError::Internal(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO user_events (user_id, seq, body, created_at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![user_id.as_bytes(), to_i64(seq), body, now_ms()])?;
    if let Some(upto) = user_events_prune_upto(seq) {
        conn.prepare_cached("DELETE FROM user_events WHERE user_id = ?1 AND seq <= ?2")?
            .execute(params![user_id.as_bytes(), to_i64(upto)])?;
    }
    Ok(UserEventRecord { seq, event })
}

pub(super) fn create_group(
    conn: &Connection,
    state: &mut WriterState,
    creator: Actor,
    group: NewGroup,
    limits: GroupLimits,
) -> Result<GroupChanged> {
    let mut members: BTreeSet<UserId> = group.members.iter().copied().collect();
    members.remove(&creator.user_id);
    if members.len() + 1 > limits.max_members as usize {
        return Err(StoreError::LimitExceeded(format!(
            "a group has at most {} members",
            limits.max_members
        )));
    }
    let mut all: Vec<UserId> = vec![creator.user_id];
    all.extend(members.iter().copied());
    check_new_members(conn, state, creator.user_id, &all, limits)?;

    let thread_id = ThreadId::new();
    let now = now_ms();
    conn.prepare_cached(
        "INSERT INTO threads (id, kind, title, topic, avatar, share_history, member_count, created_at, updated_at)
         VALUES (?1, 'group', ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
    )?
    .execute(params![
        thread_id.as_bytes(),
        group.title,
        group.topic,
        group.avatar,
        group.share_history,
        all.len() as i64,
        now
    ])?;
    let mut add = conn.prepare_cached(
        "INSERT INTO members (thread_id, user_id, role, joined_seq, joined_at) VALUES (?1, ?2, ?3, 0, ?4)",
    )?;
    for user in &all {
        let role = if *user == creator.user_id {
            Role::Owner
        } else {
            Role::Member
        };
        add.execute(params![
            thread_id.as_bytes(),
            user.as_bytes(),
            role.as_str(),
            now
        ])?;
    }
    set_participants(conn, thread_id, &all)?;
    let mut user_events = Vec::with_capacity(all.len());
    for user in &all {
        user_events.push((
            *user,
            append_user_event(conn, *user, UserEvent::Joined { thread_id })?,
        ));
    }
    let event = SystemEvent::Created {
        title: group.title.clone(),
        members: all.clone(),
    };
    // Every statement runs before the caches change: a failure leaves them true.
    let group = read_group(conn, thread_id)?;
    let message = insert_system(conn, state, thread_id, creator, &event)?;
    let recipients: Arc<[UserId]> = all.into();
    state.set_members(thread_id, recipients.clone());
    Ok(GroupChanged {
        group,
        message: Some(message),
        recipients,
        user_events,
    })
}

pub(super) fn change_group(
    conn: &Connection,
    state: &mut WriterState,
    actor: Actor,
    thread_id: ThreadId,
    change: GroupChange,
    limits: GroupLimits,
) -> Result<GroupChanged> {
    let thread = state.thread(conn, thread_id)?;
    if thread.kind != ThreadKind::Group {
        return Err(StoreError::Forbidden("not a group"));
    }
    if thread.closed {
        return Err(StoreError::GroupClosed);
    }
    let before: Vec<UserId> = thread.members.to_vec();
    let actor_role = role_of(conn, thread_id, actor.user_id)?.ok_or(StoreError::NotMember)?;
    let mut after = before.clone();
    let mut removed = Vec::new();
    let mut user_events = Vec::new();

    check_group_change(actor.user_id, actor_role, &change)?;
    let event = match change {
        GroupChange::AddMembers(users) => {
            let new: Vec<UserId> = users
                .into_iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|u| !before.contains(u))
                .collect();
            if new.is_empty() {
                return unchanged(conn, thread_id, before);
            }
            if before.len() + new.len() > limits.max_members as usize {
                return Err(StoreError::LimitExceeded(format!(
                    "a group has at most {} members",
                    limits.max_members
                )));
            }
            check_new_members(conn, state, actor.user_id, &new, limits)?;
            let (last_seq, share_history) = (
                state.thread(conn, thread_id)?.last_seq,
                share_history(conn, thread_id)?,
            );
            // The new members see the "added" message and what follows (or everything,
            // when the group shares its history).
            let joined_seq = if share_history { 0 } else { last_seq };
            let now = now_ms();
            let mut add = conn.prepare_cached(
                "INSERT INTO members (thread_id, user_id, role, joined_seq, last_read_seq, last_delivered_seq, joined_at)
                 VALUES (?1, ?2, 'member', ?3, ?4, ?4, ?5)",
            )?;
            for user in &new {
                add.execute(params![
                    thread_id.as_bytes(),
                    user.as_bytes(),
                    to_i64(joined_seq),
                    to_i64(last_seq),
                    now
                ])?;
                user_events.push((
                    *user,
                    append_user_event(conn, *user, UserEvent::Joined { thread_id })?,
                ));
            }
            after.extend(new.iter().copied());
            SystemEvent::MembersAdded { users: new }
        }
        GroupChange::RemoveMember(user) => {
            if user == actor.user_id {
                return Err(StoreError::Forbidden("use leave_group to leave"));
            }
            let target = role_of(conn, thread_id, user)?.ok_or(StoreError::TargetNotMember)?;
            match actor_role {
                Role::Owner => {}
                Role::Admin => require(
                    target == Role::Member,
                    "admins remove members, not admins or the owner",
                )?,
                Role::Member => {
                    return Err(StoreError::Forbidden(
                        "only admins and the owner remove members",
                    ));
                }
            }
            delete_member(conn, thread_id, user)?;
            user_events.push((
                user,
                append_user_event(conn, user, UserEvent::Left { thread_id })?,
            ));
            after.retain(|u| *u != user);
            removed.push(user);
            SystemEvent::MemberRemoved { user }
        }
        GroupChange::Leave => {
            delete_member(conn, thread_id, actor.user_id)?;
            user_events.push((
                actor.user_id,
                append_user_event(conn, actor.user_id, UserEvent::Left { thread_id })?,
            ));
            after.retain(|u| *u != actor.user_id);
            removed.push(actor.user_id);
            let new_owner = if actor_role == Role::Owner {
                promote_successor(conn, thread_id)?
            } else {
                None
            };
            if after.is_empty() {
                conn.prepare_cached("UPDATE threads SET closed = 1 WHERE id = ?1")?
                    .execute([thread_id.as_bytes()])?;
            }
            SystemEvent::MemberLeft { new_owner }
        }
        GroupChange::Update {
            title,
            topic,
            avatar,
            share_history,
        } => {
            let current = read_group(conn, thread_id)?;
            let title = title.filter(|t| *t != current.title);
            let topic = topic.filter(|t| current.topic.as_deref().unwrap_or("") != t);
            let avatar = avatar.filter(|a| current.avatar.as_deref().unwrap_or("") != a);
            let share_history = share_history.filter(|s| *s != current.share_history);
            if title.is_none() && topic.is_none() && avatar.is_none() && share_history.is_none() {
                return unchanged(conn, thread_id, before);
            }
            let empty_to_null = |v: &Option<String>| {
                v.as_ref()
                    .map(|s| if s.is_empty() { None } else { Some(s.clone()) })
            };
            conn.prepare_cached(
                "UPDATE threads SET
                    title = coalesce(?2, title),
                    topic = CASE WHEN ?3 THEN ?4 ELSE topic END,
                    avatar = CASE WHEN ?5 THEN ?6 ELSE avatar END,
                    share_history = coalesce(?7, share_history)
                 WHERE id = ?1",
            )?
            .execute(params![
                thread_id.as_bytes(),
                title,
                topic.is_some(),
                empty_to_null(&topic).flatten(),
                avatar.is_some(),
                empty_to_null(&avatar).flatten(),
                share_history,
            ])?;
            SystemEvent::Updated {
                title,
                topic,
                avatar,
                share_history,
            }
        }
        GroupChange::SetRole(user, role) => {
            let target = role_of(conn, thread_id, user)?.ok_or(StoreError::TargetNotMember)?;
            if target == role {
                return unchanged(conn, thread_id, before);
            }
            set_role(conn, thread_id, user, role)?;
            SystemEvent::RoleChanged { user, role }
        }
        GroupChange::TransferOwnership(user) => {
            role_of(conn, thread_id, user)?.ok_or(StoreError::TargetNotMember)?;
            set_role(conn, thread_id, user, Role::Owner)?;
            set_role(conn, thread_id, actor.user_id, Role::Admin)?;
            SystemEvent::OwnershipTransferred { user }
        }
    };

    if after.len() != before.len() {
        conn.prepare_cached("UPDATE threads SET member_count = ?2 WHERE id = ?1")?
            .execute(params![thread_id.as_bytes(), after.len() as i64])?;
        set_participants(conn, thread_id, &after)?;
    }
    // Every statement runs before the caches change: a failure leaves them true.
    let group = read_group(conn, thread_id)?;
    let message = insert_system(conn, state, thread_id, actor, &event)?;
    let members: Arc<[UserId]> = after.into();
    state.set_members(thread_id, members.clone());
    if members.is_empty() {
        state.close_thread(thread_id);
    }
    let mut recipients = members.to_vec();
    recipients.extend(removed);
    Ok(GroupChanged {
        group,
        message: Some(message),
        recipients: recipients.into(),
        user_events,
    })
}

fn unchanged(conn: &Connection, thread_id: ThreadId, members: Vec<UserId>) -> Result<GroupChanged> {
    Ok(GroupChanged {
        group: read_group(conn, thread_id)?,
        message: None,
        recipients: members.into(),
        user_events: Vec::new(),
    })
}

/// Checks that every user exists, has not blocked `actor`, and has room for another group.
fn check_new_members(
    conn: &Connection,
    state: &WriterState,
    actor: UserId,
    users: &[UserId],
    limits: GroupLimits,
) -> Result<()> {
    let mut exists = conn.prepare_cached("SELECT 1 FROM users WHERE id = ?1")?;
    let mut groups = conn.prepare_cached(
        "SELECT count(*) FROM members m JOIN threads t ON t.id = m.thread_id
         WHERE m.user_id = ?1 AND t.kind = 'group'",
    )?;
    for user in users {
        if exists
            .query_row([user.as_bytes()], |_| Ok(()))
            .optional()?
            .is_none()
        {
            return Err(StoreError::UnknownUser);
        }
        if *user != actor && state.blocks.contains(&(*user, actor)) {
            return Err(StoreError::Blocked);
        }
        let count: i64 = groups.query_row([user.as_bytes()], |row| row.get(0))?;
        if count >= i64::from(limits.max_groups_per_user) {
            return Err(StoreError::LimitExceeded(format!(
                "a user belongs to at most {} groups",
                limits.max_groups_per_user
            )));
        }
    }
    Ok(())
}

fn insert_system(
    conn: &Connection,
    state: &mut WriterState,
    thread_id: ThreadId,
    actor: Actor,
    event: &SystemEvent,
) -> Result<Message> {
    let body = serde_json::to_string(event).map_err(|e| StoreError::Internal(e.to_string()))?;
    let client_msg_id = format!("sys-{}", pigeon_proto::MessageId::new());
    let mut message = insert_message(
        conn,
        state,
        thread_id,
        actor.user_id,
        actor.device_id,
        client_msg_id,
        MessageKind::System,
        body,
    )?;
    // The actor has seen their own change (a no-op when they just left).
    state
        .read_markers
        .insert((thread_id, actor.user_id), message.seq);
    message.system = Some(event.clone());
    message.body = String::new();
    Ok(message)
}

fn role_of(conn: &Connection, thread_id: ThreadId, user_id: UserId) -> Result<Option<Role>> {
    let role: Option<String> = conn
        .prepare_cached("SELECT role FROM members WHERE thread_id = ?1 AND user_id = ?2")?
        .query_row(params![thread_id.as_bytes(), user_id.as_bytes()], |row| {
            row.get(0)
        })
        .optional()?;
    Ok(role.map(|r| Role::parse(&r)))
}

fn set_role(conn: &Connection, thread_id: ThreadId, user_id: UserId, role: Role) -> Result<()> {
    conn.prepare_cached("UPDATE members SET role = ?3 WHERE thread_id = ?1 AND user_id = ?2")?
        .execute(params![
            thread_id.as_bytes(),
            user_id.as_bytes(),
            role.as_str()
        ])?;
    Ok(())
}

fn delete_member(conn: &Connection, thread_id: ThreadId, user_id: UserId) -> Result<()> {
    conn.prepare_cached("DELETE FROM members WHERE thread_id = ?1 AND user_id = ?2")?
        .execute(params![thread_id.as_bytes(), user_id.as_bytes()])?;
    Ok(())
}

fn share_history(conn: &Connection, thread_id: ThreadId) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT share_history FROM threads WHERE id = ?1")?
        .query_row([thread_id.as_bytes()], |row| row.get(0))?)
}

/// When the last owner leaves: the longest-standing admin becomes owner, else the
/// longest-standing member. Returns the new owner.
fn promote_successor(conn: &Connection, thread_id: ThreadId) -> Result<Option<UserId>> {
    let owners: i64 = conn
        .prepare_cached("SELECT count(*) FROM members WHERE thread_id = ?1 AND role = 'owner'")?
        .query_row([thread_id.as_bytes()], |row| row.get(0))?;
    if owners > 0 {
        return Ok(None);
    }
    let successor: Option<[u8; 16]> = conn
        .prepare_cached(
            "SELECT user_id FROM members WHERE thread_id = ?1
             ORDER BY role = 'admin' DESC, joined_at, user_id LIMIT 1",
        )?
        .query_row([thread_id.as_bytes()], |row| row.get(0))
        .optional()?;
    let Some(successor) = successor.map(UserId::from_bytes) else {
        return Ok(None);
    };
    set_role(conn, thread_id, successor, Role::Owner)?;
    Ok(Some(successor))
}

fn set_participants(conn: &Connection, thread_id: ThreadId, members: &[UserId]) -> Result<()> {
    conn.prepare_cached("UPDATE threads SET participants_hash = ?2 WHERE id = ?1")?
        .execute(params![
            thread_id.as_bytes(),
            &participants_hash(members)[..]
        ])?;
    Ok(())
}

pub(super) fn read_group(conn: &Connection, thread_id: ThreadId) -> Result<GroupInfo> {
    conn.prepare_cached(
        "SELECT title, topic, avatar, share_history, member_count, closed, kind FROM threads WHERE id = ?1",
    )?
    .query_row([thread_id.as_bytes()], |row| Ok((row.get::<_, String>(6)?, group_from_row_at(row, thread_id, 0)?)))
    .optional()?
    .ok_or(StoreError::ThreadNotFound)
    .and_then(|(kind, group)| if kind == "group" { Ok(group) } else { Err(StoreError::Forbidden("not a group")) })
}

/// Reads title, topic, avatar, share_history, member_count, closed from column `at` on.
pub(super) fn group_from_row_at(
    row: &rusqlite::Row<'_>,
    thread_id: ThreadId,
    at: usize,
) -> rusqlite::Result<GroupInfo> {
    Ok(GroupInfo {
        thread_id,
        title: row.get::<_, Option<String>>(at)?.unwrap_or_default(),
        topic: row.get(at + 1)?,
        avatar: row.get(at + 2)?,
        share_history: row.get(at + 3)?,
        member_count: u32::try_from(row.get::<_, i64>(at + 4)?).unwrap_or(0),
        closed: row.get(at + 5)?,
    })
}

pub(super) fn set_thread_settings(
    conn: &Connection,
    state: &mut WriterState,
    user_id: UserId,
    thread_id: ThreadId,
    patch: SettingsPatch,
) -> Result<(ThreadSettings, UserEventRecord)> {
    let current: Option<(bool, bool, bool, Option<String>)> = conn
        .prepare_cached(
            "SELECT muted, pinned, archived, nickname FROM members WHERE thread_id = ?1 AND user_id = ?2",
        )?
        .query_row(params![thread_id.as_bytes(), user_id.as_bytes()], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()?;
    let Some((muted, pinned, archived, nickname)) = current else {
        return Err(match state.thread(conn, thread_id) {
            Err(error) => error,
            Ok(_) => StoreError::NotMember,
        });
    };
    let settings = ThreadSettings {
        muted: patch.muted.unwrap_or(muted),
        pinned: patch.pinned.unwrap_or(pinned),
        archived: patch.archived.unwrap_or(archived),
        nickname: match patch.nickname {
            Some(name) if name.is_empty() => None,
            Some(name) => Some(name),
            None => nickname,
        },
    };
    conn.prepare_cached(
        "UPDATE members SET muted = ?3, pinned = ?4, archived = ?5, nickname = ?6 WHERE thread_id = ?1 AND user_id = ?2",
    )?
    .execute(params![
        thread_id.as_bytes(),
        user_id.as_bytes(),
        settings.muted,
        settings.pinned,
        settings.archived,
        settings.nickname
    ])?;
    let record = append_user_event(
        conn,
        user_id,
        UserEvent::ThreadSettings {
            thread_id,
            settings: settings.clone(),
        },
    )?;
    Ok((settings, record))
}

fn read_side(conn: &Connection, owner: UserId, peer: UserId) -> Result<Side> {
    Ok(conn
        .prepare_cached(
            "SELECT state, blocked, alias FROM contacts WHERE owner_id = ?1 AND peer_id = ?2",
        )?
        .query_row(params![owner.as_bytes(), peer.as_bytes()], |row| {
            Ok(Side {
                state: row
                    .get::<_, Option<String>>(0)?
                    .as_deref()
                    .and_then(ContactState::parse),
                blocked: row.get(1)?,
                alias: row.get(2)?,
            })
        })
        .optional()?
        .unwrap_or_default())
}

fn write_side(conn: &Connection, owner: UserId, peer: UserId, side: &Side) -> Result<()> {
    if side == &Side::default() {
        conn.prepare_cached("DELETE FROM contacts WHERE owner_id = ?1 AND peer_id = ?2")?
            .execute(params![owner.as_bytes(), peer.as_bytes()])?;
    } else {
        conn.prepare_cached(
            "INSERT INTO contacts (owner_id, peer_id, state, blocked, alias, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (owner_id, peer_id) DO UPDATE SET
                state = excluded.state, blocked = excluded.blocked, alias = excluded.alias, updated_at = excluded.updated_at",
        )?
        .execute(params![
            owner.as_bytes(),
            peer.as_bytes(),
            side.state.map(ContactState::as_str),
            side.blocked,
            side.alias,
            now_ms()
        ])?;
    }
    Ok(())
}

fn username(conn: &Connection, user: UserId) -> Result<String> {
    conn.prepare_cached("SELECT username FROM users WHERE id = ?1")?
        .query_row([user.as_bytes()], |row| row.get(0))
        .optional()?
        .ok_or(StoreError::UnknownUser)
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

pub(super) fn contact_action(
    conn: &Connection,
    state: &mut WriterState,
    owner: UserId,
    peer: UserId,
    action: ContactAction,
) -> Result<ContactChanged> {
    if owner == peer {
        return Err(StoreError::Forbidden("that is you"));
    }
    let peer_name = username(conn, peer)?;
    let owner_name = username(conn, owner)?;
    let mut mine = read_side(conn, owner, peer)?;
    let mut theirs = read_side(conn, peer, owner)?;
    let (old_mine, old_theirs) = (mine.clone(), theirs.clone());
    // Whether the peer may learn of this change (never of a block).
    let tell_peer = apply_contact_action(action, &mut mine, &mut theirs)?;
    write_side(conn, owner, peer, &mine)?;
    write_side(conn, peer, owner, &theirs)?;
    let contact = info(peer, peer_name, &mine);
    let mut user_events = Vec::new();
    if mine != old_mine {
        user_events.push((
            owner,
            append_user_event(
                conn,
                owner,
                UserEvent::Contact {
                    contact: contact.clone(),
                },
            )?,
        ));
    }
    if tell_peer && theirs != old_theirs {
        let theirs_info = info(owner, owner_name, &theirs);
        user_events.push((
            peer,
            append_user_event(
                conn,
                peer,
                UserEvent::Contact {
                    contact: theirs_info,
                },
            )?,
        ));
    }
    if mine.blocked {
        state.blocks.insert((owner, peer));
    } else {
        state.blocks.remove(&(owner, peer));
    }
    Ok(ContactChanged {
        contact,
        user_events,
    })
}

pub(super) fn set_alias(
    conn: &Connection,
    owner: UserId,
    peer: UserId,
    alias: Option<String>,
) -> Result<ContactChanged> {
    let peer_name = username(conn, peer)?;
    let mut mine = read_side(conn, owner, peer)?;
    mine.alias = alias.filter(|a| !a.is_empty());
    write_side(conn, owner, peer, &mine)?;
    let contact = info(peer, peer_name, &mine);
    let record = append_user_event(
        conn,
        owner,
        UserEvent::Contact {
            contact: contact.clone(),
        },
    )?;
    Ok(ContactChanged {
        contact,
        user_events: vec![(owner, record)],
    })
}

pub(super) fn set_privacy(
    conn: &Connection,
    user_id: UserId,
    hide_last_seen: bool,
) -> Result<UserEventRecord> {
    conn.prepare_cached("UPDATE users SET hide_last_seen = ?2 WHERE id = ?1")?
        .execute(params![user_id.as_bytes(), hide_last_seen])?;
    append_user_event(conn, user_id, UserEvent::Privacy { hide_last_seen })
}

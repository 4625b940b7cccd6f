//! Groups: creation, membership and settings changes recorded as system messages, roles
//! and succession, and each member's own thread settings.
//!
//! A change holds the group's row lock from its first read to COMMIT, so the rules are
//! checked against exactly the state the change applies to, whichever node made the
//! previous change.

use std::collections::{BTreeSet, HashMap};

use deadpool_postgres::{GenericClient, Transaction};
use pigeon_proto::{
    GroupInfo, MemberInfo, Message, MessageId, MessageKind, Role, SystemEvent, ThreadId,
    ThreadSettings, UserEvent, UserEventRecord, UserId,
};
use tokio_postgres::Row;
use uuid::Uuid;

use super::Shared;
use super::error::PgResult;
use super::messages::{LOCK_THREAD, write_message};
use super::sql::{execute, lock_users, query, query_opt, user_ids, uuids};
use super::user_events::append_user_events;
use crate::common::{check_group_change, now_ms, participants_hash, to_i64, to_u64};
use crate::{Actor, GroupChange, GroupChanged, GroupLimits, NewGroup, SettingsPatch, StoreError};

pub(super) async fn create_group(
    tx: &Transaction<'_>,
    thread_id: ThreadId,
    creator: Actor,
    group: &NewGroup,
    limits: GroupLimits,
) -> PgResult<GroupChanged> {
    let mut members: BTreeSet<UserId> = group.members.iter().copied().collect();
    members.remove(&creator.user_id);
    if members.len() + 1 > limits.max_members as usize {
        return Err(StoreError::LimitExceeded(format!(
            "a group has at most {} members",
            limits.max_members
        ))
        .into());
    }
    let mut all: Vec<UserId> = vec![creator.user_id];
    all.extend(members.iter().copied());
    check_new_members(tx, creator.user_id, &all, limits).await?;

    let now = now_ms();
    let count = i32::try_from(all.len()).unwrap_or(i32::MAX);
    let hash = participants_hash(&all);
    let hash: &[u8] = &hash;
    let ids = uuids(&all);
    // One after the other: a statement cached on this connection would otherwise be
    // sent before an earlier one still being prepared, and run first.
    execute(
        tx,
        "INSERT INTO threads (id, kind, title, topic, avatar, share_history, participants_hash,
                                  member_count, members_version, created_at, updated_at)
             VALUES ($1, 'group', $2, $3, $4, $5, $6, $7, 1, $8, $8)",
        &[
            thread_id.as_uuid(),
            &group.title,
            &group.topic,
            &group.avatar,
            &group.share_history,
            &hash,
            &count,
            &now,
        ],
    )
    .await?;
    execute(
        tx,
        "INSERT INTO members (thread_id, user_id, role, joined_seq, joined_at)
             SELECT $1, user_id, CASE WHEN user_id = $2 THEN 'owner' ELSE 'member' END, 0, $3
             FROM unnest($4::uuid[]) AS user_id",
        &[thread_id.as_uuid(), creator.user_id.as_uuid(), &now, &ids],
    )
    .await?;
    let user_events = append_user_events(
        tx,
        all.iter()
            .map(|user| (*user, UserEvent::Joined { thread_id }))
            .collect(),
    )
    .await?;
    let event = SystemEvent::Created {
        title: group.title.clone(),
        members: all.clone(),
    };
    let message = insert_system(tx, thread_id, 1, creator, event).await?;
    Ok(GroupChanged {
        group: GroupInfo {
            thread_id,
            title: group.title.clone(),
            topic: group.topic.clone(),
            avatar: group.avatar.clone(),
            share_history: group.share_history,
            member_count: u32::try_from(all.len()).unwrap_or(u32::MAX),
            closed: false,
        },
        message: Some(message),
        recipients: all.into(),
        user_events,
    })
}

/// The group as read under its lock at the start of a change.
struct Locked {
    last_seq: u64,
    share_history: bool,
    group: GroupInfo,
    members: Vec<UserId>,
    actor_role: Role,
}

async fn lock_group(tx: &Transaction<'_>, thread_id: ThreadId, actor: UserId) -> PgResult<Locked> {
    // One after the other: a statement cached on this connection would otherwise be
    // sent before an earlier one still being prepared, and run first.
    query_opt(tx, LOCK_THREAD, &[thread_id.as_uuid()]).await?;
    let (head, role) = futures::future::try_join(
        query_opt(
            tx,
            "SELECT title, topic, avatar, share_history, member_count, closed, kind, last_seq,
                    ARRAY(SELECT user_id FROM members WHERE thread_id = $1 ORDER BY user_id)
             FROM threads WHERE id = $1",
            &[thread_id.as_uuid()],
        ),
        query_opt(
            tx,
            "SELECT role FROM members WHERE thread_id = $1 AND user_id = $2",
            &[thread_id.as_uuid(), actor.as_uuid()],
        ),
    )
    .await?;
    let head = head.ok_or(StoreError::ThreadNotFound)?;
    if head.try_get::<_, &str>(6)? != "group" {
        return Err(StoreError::Forbidden("not a group").into());
    }
    let group = group_at(&head, thread_id, 0)?;
    if group.closed {
        return Err(StoreError::GroupClosed.into());
    }
    let role = role.ok_or(StoreError::NotMember)?;
    Ok(Locked {
        last_seq: to_u64(head.try_get(7)?),
        share_history: group.share_history,
        members: user_ids(&head, 8)?,
        actor_role: Role::parse(role.try_get(0)?),
        group,
    })
}

pub(super) async fn change_group(
    tx: &Transaction<'_>,
    actor: Actor,
    thread_id: ThreadId,
    change: &GroupChange,
    limits: GroupLimits,
) -> PgResult<GroupChanged> {
    let locked = lock_group(tx, thread_id, actor.user_id).await?;
    let actor_role = locked.actor_role;
    let before = locked.members;
    let mut after = before.clone();
    let mut removed = Vec::new();
    let mut user_events = Vec::new();

    check_group_change(actor.user_id, actor_role, change)?;
    let event = match change.clone() {
        GroupChange::AddMembers(users) => {
            let new: Vec<UserId> = users
                .into_iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|u| !before.contains(u))
                .collect();
            if new.is_empty() {
                return Ok(unchanged(locked.group, before));
            }
            if before.len() + new.len() > limits.max_members as usize {
                return Err(StoreError::LimitExceeded(format!(
                    "a group has at most {} members",
                    limits.max_members
                ))
                .into());
            }
            check_new_members(tx, actor.user_id, &new, limits).await?;
            // The new members see the "added" message and what follows (or everything,
            // when the group shares its history).
            let joined_seq = if locked.share_history {
                0
            } else {
                locked.last_seq
            };
            execute(
                tx,
                "INSERT INTO members (thread_id, user_id, role, joined_seq, last_read_seq, last_delivered_seq, joined_at)
                 SELECT $1, user_id, 'member', $2, $3, $3, $4 FROM unnest($5::uuid[]) AS user_id",
                &[
                    thread_id.as_uuid(),
                    &to_i64(joined_seq),
                    &to_i64(locked.last_seq),
                    &now_ms(),
                    &uuids(&new),
                ],
            )
            .await?;
            user_events = append_user_events(
                tx,
                new.iter()
                    .map(|user| (*user, UserEvent::Joined { thread_id }))
                    .collect(),
            )
            .await?;
            after.extend(new.iter().copied());
            SystemEvent::MembersAdded { users: new }
        }
        GroupChange::RemoveMember(user) => {
            if user == actor.user_id {
                return Err(StoreError::Forbidden("use leave_group to leave").into());
            }
            let target = role_of(tx, thread_id, user)
                .await?
                .ok_or(StoreError::TargetNotMember)?;
            match actor_role {
                Role::Owner => {}
                Role::Admin => require(
                    target == Role::Member,
                    "admins remove members, not admins or the owner",
                )?,
                Role::Member => {
                    return Err(
                        StoreError::Forbidden("only admins and the owner remove members").into(),
                    );
                }
            }
            delete_member(tx, thread_id, user).await?;
            user_events =
                append_user_events(tx, vec![(user, UserEvent::Left { thread_id })]).await?;
            after.retain(|u| *u != user);
            removed.push(user);
            SystemEvent::MemberRemoved { user }
        }
        GroupChange::Leave => {
            delete_member(tx, thread_id, actor.user_id).await?;
            user_events =
                append_user_events(tx, vec![(actor.user_id, UserEvent::Left { thread_id })])
                    .await?;
            after.retain(|u| *u != actor.user_id);
            removed.push(actor.user_id);
            let new_owner = if actor_role == Role::Owner {
                promote_successor(tx, thread_id).await?
            } else {
                None
            };
            if after.is_empty() {
                execute(
                    tx,
                    "UPDATE threads SET closed = true WHERE id = $1",
                    &[thread_id.as_uuid()],
                )
                .await?;
            }
            SystemEvent::MemberLeft { new_owner }
        }
        GroupChange::Update {
            title,
            topic,
            avatar,
            share_history,
        } => {
            let current = &locked.group;
            let title = title.filter(|t| *t != current.title);
            let topic = topic.filter(|t| current.topic.as_deref().unwrap_or("") != t);
            let avatar = avatar.filter(|a| current.avatar.as_deref().unwrap_or("") != a);
            let share_history = share_history.filter(|s| *s != current.share_history);
            if title.is_none() && topic.is_none() && avatar.is_none() && share_history.is_none() {
                return Ok(unchanged(locked.group, before));
            }
            let non_empty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
            execute(
                tx,
                "UPDATE threads SET
                    title = coalesce($2, title),
                    topic = CASE WHEN $3 THEN $4 ELSE topic END,
                    avatar = CASE WHEN $5 THEN $6 ELSE avatar END,
                    share_history = coalesce($7, share_history)
                 WHERE id = $1",
                &[
                    thread_id.as_uuid(),
                    &title,
                    &topic.is_some(),
                    &non_empty(&topic),
                    &avatar.is_some(),
                    &non_empty(&avatar),
                    &share_history,
                ],
            )
            .await?;
            SystemEvent::Updated {
                title,
                topic,
                avatar,
                share_history,
            }
        }
        GroupChange::SetRole(user, role) => {
            let target = role_of(tx, thread_id, user)
                .await?
                .ok_or(StoreError::TargetNotMember)?;
            if target == role {
                return Ok(unchanged(locked.group, before));
            }
            set_role(tx, thread_id, user, role).await?;
            SystemEvent::RoleChanged { user, role }
        }
        GroupChange::TransferOwnership(user) => {
            role_of(tx, thread_id, user)
                .await?
                .ok_or(StoreError::TargetNotMember)?;
            futures::future::try_join(
                set_role(tx, thread_id, user, Role::Owner),
                set_role(tx, thread_id, actor.user_id, Role::Admin),
            )
            .await?;
            SystemEvent::OwnershipTransferred { user }
        }
    };

    if after.len() != before.len() {
        let hash = participants_hash(&after);
        let hash: &[u8] = &hash;
        // The version tells every node's member cache that its list is stale.
        execute(
            tx,
            "UPDATE threads SET member_count = $2, participants_hash = $3,
                                members_version = members_version + 1
             WHERE id = $1",
            &[
                thread_id.as_uuid(),
                &i32::try_from(after.len()).unwrap_or(i32::MAX),
                &hash,
            ],
        )
        .await?;
    }
    let group = read_group(tx, thread_id).await?;
    let message = insert_system(tx, thread_id, locked.last_seq + 1, actor, event).await?;
    let mut recipients = after;
    recipients.extend(removed);
    Ok(GroupChanged {
        group,
        message: Some(message),
        recipients: recipients.into(),
        user_events,
    })
}

fn unchanged(group: GroupInfo, members: Vec<UserId>) -> GroupChanged {
    GroupChanged {
        group,
        message: None,
        recipients: members.into(),
        user_events: Vec::new(),
    }
}

fn require(allowed: bool, why: &'static str) -> PgResult<()> {
    Ok(crate::common::require(allowed, why)?)
}

/// Checks, in the order given, that every user exists, has not blocked `actor`, and has
/// room for another group. Their rows stay locked (in id order) until COMMIT, so two
/// groups adding the same user at once cannot both pass the per-user limit.
async fn check_new_members(
    tx: &Transaction<'_>,
    actor: UserId,
    users: &[UserId],
    limits: GroupLimits,
) -> PgResult<()> {
    let ids = uuids(users);
    lock_users(tx, &ids).await?;
    let rows = query(
            tx,
            "SELECT u.id,
                    EXISTS (SELECT 1 FROM contacts c WHERE c.owner_id = u.id AND c.peer_id = $2 AND c.blocked),
                    (SELECT count(*) FROM members m JOIN threads t ON t.id = m.thread_id
                     WHERE m.user_id = u.id AND t.kind = 'group')
             FROM users u WHERE u.id = ANY($1)",
            &[&ids, actor.as_uuid()],
        ).await?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in &rows {
        let id: Uuid = row.try_get(0)?;
        found.insert(id, (row.try_get::<_, bool>(1)?, row.try_get::<_, i64>(2)?));
    }
    for user in users {
        let (blocked_actor, groups) = *found.get(user.as_uuid()).ok_or(StoreError::UnknownUser)?;
        if *user != actor && blocked_actor {
            return Err(StoreError::Blocked.into());
        }
        if groups >= i64::from(limits.max_groups_per_user) {
            return Err(StoreError::LimitExceeded(format!(
                "a user belongs to at most {} groups",
                limits.max_groups_per_user
            ))
            .into());
        }
    }
    Ok(())
}

/// Records a group change as a system message with the given seq (the thread's next,
/// read under its lock).
async fn insert_system(
    tx: &Transaction<'_>,
    thread_id: ThreadId,
    seq: u64,
    actor: Actor,
    event: SystemEvent,
) -> PgResult<Message> {
    let body = serde_json::to_string(&event).map_err(|e| StoreError::Internal(e.to_string()))?;
    let message = Message {
        thread_id,
        seq,
        message_id: MessageId::new(),
        sender_id: actor.user_id,
        sender_device_id: actor.device_id,
        client_msg_id: format!("sys-{}", MessageId::new()),
        kind: MessageKind::System,
        body: String::new(),
        system: Some(event),
        created_at: now_ms(),
    };
    write_message(tx, &message, &body).await?;
    Ok(message)
}

async fn role_of(
    tx: &Transaction<'_>,
    thread_id: ThreadId,
    user: UserId,
) -> PgResult<Option<Role>> {
    let row = query_opt(
        tx,
        "SELECT role FROM members WHERE thread_id = $1 AND user_id = $2",
        &[thread_id.as_uuid(), user.as_uuid()],
    )
    .await?;
    Ok(row
        .map(|row| row.try_get::<_, &str>(0).map(Role::parse))
        .transpose()?)
}

async fn set_role(
    tx: &Transaction<'_>,
    thread_id: ThreadId,
    user: UserId,
    role: Role,
) -> PgResult<()> {
    execute(
        tx,
        "UPDATE members SET role = $3 WHERE thread_id = $1 AND user_id = $2",
        &[thread_id.as_uuid(), user.as_uuid(), &role.as_str()],
    )
    .await?;
    Ok(())
}

async fn delete_member(tx: &Transaction<'_>, thread_id: ThreadId, user: UserId) -> PgResult<()> {
    execute(
        tx,
        "DELETE FROM members WHERE thread_id = $1 AND user_id = $2",
        &[thread_id.as_uuid(), user.as_uuid()],
    )
    .await?;
    Ok(())
}

/// When the last owner leaves: the longest-standing admin becomes owner, else the
/// longest-standing member. Returns the new owner.
async fn promote_successor(tx: &Transaction<'_>, thread_id: ThreadId) -> PgResult<Option<UserId>> {
    let (owners, successor) = futures::future::try_join(
        query(
            tx,
            "SELECT 1 FROM members WHERE thread_id = $1 AND role = 'owner'",
            &[thread_id.as_uuid()],
        ),
        query_opt(
            tx,
            "SELECT user_id FROM members WHERE thread_id = $1
             ORDER BY role = 'admin' DESC, joined_at, user_id LIMIT 1",
            &[thread_id.as_uuid()],
        ),
    )
    .await?;
    if !owners.is_empty() {
        return Ok(None);
    }
    let Some(successor) = successor else {
        return Ok(None);
    };
    let successor = UserId::from_uuid(successor.try_get(0)?);
    set_role(tx, thread_id, successor, Role::Owner).await?;
    Ok(Some(successor))
}

pub(super) async fn read_group<C: GenericClient>(
    client: &C,
    thread_id: ThreadId,
) -> PgResult<GroupInfo> {
    let row = query_opt(
        client,
        "SELECT title, topic, avatar, share_history, member_count, closed, kind FROM threads WHERE id = $1",
        &[thread_id.as_uuid()],
    )
    .await?
    .ok_or(StoreError::ThreadNotFound)?;
    if row.try_get::<_, &str>(6)? != "group" {
        return Err(StoreError::Forbidden("not a group").into());
    }
    group_at(&row, thread_id, 0)
}

/// Reads title, topic, avatar, share_history, member_count, closed from column `at` on.
pub(super) fn group_at(row: &Row, thread_id: ThreadId, at: usize) -> PgResult<GroupInfo> {
    Ok(GroupInfo {
        thread_id,
        title: row.try_get::<_, Option<String>>(at)?.unwrap_or_default(),
        topic: row.try_get(at + 1)?,
        avatar: row.try_get(at + 2)?,
        share_history: row.try_get(at + 3)?,
        member_count: u32::try_from(row.try_get::<_, i32>(at + 4)?).unwrap_or(0),
        closed: row.try_get(at + 5)?,
    })
}

pub(super) async fn list_members(
    shared: &Shared,
    thread_id: ThreadId,
    after: Option<UserId>,
    limit: u32,
) -> PgResult<Vec<MemberInfo>> {
    let client = shared.client().await?;
    let after = after.map_or(Uuid::nil(), |id| *id.as_uuid());
    query(
        &client,
        "SELECT m.user_id, u.username, m.role, m.joined_at,
                GREATEST(m.last_read_seq, m.joined_seq), GREATEST(m.last_delivered_seq, m.joined_seq)
         FROM members m JOIN users u ON u.id = m.user_id
         WHERE m.thread_id = $1 AND m.user_id > $2 ORDER BY m.user_id LIMIT $3",
        &[thread_id.as_uuid(), &after, &i64::from(limit)],
    )
    .await?
    .iter()
    .map(|row| {
        Ok(MemberInfo {
            user_id: UserId::from_uuid(row.try_get(0)?),
            username: row.try_get(1)?,
            role: Role::parse(row.try_get(2)?),
            joined_at: row.try_get(3)?,
            read_seq: Some(crate::common::to_u64(row.try_get(4)?)),
            delivered_seq: Some(crate::common::to_u64(row.try_get(5)?)),
        })
    })
    .collect()
}

pub(super) async fn find_groups(shared: &Shared, members: &[UserId]) -> PgResult<Vec<GroupInfo>> {
    let hash = participants_hash(members);
    let hash: &[u8] = &hash;
    let client = shared.client().await?;
    query(
        &client,
        "SELECT title, topic, avatar, share_history, member_count, closed, id FROM threads
         WHERE participants_hash = $1 AND kind = 'group' AND NOT closed ORDER BY updated_at DESC",
        &[&hash],
    )
    .await?
    .iter()
    .map(|row| group_at(row, ThreadId::from_uuid(row.try_get(6)?), 0))
    .collect()
}

pub(super) async fn set_thread_settings(
    tx: &Transaction<'_>,
    user_id: UserId,
    thread_id: ThreadId,
    patch: &SettingsPatch,
) -> PgResult<(ThreadSettings, UserEventRecord)> {
    let current = query_opt(
        tx,
        "SELECT muted, pinned, archived, nickname FROM members
         WHERE thread_id = $1 AND user_id = $2 FOR NO KEY UPDATE",
        &[thread_id.as_uuid(), user_id.as_uuid()],
    )
    .await?;
    let Some(current) = current else {
        let exists = query_opt(
            tx,
            "SELECT 1 FROM threads WHERE id = $1",
            &[thread_id.as_uuid()],
        )
        .await?;
        return Err(match exists {
            None => StoreError::ThreadNotFound,
            Some(_) => StoreError::NotMember,
        }
        .into());
    };
    let settings = ThreadSettings {
        muted: patch.muted.unwrap_or(current.try_get(0)?),
        pinned: patch.pinned.unwrap_or(current.try_get(1)?),
        archived: patch.archived.unwrap_or(current.try_get(2)?),
        nickname: match &patch.nickname {
            Some(name) if name.is_empty() => None,
            Some(name) => Some(name.clone()),
            None => current.try_get(3)?,
        },
    };
    execute(
        tx,
        "UPDATE members SET muted = $3, pinned = $4, archived = $5, nickname = $6
         WHERE thread_id = $1 AND user_id = $2",
        &[
            thread_id.as_uuid(),
            user_id.as_uuid(),
            &settings.muted,
            &settings.pinned,
            &settings.archived,
            &settings.nickname,
        ],
    )
    .await?;
    let mut records = append_user_events(
        tx,
        vec![(
            user_id,
            UserEvent::ThreadSettings {
                thread_id,
                settings: settings.clone(),
            },
        )],
    )
    .await?;
    let (_, record) = records
        .pop()
        .ok_or_else(|| StoreError::Internal("no user event written".into()))?;
    Ok((settings, record))
}

//! Threads as a member sees them: direct threads, memberships, member lists, the thread
//! list and who may see whose presence.

use std::sync::Arc;

use deadpool_postgres::GenericClient;
use pigeon_proto::{Role, ThreadId, ThreadKind, ThreadSummary, UserId, UserRef};
use uuid::Uuid;

use super::Shared;
use super::error::{Error, PgResult};
use super::members::{INLINE_MEMBERS, MemberCache};
use super::sql::{execute, message_at, query, query_one, query_opt, user_ids, uuids};
use crate::common::{now_ms, thread_kind, to_u64};
use crate::{Membership, PRESENCE_GROUP_LIMIT, StoreError};

pub(super) async fn get_or_create_direct_thread(
    shared: &Shared,
    a: UserId,
    b: UserId,
) -> PgResult<ThreadId> {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    // The thread exists after the pair's first message: usually a read is enough.
    if let Some(id) = find_direct_thread(&shared.client().await?, low, high).await? {
        return Ok(id);
    }
    shared
        .transaction((), |tx, ()| {
            Box::pin(async move {
                if let Some(id) = find_direct_thread(tx, low, high).await? {
                    return Ok(id);
                }
                let id = ThreadId::new();
                let now = now_ms();
                let members = if low == high { vec![low] } else { vec![low, high] };
                let count = i32::try_from(members.len()).unwrap_or(2);
                let members = uuids(&members);
                // One after the other: a statement cached on this connection would otherwise be
                // sent before an earlier one still being prepared, and run first.
                execute(
                        tx,
                        "INSERT INTO threads (id, kind, member_count, members_version, created_at, updated_at)
                         VALUES ($1, 'direct', $2, 1, $3, $3)",
                        &[id.as_uuid(), &count, &now],
                    ).await?;
                let (claimed, _) = futures::future::try_join(
                    execute(
                        tx,
                        "INSERT INTO direct_threads (user_low, user_high, thread_id) VALUES ($1, $2, $3)
                         ON CONFLICT DO NOTHING",
                        &[low.as_uuid(), high.as_uuid(), id.as_uuid()],
                    ),
                    execute(
                        tx,
                        "INSERT INTO members (thread_id, user_id, joined_at)
                         SELECT $1, user_id, $2 FROM unnest($3::uuid[]) AS user_id",
                        &[id.as_uuid(), &now, &members],
                    ),
                ).await?;
                if claimed == 0 {
                    // Another request created the pair's thread meanwhile: use that one.
                    return Err(Error::Retry);
                }
                Ok(id)
            })
        })
        .await
}

async fn find_direct_thread<C: GenericClient>(
    client: &C,
    low: UserId,
    high: UserId,
) -> PgResult<Option<ThreadId>> {
    let row = query_opt(
        client,
        "SELECT thread_id FROM direct_threads WHERE user_low = $1 AND user_high = $2",
        &[low.as_uuid(), high.as_uuid()],
    )
    .await?;
    Ok(row
        .map(|row| row.try_get(0))
        .transpose()?
        .map(ThreadId::from_uuid))
}

pub(super) async fn get_membership(
    shared: &Shared,
    thread_id: ThreadId,
    user_id: UserId,
) -> PgResult<Membership> {
    let client = shared.client().await?;
    let row = query_opt(
        &client,
        "SELECT t.kind, t.last_seq, m.joined_seq, m.last_read_seq, m.last_delivered_seq, m.role
         FROM threads t LEFT JOIN members m ON m.thread_id = t.id AND m.user_id = $2
         WHERE t.id = $1",
        &[thread_id.as_uuid(), user_id.as_uuid()],
    )
    .await?
    .ok_or(StoreError::ThreadNotFound)?;
    let Some(role) = row.try_get::<_, Option<String>>(5)? else {
        return Err(StoreError::NotMember.into());
    };
    Ok(Membership {
        kind: thread_kind(row.try_get(0)?),
        last_seq: to_u64(row.try_get(1)?),
        joined_seq: to_u64(row.try_get(2)?),
        read_seq: to_u64(row.try_get(3)?),
        delivered_seq: to_u64(row.try_get(4)?),
        role: Role::parse(&role),
    })
}

pub(super) async fn list_presence_audience(
    shared: &Shared,
    user_id: UserId,
) -> PgResult<Vec<UserId>> {
    let client = shared.client().await?;
    let limit = i32::try_from(PRESENCE_GROUP_LIMIT).unwrap_or(i32::MAX);
    query(
        &client,
        "SELECT p.user_id FROM members m
         JOIN threads t ON t.id = m.thread_id AND t.member_count <= $2
         JOIN members p ON p.thread_id = m.thread_id AND p.user_id <> m.user_id
         WHERE m.user_id = $1
         UNION
         SELECT peer_id FROM contacts WHERE owner_id = $1 AND state = 'friend'
         EXCEPT
         SELECT peer_id FROM contacts WHERE owner_id = $1 AND blocked
         ORDER BY 1",
        &[user_id.as_uuid(), &limit],
    )
    .await?
    .iter()
    .map(|row| Ok(UserId::from_uuid(row.try_get(0)?)))
    .collect()
}

pub(super) async fn can_see_presence(
    shared: &Shared,
    viewer: UserId,
    target: UserId,
) -> PgResult<bool> {
    let client = shared.client().await?;
    let limit = i32::try_from(PRESENCE_GROUP_LIMIT).unwrap_or(i32::MAX);
    let row = query_one(
        &client,
        "SELECT NOT EXISTS (SELECT 1 FROM contacts WHERE owner_id = $1 AND peer_id = $2 AND blocked)
            AND (EXISTS (SELECT 1 FROM contacts WHERE owner_id = $1 AND peer_id = $2 AND state = 'friend')
                 OR EXISTS (SELECT 1 FROM members a
                            JOIN threads t ON t.id = a.thread_id AND t.member_count <= $3
                            JOIN members b ON b.thread_id = a.thread_id AND b.user_id = $2
                            WHERE a.user_id = $1))",
        &[target.as_uuid(), viewer.as_uuid(), &limit],
    )
    .await?;
    Ok(row.try_get(0)?)
}

/// Returns a thread's current members, from the cache when its version is current.
pub(super) async fn load_members<C: GenericClient>(
    cache: &MemberCache,
    client: &C,
    thread_id: ThreadId,
) -> PgResult<Arc<[UserId]>> {
    // One statement, one snapshot: the version and the inline list agree.
    let row = query_opt(
        client,
        "SELECT members_version,
                CASE WHEN member_count <= $2
                     THEN ARRAY(SELECT user_id FROM members WHERE thread_id = $1 ORDER BY user_id) END
         FROM threads WHERE id = $1",
        &[thread_id.as_uuid(), &INLINE_MEMBERS],
    )
    .await?
    .ok_or(StoreError::ThreadNotFound)?;
    let inline: Option<Vec<Uuid>> = row.try_get(1)?;
    resolve_members(cache, client, thread_id, row.try_get(0)?, inline).await
}

/// Turns what a head query read (the members version, and the list when the thread is
/// small) into the member list: inline, cached at that version, or read now.
pub(super) async fn resolve_members<C: GenericClient>(
    cache: &MemberCache,
    client: &C,
    thread_id: ThreadId,
    version: i64,
    inline: Option<Vec<Uuid>>,
) -> PgResult<Arc<[UserId]>> {
    if let Some(ids) = inline {
        return Ok(ids.into_iter().map(UserId::from_uuid).collect());
    }
    if let Some(members) = cache.get(thread_id, version) {
        return Ok(members);
    }
    let row = query_opt(
        client,
        "SELECT members_version,
                ARRAY(SELECT user_id FROM members WHERE thread_id = $1 ORDER BY user_id)
         FROM threads WHERE id = $1",
        &[thread_id.as_uuid()],
    )
    .await?
    .ok_or(StoreError::ThreadNotFound)?;
    let members: Arc<[UserId]> = user_ids(&row, 1)?.into();
    cache.put(thread_id, row.try_get(0)?, members.clone());
    Ok(members)
}

pub(super) async fn list_threads(shared: &Shared, user_id: UserId) -> PgResult<Vec<ThreadSummary>> {
    let client = shared.client().await?;
    let rows = query(
        &client,
        "SELECT t.id, t.kind, t.last_seq, t.updated_at,
                m.last_read_seq, m.last_delivered_seq, m.muted, m.pinned, m.archived, m.nickname,
                m.role, m.joined_seq,
                t.title, t.topic, t.avatar, t.share_history, t.member_count, t.closed,
                p.user_id, u.username, p.last_read_seq, p.last_delivered_seq,
                msg.id, msg.thread_id, msg.seq, msg.sender_id, msg.sender_device_id,
                msg.client_msg_id, msg.kind, msg.body, msg.created_at
         FROM members m
         JOIN threads t ON t.id = m.thread_id
         LEFT JOIN members p ON t.kind = 'direct' AND p.thread_id = t.id AND p.user_id <> m.user_id
         LEFT JOIN users u ON u.id = p.user_id
         LEFT JOIN messages msg ON msg.thread_id = t.id AND msg.seq = t.last_seq AND t.last_seq > m.joined_seq
         WHERE m.user_id = $1
         ORDER BY t.updated_at DESC, t.id",
        &[user_id.as_uuid()],
    )
    .await?;
    rows.iter()
        .map(|row| {
            let thread_id = ThreadId::from_uuid(row.try_get(0)?);
            let kind = thread_kind(row.try_get(1)?);
            let last_seq = to_u64(row.try_get(2)?);
            let joined_seq = to_u64(row.try_get(11)?);
            // Markers start at joined_seq, so unread never counts what the member cannot see.
            let read_seq = to_u64(row.try_get(4)?).max(joined_seq);
            let peer = match row.try_get::<_, Option<Uuid>>(18)? {
                Some(id) => Some(UserRef {
                    user_id: UserId::from_uuid(id),
                    username: row.try_get(19)?,
                }),
                None => None,
            };
            let (peer_read_seq, peer_delivered_seq) = match peer {
                Some(_) => (
                    Some(to_u64(row.try_get(20)?)),
                    Some(to_u64(row.try_get(21)?)),
                ),
                None => (None, None),
            };
            let last_message = match row.try_get::<_, Option<Uuid>>(22)? {
                Some(_) => Some(message_at(row, 22)?),
                None => None,
            };
            let (group, role) = match kind {
                ThreadKind::Group => (
                    Some(super::groups::group_at(row, thread_id, 12)?),
                    Some(Role::parse(row.try_get(10)?)),
                ),
                ThreadKind::Direct => (None, None),
            };
            Ok(ThreadSummary {
                thread_id,
                kind,
                peer,
                peer_read_seq,
                peer_delivered_seq,
                last_seq,
                last_message,
                unread: last_seq.saturating_sub(read_seq),
                muted: row.try_get(6)?,
                pinned: row.try_get(7)?,
                archived: row.try_get(8)?,
                nickname: row.try_get(9)?,
                role,
                group,
                joined_seq,
                read_seq,
                delivered_seq: to_u64(row.try_get(5)?).max(joined_seq),
                updated_at: row.try_get(3)?,
            })
        })
        .collect()
}

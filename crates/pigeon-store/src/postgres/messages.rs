//! Writing one message with the thread's next seq (a group change's system message),
//! reading pages, moving markers. Sends are batched: see [`super::batch`].

use deadpool_postgres::Transaction;
use pigeon_proto::{MarkKind, Message, ThreadId, UserEvent, UserId};
use uuid::Uuid;

use super::Shared;
use super::error::{Error, PgResult};
use super::members::{INLINE_MEMBERS, MemberCache};
use super::sql::{execute, message_at, query, query_one, query_opt};
use super::threads::resolve_members;
use super::user_events::append_user_events;
use crate::common::{message_kind_str, to_i64, to_u64};
use crate::{MarkerUpdate, PageFrom, SeqRange, StoreError};

/// Locks the thread's row until COMMIT: senders and group changes on every node queue here.
pub(super) const LOCK_THREAD: &str = "SELECT 1 FROM threads WHERE id = $1 FOR NO KEY UPDATE";

/// Writes a message whose seq is the thread's `last_seq + 1`, read under the thread row's
/// lock, with `body` as stored; moves the thread's head and the sender's markers to it.
/// Fails with [`Error::Retry`] when a concurrent transaction took the dedupe key.
pub(super) async fn write_message(
    tx: &Transaction<'_>,
    message: &Message,
    body: &str,
) -> PgResult<()> {
    let thread_id = message.thread_id.as_uuid();
    let sender = message.sender_id.as_uuid();
    let seq = to_i64(message.seq);
    let (head, key, _, _) = futures::future::try_join4(
        query_one(
            tx,
            "UPDATE threads SET last_seq = last_seq + 1, updated_at = greatest(updated_at, $2)
             WHERE id = $1 RETURNING last_seq",
            &[thread_id, &message.created_at],
        ),
        execute(
            tx,
            "INSERT INTO message_keys (sender_id, client_msg_id, thread_id, seq) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[sender, &message.client_msg_id, thread_id, &seq],
        ),
        execute(
            tx,
            "INSERT INTO messages (thread_id, seq, id, sender_id, sender_device_id, client_msg_id, kind, body, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                thread_id,
                &seq,
                message.message_id.as_uuid(),
                sender,
                message.sender_device_id.as_uuid(),
                &message.client_msg_id,
                &message_kind_str(message.kind),
                &body,
                &message.created_at,
            ],
        ),
        // The sender has seen their own message (a no-op when they just left).
        execute(
            tx,
            "UPDATE members SET last_read_seq = greatest(last_read_seq, $3),
                                last_delivered_seq = greatest(last_delivered_seq, $3)
             WHERE thread_id = $1 AND user_id = $2",
            &[thread_id, sender, &seq],
        ),
    ).await?;
    if key == 0 {
        // The same (sender, client_msg_id) was just stored for another thread; running
        // again finds it and answers with it.
        return Err(Error::Retry);
    }
    let assigned: i64 = head.try_get(0)?;
    if assigned != seq {
        return Err(StoreError::Internal(format!(
            "thread {} moved from the seq read under its lock ({seq} expected, {assigned} assigned)",
            message.thread_id
        ))
        .into());
    }
    Ok(())
}

pub(super) async fn list_messages(
    shared: &Shared,
    thread_id: ThreadId,
    range: SeqRange,
    from: PageFrom,
    limit: u32,
) -> PgResult<Vec<Message>> {
    let sql = match from {
        PageFrom::Oldest => {
            "SELECT id, thread_id, seq, sender_id, sender_device_id, client_msg_id, kind, body, created_at
             FROM messages WHERE thread_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq ASC LIMIT $4"
        }
        PageFrom::Newest => {
            "SELECT id, thread_id, seq, sender_id, sender_device_id, client_msg_id, kind, body, created_at
             FROM messages WHERE thread_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq DESC LIMIT $4"
        }
    };
    let client = shared.client().await?;
    let rows = query(
        &client,
        sql,
        &[
            thread_id.as_uuid(),
            &to_i64(range.after),
            &to_i64(range.before),
            &i64::from(limit),
        ],
    )
    .await?;
    let mut messages = rows
        .iter()
        .map(|row| message_at(row, 0))
        .collect::<PgResult<Vec<_>>>()?;
    if from == PageFrom::Newest {
        messages.reverse();
    }
    Ok(messages)
}

pub(super) async fn set_marker(
    cache: &MemberCache,
    tx: &Transaction<'_>,
    thread_id: ThreadId,
    user_id: UserId,
    kind: MarkKind,
    seq: u64,
) -> PgResult<MarkerUpdate> {
    let (head, marker) = futures::future::try_join(
        query_opt(
            tx,
            "SELECT last_seq, members_version,
                    CASE WHEN member_count <= $2
                         THEN ARRAY(SELECT user_id FROM members WHERE thread_id = $1 ORDER BY user_id) END
             FROM threads WHERE id = $1",
            &[thread_id.as_uuid(), &INLINE_MEMBERS],
        ),
        // The member's row stays locked until COMMIT: markers of one member move one at a time.
        query_opt(
            tx,
            "SELECT last_read_seq, last_delivered_seq FROM members
             WHERE thread_id = $1 AND user_id = $2 FOR NO KEY UPDATE",
            &[thread_id.as_uuid(), user_id.as_uuid()],
        ),
    ).await?;
    let head = head.ok_or(StoreError::ThreadNotFound)?;
    let marker = marker.ok_or(StoreError::NotMember)?;
    let inline: Option<Vec<Uuid>> = head.try_get(2)?;
    let members = resolve_members(cache, tx, thread_id, head.try_get(1)?, inline).await?;
    let seq = seq.min(to_u64(head.try_get(0)?));
    let current = to_u64(marker.try_get(match kind {
        MarkKind::Read => 0,
        MarkKind::Delivered => 1,
    })?);
    if seq <= current {
        return Ok(MarkerUpdate {
            seq: current,
            changed: false,
            members,
            user_event: None,
        });
    }
    let sql = match kind {
        MarkKind::Read => {
            "UPDATE members SET last_read_seq = $3, last_delivered_seq = greatest(last_delivered_seq, $3)
             WHERE thread_id = $1 AND user_id = $2"
        }
        MarkKind::Delivered => {
            "UPDATE members SET last_delivered_seq = $3 WHERE thread_id = $1 AND user_id = $2"
        }
    };
    execute(
        tx,
        sql,
        &[thread_id.as_uuid(), user_id.as_uuid(), &to_i64(seq)],
    )
    .await?;
    let user_event = match kind {
        MarkKind::Read => {
            let mut records =
                append_user_events(tx, vec![(user_id, UserEvent::Read { thread_id, seq })]).await?;
            records.pop().map(|(_, record)| record)
        }
        MarkKind::Delivered => None,
    };
    Ok(MarkerUpdate {
        seq,
        changed: true,
        members,
        user_event,
    })
}

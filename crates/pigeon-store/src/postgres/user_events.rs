//! The per-user event log for multi-device sync, bounded to the newest events.

use std::collections::HashMap;

use deadpool_postgres::Transaction;
use pigeon_proto::{UserEvent, UserEventRecord, UserId};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::Shared;
use super::error::PgResult;
use super::sql::{execute, lock_users, query, query_one};
use crate::common::{now_ms, to_i64, to_u64, user_events_prune_upto};
use crate::{StoreError, UserEventsPage};

/// Appends events to users' logs (a user may get several) and returns the records in the
/// order given, each user's in consecutive seqs. Each user's `last_event_seq` is taken under
/// their row's lock, in id order, so concurrent writers of one log get consecutive seqs and
/// never deadlock here.
pub(super) async fn append_user_events(
    tx: &Transaction<'_>,
    events: Vec<(UserId, UserEvent)>,
) -> PgResult<Vec<(UserId, UserEventRecord)>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut counts: HashMap<UserId, i64> = HashMap::with_capacity(events.len());
    for (user, _) in &events {
        *counts.entry(*user).or_default() += 1;
    }
    let (ids, added): (Vec<Uuid>, Vec<i64>) = counts
        .iter()
        .map(|(user, count)| (*user.as_uuid(), *count))
        .unzip();
    lock_users(tx, &ids).await?;
    let rows = query(
        tx,
        "UPDATE users u SET last_event_seq = u.last_event_seq + c.added
             FROM unnest($1::uuid[], $2::bigint[]) AS c(id, added)
             WHERE u.id = c.id
             RETURNING u.id, u.last_event_seq, c.added",
        &[&ids, &added],
    )
    .await?;
    // Each user's next seq.
    let mut next = HashMap::with_capacity(rows.len());
    for row in &rows {
        let user = UserId::from_uuid(row.try_get(0)?);
        let last = to_u64(row.try_get(1)?);
        let added: i64 = row.try_get(2)?;
        next.insert(user, last + 1 - to_u64(added));
    }

    let mut records = Vec::with_capacity(events.len());
    let (mut user_column, mut seq_column, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
    // Per user, the furthest any of their new seqs prunes to.
    let mut prune: HashMap<UserId, u64> = HashMap::new();
    for (user, event) in events {
        let seq = next.get_mut(&user).ok_or(StoreError::UnknownUser)?;
        let this = *seq;
        *seq += 1;
        if let Some(upto) = user_events_prune_upto(this) {
            let furthest = prune.entry(user).or_default();
            *furthest = (*furthest).max(upto);
        }
        bodies
            .push(serde_json::to_string(&event).map_err(|e| StoreError::Internal(e.to_string()))?);
        user_column.push(*user.as_uuid());
        seq_column.push(to_i64(this));
        records.push((user, UserEventRecord { seq: this, event }));
    }
    let (prune_users, prune_upto): (Vec<Uuid>, Vec<i64>) = prune
        .iter()
        .map(|(user, upto)| (*user.as_uuid(), to_i64(*upto)))
        .unzip();
    let now = now_ms();
    let insert_params: [&(dyn ToSql + Sync); 4] = [&user_column, &seq_column, &bodies, &now];
    let insert = execute(
        tx,
        "INSERT INTO user_events (user_id, seq, body, created_at)
         SELECT user_id, seq, body, $4 FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS e(user_id, seq, body)",
        &insert_params,
    );
    if prune_users.is_empty() {
        insert.await?;
    } else {
        let prune_params: [&(dyn ToSql + Sync); 2] = [&prune_users, &prune_upto];
        let prune = execute(
            tx,
            "DELETE FROM user_events e USING unnest($1::uuid[], $2::bigint[]) AS p(user_id, upto)
             WHERE e.user_id = p.user_id AND e.seq <= p.upto",
            &prune_params,
        );
        futures::future::try_join(insert, prune).await?;
    }
    Ok(records)
}

pub(super) async fn list_user_events(
    shared: &Shared,
    user_id: UserId,
    after: u64,
    limit: u32,
) -> PgResult<UserEventsPage> {
    let client = shared.client().await?;
    let (bounds, rows) = futures::future::try_join(
        query_one(
            &client,
            "SELECT min(seq), max(seq) FROM user_events WHERE user_id = $1",
            &[user_id.as_uuid()],
        ),
        query(
            &client,
            "SELECT seq, body FROM user_events WHERE user_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            &[user_id.as_uuid(), &to_i64(after), &i64::from(limit)],
        ),
    ).await?;
    let oldest = to_u64(bounds.try_get::<_, Option<i64>>(0)?.unwrap_or(0));
    let last_seq = to_u64(bounds.try_get::<_, Option<i64>>(1)?.unwrap_or(0));
    // Pruned events between the client's cursor and the oldest kept one: reset.
    let reset = oldest > after.saturating_add(1) && last_seq > after;
    let events = rows
        .iter()
        .map(|row| {
            let body: &str = row.try_get(1)?;
            let event = serde_json::from_str(body)
                .map_err(|e| StoreError::Internal(format!("user event: {e}")))?;
            Ok(UserEventRecord {
                seq: to_u64(row.try_get(0)?),
                event,
            })
        })
        .collect::<PgResult<Vec<_>>>()?;
    Ok(UserEventsPage {
        events,
        last_seq,
        reset,
    })
}

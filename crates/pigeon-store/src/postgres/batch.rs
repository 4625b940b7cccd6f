//! Sends that wait at the same time go to PostgreSQL together, as the SQLite writer does.
//!
//! One send alone was about ten statements (BEGIN, the lock, the rules, the dedupe key,
//! four writes, COMMIT), each a round trip that wakes a backend, parses, plans and sets up
//! an executor. PostgreSQL spent about 300 µs of CPU per message on that, which capped a
//! node near 4,000 messages/s with the database's cores full. Here the sends waiting in
//! the queue (up to [`MAX_BATCH`]) share one transaction of the same shape: every
//! statement takes arrays and handles the whole batch, so the cost per message shrinks
//! with the batch.
//!
//! Order and hooks are as for a single send: the batch holds the turns of all its threads
//! (see [`super::locks`]) from before it locks their rows until its hooks have run, and
//! its messages take their seqs, and run their hooks, in the order they were queued.
//! Up to [`IN_FLIGHT`] batches run at once; one waits for another where their threads
//! share a turn stripe, which for big batches is most of the time. A rule broken by one
//! send (not a member, blocked, a closed group, an unknown thread) is that send's answer;
//! the others go on. Should the transaction fail for another reason, the sends run again
//! one by one, so one bad send cannot fail the rest.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deadpool_postgres::Transaction;
use pigeon_proto::{Message, MessageId, ThreadId, UserId};
use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

use super::Shared;
use super::error::{Error, PgResult};
use super::members::{INLINE_MEMBERS, MemberCache};
use super::sql::{execute, message_at, query};
use super::threads::{load_members, resolve_members};
use crate::common::{message_kind_str, now_ms, to_i64, to_u64};
use crate::{Appended, CommitHook, NewMessage, Result, StoreError};

/// Most sends in one transaction (a call's sends are never split, so one may go past it).
const MAX_BATCH: usize = 256;
/// Most batches in their transactions at once (of the pool's connections).
const IN_FLIGHT: u32 = 4;

/// One queued send.
struct Job {
    message: NewMessage,
    hook: CommitHook,
    reply: oneshot::Sender<Result<Appended>>,
}

/// The queue of sends, and the task that batches it. One item is the sends of one call:
/// they go into the same batch, in order.
pub(super) struct Appender {
    jobs: mpsc::UnboundedSender<Vec<Job>>,
    slots: Arc<Semaphore>,
}

impl Appender {
    pub(super) fn start(shared: Arc<Shared>) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(IN_FLIGHT as usize));
        tokio::spawn(batch_loop(shared, queue, slots.clone()));
        Self { jobs, slots }
    }

    /// Queues a send and waits for its outcome. The hook runs as its batch commits, even
    /// if the caller stops waiting.
    pub(super) async fn append(&self, message: NewMessage, hook: CommitHook) -> Result<Appended> {
        let mut outcomes = self.append_all(vec![(message, hook)]).await;
        outcomes
            .pop()
            .unwrap_or_else(|| Err(StoreError::Internal("a send without an outcome".into())))
    }

    /// Queues several sends as one item, so they share a batch in this order, and waits
    /// for their outcomes.
    pub(super) async fn append_all(
        &self,
        messages: Vec<(NewMessage, CommitHook)>,
    ) -> Vec<Result<Appended>> {
        if messages.is_empty() {
            return Vec::new();
        }
        let mut jobs = Vec::with_capacity(messages.len());
        let mut outcomes = Vec::with_capacity(messages.len());
        for (message, hook) in messages {
            let (reply, outcome) = oneshot::channel();
            jobs.push(Job {
                message,
                hook,
                reply,
            });
            outcomes.push(outcome);
        }
        if self.jobs.send(jobs).is_err() {
            return outcomes
                .iter()
                .map(|_| Err(StoreError::Unavailable("the store is closed".into())))
                .collect();
        }
        let mut answers = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            answers.push(outcome.await.unwrap_or_else(|_| {
                Err(StoreError::Internal(
                    "a send's batch ended without an answer".into(),
                ))
            }));
        }
        answers
    }

    /// Waits for the batches in their transactions to finish, and their hooks to run.
    pub(super) async fn drain(&self) {
        let _all = self.slots.acquire_many(IN_FLIGHT).await;
    }
}

/// Takes every send waiting (once a batch may start) and runs them as one batch.
async fn batch_loop(
    shared: Arc<Shared>,
    mut queue: mpsc::UnboundedReceiver<Vec<Job>>,
    slots: Arc<Semaphore>,
) {
    let batch_size = metrics::histogram!("pigeon_store_batch_size");
    while let Some(first) = queue.recv().await {
        // Waiting for a slot first lets the queue fill while the database is busy.
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the batch semaphore is never closed");
        let mut jobs = first;
        while jobs.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(more) => jobs.extend(more),
                Err(_) => break,
            }
        }
        batch_size.record(jobs.len() as f64);
        let shared = shared.clone();
        tokio::spawn(async move {
            run_batch(&shared, jobs).await;
            drop(slot);
        });
    }
}

async fn run_batch(shared: &Shared, jobs: Vec<Job>) {
    // The messages apart from the hooks, which are `Send` but not `Sync`.
    let (messages, answers): (Vec<NewMessage>, Vec<_>) = jobs
        .into_iter()
        .map(|job| (job.message, (job.hook, job.reply)))
        .unzip();
    let _turns = shared
        .turns
        .take_all(messages.iter().map(|message| message.thread_id))
        .await;
    let outcomes = match commit(shared, &messages).await {
        Ok(outcomes) => outcomes,
        // Something the rules did not catch failed the whole transaction (after its
        // retries). One send must not fail the others: each runs again on its own, in
        // order, still under the batch's turns.
        Err(error) if messages.len() > 1 => {
            tracing::warn!(error = %StoreError::from(error), sends = messages.len(),
                "a batch of sends failed; running them one at a time");
            let mut outcomes = Vec::with_capacity(messages.len());
            for message in messages.chunks(1) {
                outcomes.push(match commit(shared, message).await {
                    Ok(mut one) => one.pop().unwrap_or(Err(StoreError::Internal(
                        "a send's batch gave no outcome".into(),
                    ))),
                    Err(error) => Err(error.into()),
                });
            }
            outcomes
        }
        Err(error) => vec![Err(error.into())],
    };
    for ((hook, reply), outcome) in answers.into_iter().zip(outcomes) {
        if let Ok(appended) = &outcome {
            if !appended.duplicate {
                shared.stored.increment(1);
            }
            hook(appended);
        }
        let _ = reply.send(outcome);
    }
}

/// Appends `messages` in one transaction (run again on a conflict); one outcome each.
async fn commit(shared: &Shared, messages: &[NewMessage]) -> PgResult<Vec<Result<Appended>>> {
    shared
        .transaction((&shared.members, messages), |tx, (members, messages)| {
            Box::pin(append_batch(members, tx, messages))
        })
        .await
}

/// A thread's head as read under its lock, moved along as the batch takes seqs.
struct Head {
    direct: bool,
    closed: bool,
    last_seq: u64,
    members_version: i64,
    inline: Option<Vec<Uuid>>,
    members: Option<Arc<[UserId]>>,
}

/// The batch's new rows, column by column, as array parameters.
#[derive(Default)]
struct Rows {
    thread: Vec<Uuid>,
    seq: Vec<i64>,
    id: Vec<Uuid>,
    sender: Vec<Uuid>,
    device: Vec<Uuid>,
    client_msg_id: Vec<String>,
    kind: Vec<&'static str>,
    body: Vec<String>,
    created_at: Vec<i64>,
}

/// Appends the batch in the current transaction; one outcome per message, in order.
async fn append_batch(
    cache: &MemberCache,
    tx: &Transaction<'_>,
    batch: &[NewMessage],
) -> PgResult<Vec<Result<Appended>>> {
    // Every statement below finds at most a few hundred rows by primary key: index
    // lookups, always, planned once per connection. Left to itself the planner cached, on
    // a fresh database, plans that hash-joined whole tables it believed tiny; once
    // `message_keys` had grown, each batch read all of it (73 million rows read by 8,000
    // scans in a 10 s run). Then, with the joins switched off, it planned every statement
    // anew each time: a fifth of the database's CPU.
    tx.batch_execute(
        "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off;
         SET LOCAL enable_mergejoin = off; SET LOCAL plan_cache_mode = force_generic_plan",
    )
    .await?;
    let mut thread_ids: Vec<Uuid> = batch.iter().map(|m| *m.thread_id.as_uuid()).collect();
    thread_ids.sort_unstable();
    thread_ids.dedup();
    // In id order, so batches on other nodes that lock overlapping threads queue instead
    // of deadlocking. The reads below start after the locks are held, so they see every
    // change committed before.
    query(
        tx,
        "SELECT 1 FROM threads WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        &[&thread_ids],
    )
    .await?;
    let threads: Vec<Uuid> = batch.iter().map(|m| *m.thread_id.as_uuid()).collect();
    let senders: Vec<Uuid> = batch.iter().map(|m| *m.sender_id.as_uuid()).collect();
    let keys: Vec<&str> = batch.iter().map(|m| m.client_msg_id.as_str()).collect();
    let (head_rows, member_rows, blocked_rows, existing_rows) = futures::future::try_join4(
        query(
            tx,
            "SELECT t.id, t.kind = 'direct', t.closed, t.last_seq, t.members_version,
                    CASE WHEN t.member_count <= $2
                         THEN ARRAY(SELECT user_id FROM members WHERE thread_id = t.id ORDER BY user_id) END
             FROM threads t WHERE t.id = ANY($1)",
            &[&thread_ids, &INLINE_MEMBERS],
        ),
        query(
            tx,
            "SELECT m.thread_id, m.user_id
             FROM unnest($1::uuid[], $2::uuid[]) AS s(thread_id, user_id)
             JOIN members m ON m.thread_id = s.thread_id AND m.user_id = s.user_id",
            &[&threads, &senders],
        ),
        // A user who blocked the sender gets no direct messages from them.
        query(
            tx,
            "SELECT s.thread_id, s.sender
             FROM unnest($1::uuid[], $2::uuid[]) AS s(thread_id, sender)
             JOIN threads t ON t.id = s.thread_id AND t.kind = 'direct'
             JOIN members p ON p.thread_id = s.thread_id AND p.user_id <> s.sender
             JOIN contacts c ON c.owner_id = p.user_id AND c.peer_id = s.sender AND c.blocked",
            &[&threads, &senders],
        ),
        query(
            tx,
            "SELECT k.sender_id, k.client_msg_id,
                    m.id, m.thread_id, m.seq, m.sender_id, m.sender_device_id, m.client_msg_id,
                    m.kind, m.body, m.created_at
             FROM unnest($1::uuid[], $2::text[]) AS s(sender_id, client_msg_id)
             JOIN message_keys k ON k.sender_id = s.sender_id AND k.client_msg_id = s.client_msg_id
             JOIN messages m ON m.thread_id = k.thread_id AND m.seq = k.seq",
            &[&senders, &keys],
        ),
    )
    .await?;

    let mut heads = HashMap::with_capacity(head_rows.len());
    for row in &head_rows {
        heads.insert(
            ThreadId::from_uuid(row.try_get(0)?),
            Head {
                direct: row.try_get(1)?,
                closed: row.try_get(2)?,
                last_seq: to_u64(row.try_get(3)?),
                members_version: row.try_get(4)?,
                inline: row.try_get(5)?,
                members: None,
            },
        );
    }
    let pairs = |rows: &[tokio_postgres::Row]| -> PgResult<HashSet<(Uuid, Uuid)>> {
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    };
    let is_member = pairs(&member_rows)?;
    let blocked = pairs(&blocked_rows)?;
    let mut existing: HashMap<(Uuid, String), Message> = HashMap::new();
    for row in &existing_rows {
        existing.insert((row.try_get(0)?, row.try_get(1)?), message_at(row, 2)?);
    }

    let mut outcomes = Vec::with_capacity(batch.len());
    let mut rows = Rows::default();
    // The newest seq per thread, and per (thread, sender) for the sender's markers.
    let mut thread_heads: HashMap<Uuid, (i64, i64)> = HashMap::new();
    let mut markers: HashMap<(Uuid, Uuid), i64> = HashMap::new();
    for msg in batch {
        let thread = *msg.thread_id.as_uuid();
        let sender = *msg.sender_id.as_uuid();
        let Some(head) = heads.get_mut(&msg.thread_id) else {
            outcomes.push(Err(StoreError::ThreadNotFound));
            continue;
        };
        if !is_member.contains(&(thread, sender)) {
            outcomes.push(Err(StoreError::NotMember));
            continue;
        }
        if head.closed {
            outcomes.push(Err(StoreError::GroupClosed));
            continue;
        }
        if head.direct && blocked.contains(&(thread, sender)) {
            outcomes.push(Err(StoreError::Blocked));
            continue;
        }
        let members = match &head.members {
            Some(members) => members.clone(),
            None => {
                let members = resolve_members(
                    cache,
                    tx,
                    msg.thread_id,
                    head.members_version,
                    head.inline.take(),
                )
                .await?;
                head.members = Some(members.clone());
                members
            }
        };
        // Stored before, or earlier in this batch: the first one is the answer.
        if let Some(message) = existing.get(&(sender, msg.client_msg_id.clone())) {
            let members = if message.thread_id == msg.thread_id {
                members
            } else if let Some(other) = heads
                .get(&message.thread_id)
                .and_then(|h| h.members.clone())
            {
                other
            } else {
                load_members(cache, tx, message.thread_id).await?
            };
            outcomes.push(Ok(Appended {
                message: message.clone(),
                duplicate: true,
                members,
            }));
            continue;
        }

        head.last_seq += 1;
        let message = Message {
            thread_id: msg.thread_id,
            seq: head.last_seq,
            message_id: MessageId::new(),
            sender_id: msg.sender_id,
            sender_device_id: msg.sender_device_id,
            client_msg_id: msg.client_msg_id.clone(),
            kind: msg.kind,
            body: msg.body.clone(),
            system: None,
            created_at: now_ms(),
        };
        let seq = to_i64(message.seq);
        rows.thread.push(thread);
        rows.seq.push(seq);
        rows.id.push(*message.message_id.as_uuid());
        rows.sender.push(sender);
        rows.device.push(*message.sender_device_id.as_uuid());
        rows.client_msg_id.push(message.client_msg_id.clone());
        rows.kind.push(message_kind_str(message.kind));
        rows.body.push(message.body.clone());
        rows.created_at.push(message.created_at);
        thread_heads.insert(thread, (seq, message.created_at));
        markers.insert((thread, sender), seq);
        existing.insert((sender, message.client_msg_id.clone()), message.clone());
        outcomes.push(Ok(Appended {
            message,
            duplicate: false,
            members,
        }));
    }
    if rows.thread.is_empty() {
        return Ok(outcomes);
    }
    write_rows(tx, &rows, &thread_heads, &markers).await?;
    Ok(outcomes)
}

/// Writes the batch's messages and dedupe keys, moves its threads' heads and its senders'
/// read markers: four statements, whatever the batch's size.
async fn write_rows(
    tx: &Transaction<'_>,
    rows: &Rows,
    thread_heads: &HashMap<Uuid, (i64, i64)>,
    markers: &HashMap<(Uuid, Uuid), i64>,
) -> PgResult<()> {
    let (head_ids, head_seqs, head_times): (Vec<Uuid>, Vec<i64>, Vec<i64>) = thread_heads
        .iter()
        .map(|(id, (seq, at))| (*id, *seq, *at))
        .collect();
    let (marker_threads, marker_users, marker_seqs): (Vec<Uuid>, Vec<Uuid>, Vec<i64>) = markers
        .iter()
        .map(|((thread, user), seq)| (*thread, *user, *seq))
        .collect();
    let (_, keys, moved, _) = futures::future::try_join4(
        execute(
            tx,
            "INSERT INTO messages (thread_id, seq, id, sender_id, sender_device_id, client_msg_id, kind, body, created_at)
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::uuid[], $5::uuid[],
                                  $6::text[], $7::text[], $8::text[], $9::bigint[])",
            &[
                &rows.thread,
                &rows.seq,
                &rows.id,
                &rows.sender,
                &rows.device,
                &rows.client_msg_id,
                &rows.kind,
                &rows.body,
                &rows.created_at,
            ],
        ),
        execute(
            tx,
            "INSERT INTO message_keys (sender_id, client_msg_id, thread_id, seq)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::bigint[])
             ON CONFLICT DO NOTHING",
            &[&rows.sender, &rows.client_msg_id, &rows.thread, &rows.seq],
        ),
        execute(
            tx,
            "UPDATE threads t SET last_seq = v.seq, updated_at = greatest(t.updated_at, v.at)
             FROM unnest($1::uuid[], $2::bigint[], $3::bigint[]) AS v(id, seq, at)
             WHERE t.id = v.id",
            &[&head_ids, &head_seqs, &head_times],
        ),
        // The sender has seen their own message.
        execute(
            tx,
            "UPDATE members m SET last_read_seq = greatest(m.last_read_seq, v.seq),
                                  last_delivered_seq = greatest(m.last_delivered_seq, v.seq)
             FROM unnest($1::uuid[], $2::uuid[], $3::bigint[]) AS v(thread_id, user_id, seq)
             WHERE m.thread_id = v.thread_id AND m.user_id = v.user_id",
            &[&marker_threads, &marker_users, &marker_seqs],
        ),
    )
    .await?;
    if keys != rows.thread.len() as u64 {
        // A key was just stored by a concurrent transaction (another batch, here or on
        // another node); running again finds it and answers with it.
        return Err(Error::Retry);
    }
    if moved != head_ids.len() as u64 {
        return Err(StoreError::Internal(format!(
            "{} of {} threads moved their head",
            moved,
            head_ids.len()
        ))
        .into());
    }
    Ok(())
}

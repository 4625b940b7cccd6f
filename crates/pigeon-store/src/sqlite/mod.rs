//! The embedded SQLite backend: one writer thread with group commit, a pool of readers,
//! and one thread for the session-token lookup.
//!
//! Every write is a job sent to the writer thread. The writer takes all jobs waiting,
//! runs each in its own savepoint inside one transaction, writes per-thread metadata once,
//! commits (fsync, `synchronous=FULL`), and only then answers the jobs. Per-thread `seq`s
//! and member lists are cached in the writer and reloaded from the database on a miss,
//! so a send touches the messages table and nothing else per message. A thread of its
//! own copies the WAL into the database file (see [`Checkpoints`]).

use std::cell::Cell;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::TryRecvError;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_sqlite::{Pool, Runtime};
use pigeon_proto::{
    ContactAction, ContactInfo, ContactState, DeviceId, GroupInfo, MarkKind, MemberInfo, Message,
    MessageId, MessageKind, Role, ThreadId, ThreadKind, ThreadSettings, ThreadSummary, UserEvent,
    UserEventRecord, UserId, UserRef,
};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use crate::common::{
    decode_body, message_kind, message_kind_str, now_ms, thread_kind, to_i64, to_u64,
};
use crate::{
    Actor, Appended, CommitHook, ContactChanged, Device, GroupChange, GroupChanged, GroupLimits,
    Hook, MarkerUpdate, Membership, NewGroup, NewMessage, PageFrom, Result, SeqRange,
    SettingsPatch, Store, StoreError, User, UserEventsPage,
};

mod social;

mod embedded {
    refinery::embed_migrations!("migrations/sqlite");
}

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 2048;
/// Jobs that may wait for the writer before senders are slowed down.
const QUEUE_CAPACITY: usize = 16 * 1024;

/// Settings of the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The database file; created with its folder if missing.
    pub path: PathBuf,
    /// Reader connections in the pool.
    pub readers: usize,
    /// Uncopied WAL pages at which the log is copied into the database file. Every page a
    /// transaction reads is looked up in the uncopied part of the log first, so a long one
    /// slows every transaction.
    pub checkpoint_pages: u32,
}

impl SqliteConfig {
    /// Uses `pigeon.db` inside `data_dir`.
    pub fn in_dir(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join("pigeon.db"),
            readers: 4,
            checkpoint_pages: 4000,
        }
    }
}

/// The embedded store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    jobs: mpsc::Sender<Command>,
    readers: Pool,
    lookups: std::sync::mpsc::Sender<Lookup>,
}

/// A point lookup for the lookup thread.
type Lookup = Box<dyn FnOnce(&Connection) + Send>;

/// A unit of work for the writer: runs inside a savepoint and returns whether it succeeded
/// (else its savepoint is rolled back) and what to do once the transaction's fate is known.
type Job = Box<dyn FnOnce(&Connection, &mut WriterState) -> (bool, Completion) + Send>;
type Completion = Box<dyn FnOnce(Result<()>) + Send>;

enum Command {
    /// A job, and whether it needs a savepoint of its own: only jobs that can fail after a
    /// write do. A job whose only write is its last statement is atomic without one, and
    /// skipping the savepoint spares the statement journal on the hot path.
    Job(Job, Isolation),
    Close(oneshot::Sender<()>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Isolation {
    Savepoint,
    SingleWrite,
}

impl SqliteStore {
    /// Opens (or creates) the database, runs migrations and starts the writer thread.
    pub fn open(config: &SqliteConfig) -> Result<Self> {
        if let Some(dir) = config.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("create {}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(&config.path).map_err(map_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             PRAGMA cache_size = -65536;
             PRAGMA temp_store = MEMORY;",
        )
        .map_err(map_err)?;
        // Replaces SQLite's automatic checkpoint, which would run inside a commit.
        conn.wal_hook(Some(note_wal_pages));
        embedded::migrations::runner()
            .run(&mut conn)
            .map_err(|e| StoreError::Internal(format!("migrations: {e}")))?;

        let readers = deadpool_sqlite::Config::new(&config.path)
            .builder(Runtime::Tokio1)
            .map_err(|e| StoreError::Internal(e.to_string()))?
            .max_size(config.readers.max(1))
            .build()
            .map_err(|e| StoreError::Internal(e.to_string()))?;

        let lookup_conn = Connection::open_with_flags(
            &config.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(map_err)?;
        lookup_conn
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(map_err)?;
        let (lookups_tx, lookups_rx) = std::sync::mpsc::channel::<Lookup>();
        std::thread::Builder::new()
            .name("pigeon-sqlite-lookups".into())
            .spawn(move || {
                // Takes whatever is queued without sleeping between: under load (a burst of
                // connects) one wakeup serves many lookups. A lookup that panics fails its
                // caller only (its answer is dropped), not every lookup after it.
                while let Ok(lookup) = lookups_rx.recv() {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        lookup(&lookup_conn);
                    }));
                }
            })
            .map_err(|e| StoreError::Internal(format!("spawn lookups: {e}")))?;

        let checkpoints = Checkpoints::start(&config.path, config.checkpoint_pages)?;
        let (jobs_tx, jobs_rx) = mpsc::channel(QUEUE_CAPACITY);
        std::thread::Builder::new()
            .name("pigeon-sqlite-writer".into())
            .spawn(move || run_writer(conn, jobs_rx, checkpoints))
            .map_err(|e| StoreError::Internal(format!("spawn writer: {e}")))?;
        Ok(Self {
            jobs: jobs_tx,
            readers,
            lookups: lookups_tx,
        })
    }

    /// Runs `work` on the writer thread inside the next transaction; resolves after commit.
    async fn write<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut WriterState) -> Result<T> + Send + 'static,
    {
        self.write_then(work, |_| {}).await
    }

    /// Like [`Self::write`], and calls `after_commit` on the writer thread once the work is
    /// committed: in commit order, before the future resolves.
    async fn write_then<T, F, A>(&self, work: F, after_commit: A) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut WriterState) -> Result<T> + Send + 'static,
        A: FnOnce(&T) + Send + 'static,
    {
        self.submit(work, after_commit, Isolation::Savepoint).await
    }

    async fn submit<T, F, A>(&self, work: F, after_commit: A, isolation: Isolation) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut WriterState) -> Result<T> + Send + 'static,
        A: FnOnce(&T) + Send + 'static,
    {
        committed(self.enqueue(work, after_commit, isolation).await?).await
    }

    /// Queues a job for the writer; the receiver gets its outcome after the commit.
    async fn enqueue<T, F, A>(
        &self,
        work: F,
        after_commit: A,
        isolation: Isolation,
    ) -> Result<oneshot::Receiver<Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut WriterState) -> Result<T> + Send + 'static,
        A: FnOnce(&T) + Send + 'static,
    {
        let (done_tx, done_rx) = oneshot::channel();
        let job: Job = Box::new(move |conn, state| {
            let result = work(conn, state);
            let ok = result.is_ok();
            let completion: Completion = Box::new(move |committed: Result<()>| {
                let result = committed.and(result);
                if let Ok(value) = &result {
                    after_commit(value);
                }
                let _ = done_tx.send(result);
            });
            (ok, completion)
        });
        self.jobs
            .send(Command::Job(job, isolation))
            .await
            .map_err(|_| StoreError::Unavailable("store is closed".into()))?;
        Ok(done_rx)
    }

    /// Runs a point lookup (one indexed row, nothing that can take long: everything queued
    /// behind it waits) on the one lookup thread. The pool hands every read to a blocking
    /// thread, and those handoffs' context switches were a third of the server's CPU while
    /// sockets connected; one thread draining a queue wakes once per burst instead. Used
    /// for the session-token lookup of every connect and HTTP request.
    async fn lookup<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (done_tx, done_rx) = oneshot::channel();
        self.lookups
            .send(Box::new(move |conn| {
                let _ = done_tx.send(work(conn));
            }))
            .map_err(|_| StoreError::Unavailable("store is closed".into()))?;
        done_rx
            .await
            .map_err(|_| StoreError::Unavailable("lookup thread stopped".into()))?
    }

    /// Runs `work` on a pooled reader connection.
    async fn read<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let conn = self
            .readers
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("reader pool: {e}")))?;
        conn.interact(move |conn| work(conn))
            .await
            .map_err(|e| StoreError::Internal(format!("reader task: {e}")))?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_user(&self, username: &str, password_hash: &str) -> Result<User> {
        let user = User {
            id: UserId::new(),
            username: username.to_owned(),
            password_hash: password_hash.to_owned(),
            created_at: now_ms(),
            last_seen_at: None,
            hide_last_seen: false,
        };
        self.write(move |conn, _| {
            conn.prepare_cached(
                "INSERT INTO users (id, username, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![user.id.as_bytes(), user.username, user.password_hash, user.created_at])?;
            Ok(user)
        })
        .await
    }

    async fn get_user(&self, id: UserId) -> Result<Option<User>> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT id, username, password_hash, created_at, last_seen_at, hide_last_seen FROM users WHERE id = ?1",
                )?
                .query_row([id.as_bytes()], user_from_row)
                .optional()?)
        })
        .await
    }

    async fn get_user_by_username(&self, username: &str) -> Result<Option<User>> {
        let username = username.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT id, username, password_hash, created_at, last_seen_at, hide_last_seen FROM users WHERE username = ?1",
                )?
                .query_row([username], user_from_row)
                .optional()?)
        })
        .await
    }

    async fn set_last_seen(&self, user_id: UserId, at: i64) -> Result<()> {
        self.write(move |conn, _| {
            conn.prepare_cached("UPDATE users SET last_seen_at = ?2 WHERE id = ?1")?
                .execute(params![user_id.as_bytes(), at])?;
            Ok(())
        })
        .await
    }

    async fn create_device(
        &self,
        user_id: UserId,
        name: &str,
        token_hash: [u8; 32],
    ) -> Result<Device> {
        let device = Device {
            id: DeviceId::new(),
            user_id,
            name: name.to_owned(),
            created_at: now_ms(),
            last_seen_at: None,
        };
        self.write(move |conn, _| {
            conn.prepare_cached(
                "INSERT INTO devices (id, user_id, name, token_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                device.id.as_bytes(),
                user_id.as_bytes(),
                device.name,
                &token_hash[..],
                device.created_at
            ])?;
            Ok(device)
        })
        .await
    }

    async fn get_device_by_token(&self, token_hash: [u8; 32]) -> Result<Option<(Device, User)>> {
        self.lookup(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT d.id, d.user_id, d.name, d.created_at, d.last_seen_at,
                            u.id, u.username, u.password_hash, u.created_at, u.last_seen_at, u.hide_last_seen
                     FROM devices d JOIN users u ON u.id = d.user_id
                     WHERE d.token_hash = ?1",
                )?
                .query_row([&token_hash[..]], |row| {
                    let device = device_from_row(row)?;
                    let user = User {
                        id: UserId::from_bytes(row.get(5)?),
                        username: row.get(6)?,
                        password_hash: row.get(7)?,
                        created_at: row.get(8)?,
                        last_seen_at: row.get(9)?,
                        hide_last_seen: row.get(10)?,
                    };
                    Ok((device, user))
                })
                .optional()?)
        })
        .await
    }

    async fn list_devices(&self, user_id: UserId) -> Result<Vec<Device>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, user_id, name, created_at, last_seen_at FROM devices
                 WHERE user_id = ?1 ORDER BY created_at, id",
            )?;
            let rows = stmt.query_map([user_id.as_bytes()], device_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn delete_device(&self, user_id: UserId, device_id: DeviceId) -> Result<bool> {
        self.write(move |conn, _| {
            let n = conn
                .prepare_cached("DELETE FROM devices WHERE id = ?1 AND user_id = ?2")?
                .execute(params![device_id.as_bytes(), user_id.as_bytes()])?;
            Ok(n > 0)
        })
        .await
    }

    async fn touch_device(&self, device_id: DeviceId, at: i64) -> Result<()> {
        self.write(move |conn, _| {
            conn.prepare_cached("UPDATE devices SET last_seen_at = ?2 WHERE id = ?1")?
                .execute(params![device_id.as_bytes(), at])?;
            Ok(())
        })
        .await
    }

    async fn get_or_create_direct_thread(&self, a: UserId, b: UserId) -> Result<ThreadId> {
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        let mut pair_key = [0u8; 32];
        pair_key[..16].copy_from_slice(low.as_bytes());
        pair_key[16..].copy_from_slice(high.as_bytes());
        // The thread exists after the pair's first message: usually a read is enough.
        if let Some(id) = self
            .read(move |conn| find_direct_thread(conn, &pair_key))
            .await?
        {
            return Ok(id);
        }
        self.write(move |conn, _| {
            if let Some(id) = find_direct_thread(conn, &pair_key)? {
                return Ok(id);
            }
            let id = ThreadId::new();
            let now = now_ms();
            conn.prepare_cached(
                "INSERT INTO threads (id, kind, pair_key, created_at, updated_at) VALUES (?1, 'direct', ?2, ?3, ?3)",
            )?
            .execute(params![id.as_bytes(), &pair_key[..], now])?;
            let mut add = conn.prepare_cached(
                "INSERT INTO members (thread_id, user_id, joined_at) VALUES (?1, ?2, ?3)",
            )?;
            for user in if low == high { vec![low] } else { vec![low, high] } {
                add.execute(params![id.as_bytes(), user.as_bytes(), now])?;
            }
            Ok(id)
        })
        .await
    }

    async fn get_membership(&self, thread_id: ThreadId, user_id: UserId) -> Result<Membership> {
        self.read(move |conn| read_membership(conn, thread_id, user_id))
            .await
    }

    async fn list_presence_audience(&self, user_id: UserId) -> Result<Vec<UserId>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT p.user_id FROM members m
                 JOIN threads t ON t.id = m.thread_id AND t.member_count <= ?2
                 JOIN members p ON p.thread_id = m.thread_id AND p.user_id != m.user_id
                 WHERE m.user_id = ?1
                 UNION
                 SELECT peer_id FROM contacts WHERE owner_id = ?1 AND state = 'friend'
                 EXCEPT
                 SELECT peer_id FROM contacts WHERE owner_id = ?1 AND blocked = 1",
            )?;
            let rows = stmt.query_map(
                params![user_id.as_bytes(), crate::PRESENCE_GROUP_LIMIT],
                |row| Ok(UserId::from_bytes(row.get(0)?)),
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn can_see_presence(&self, viewer: UserId, target: UserId) -> Result<bool> {
        if viewer == target {
            return Ok(true);
        }
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT NOT EXISTS (SELECT 1 FROM contacts WHERE owner_id = ?1 AND peer_id = ?2 AND blocked = 1)
                        AND (EXISTS (SELECT 1 FROM contacts WHERE owner_id = ?1 AND peer_id = ?2 AND state = 'friend')
                             OR EXISTS (SELECT 1 FROM members a
                                        JOIN threads t ON t.id = a.thread_id AND t.member_count <= ?3
                                        JOIN members b ON b.thread_id = a.thread_id AND b.user_id = ?2
                                        WHERE a.user_id = ?1))",
                )?
                .query_row(
                    params![target.as_bytes(), viewer.as_bytes(), crate::PRESENCE_GROUP_LIMIT],
                    |row| row.get(0),
                )?)
        })
        .await
    }

    async fn is_blocked(&self, blocker: UserId, blocked: UserId) -> Result<bool> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM contacts WHERE owner_id = ?1 AND peer_id = ?2 AND blocked = 1)")?
                .query_row(params![blocker.as_bytes(), blocked.as_bytes()], |row| row.get(0))?)
        })
        .await
    }

    async fn get_members(&self, thread_id: ThreadId) -> Result<Arc<[UserId]>> {
        self.read(move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT user_id FROM members WHERE thread_id = ?1")?;
            let rows = stmt.query_map([thread_id.as_bytes()], |row| {
                Ok(UserId::from_bytes(row.get(0)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?.into())
        })
        .await
    }

    async fn append_message(&self, msg: NewMessage, on_commit: CommitHook) -> Result<Appended> {
        // The message row is the job's only write, and its last statement.
        self.submit(
            move |conn, state| append(conn, state, msg),
            on_commit,
            Isolation::SingleWrite,
        )
        .await
    }

    async fn append_messages(&self, msgs: Vec<(NewMessage, CommitHook)>) -> Vec<Result<Appended>> {
        // Queued back to back, so the writer runs them in order, mostly in one batch.
        let mut waiting = Vec::with_capacity(msgs.len());
        for (msg, on_commit) in msgs {
            waiting.push(
                self.enqueue(
                    move |conn, state| append(conn, state, msg),
                    on_commit,
                    Isolation::SingleWrite,
                )
                .await,
            );
        }
        let mut outcomes = Vec::with_capacity(waiting.len());
        for queued in waiting {
            outcomes.push(match queued {
                Ok(done) => committed(done).await,
                Err(error) => Err(error),
            });
        }
        outcomes
    }

    async fn list_messages(
        &self,
        thread_id: ThreadId,
        range: SeqRange,
        from: PageFrom,
        limit: u32,
    ) -> Result<Vec<Message>> {
        self.read(move |conn| {
            let sql = match from {
                PageFrom::Oldest => {
                    "SELECT id, thread_id, seq, sender_id, sender_device_id, client_msg_id, kind, body, created_at
                     FROM messages WHERE thread_id = ?1 AND seq > ?2 AND seq < ?3 ORDER BY seq ASC LIMIT ?4"
                }
                PageFrom::Newest => {
                    "SELECT id, thread_id, seq, sender_id, sender_device_id, client_msg_id, kind, body, created_at
                     FROM messages WHERE thread_id = ?1 AND seq > ?2 AND seq < ?3 ORDER BY seq DESC LIMIT ?4"
                }
            };
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map(
                params![thread_id.as_bytes(), to_i64(range.after), to_i64(range.before), limit],
                message_from_row,
            )?;
            let mut messages = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            if from == PageFrom::Newest {
                messages.reverse();
            }
            Ok(messages)
        })
        .await
    }

    async fn set_marker(
        &self,
        thread_id: ThreadId,
        user_id: UserId,
        kind: MarkKind,
        seq: u64,
    ) -> Result<MarkerUpdate> {
        self.write(move |conn, state| {
            let thread = state.thread(conn, thread_id)?;
            if !thread.members.contains(&user_id) {
                return Err(StoreError::NotMember);
            }
            let members = thread.members.clone();
            let seq = seq.min(thread.last_seq);
            // A send earlier in this batch may have moved the read marker without writing it yet.
            let pending = state.read_markers.get(&(thread_id, user_id)).copied().unwrap_or(0);
            let (read, delivered): (i64, i64) = conn
                .prepare_cached(
                    "SELECT last_read_seq, last_delivered_seq FROM members WHERE thread_id = ?1 AND user_id = ?2",
                )?
                .query_row(params![thread_id.as_bytes(), user_id.as_bytes()], |row| Ok((row.get(0)?, row.get(1)?)))?;
            let current = pending.max(to_u64(match kind {
                MarkKind::Read => read,
                MarkKind::Delivered => delivered,
            }));
            if seq <= current {
                return Ok(MarkerUpdate { seq: current, changed: false, members, user_event: None });
            }
            let sql = match kind {
                MarkKind::Read => {
                    "UPDATE members SET last_read_seq = ?3, last_delivered_seq = max(last_delivered_seq, ?3)
                     WHERE thread_id = ?1 AND user_id = ?2"
                }
                MarkKind::Delivered => {
                    "UPDATE members SET last_delivered_seq = ?3 WHERE thread_id = ?1 AND user_id = ?2"
                }
            };
            conn.prepare_cached(sql)?
                .execute(params![thread_id.as_bytes(), user_id.as_bytes(), to_i64(seq)])?;
            let user_event = match kind {
                MarkKind::Read => Some(social::append_user_event(conn, user_id, UserEvent::Read { thread_id, seq })?),
                MarkKind::Delivered => None,
            };
            Ok(MarkerUpdate { seq, changed: true, members, user_event })
        })
        .await
    }

    async fn list_threads(&self, user_id: UserId) -> Result<Vec<ThreadSummary>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT t.id, t.kind, t.last_seq, t.updated_at,
                        m.last_read_seq, m.last_delivered_seq, m.muted, m.pinned, m.archived, m.nickname,
                        m.role, m.joined_seq,
                        t.title, t.topic, t.avatar, t.share_history, t.member_count, t.closed,
                        p.user_id, u.username, p.last_read_seq, p.last_delivered_seq,
                        msg.id, msg.thread_id, msg.seq, msg.sender_id, msg.sender_device_id,
                        msg.client_msg_id, msg.kind, msg.body, msg.created_at
                 FROM members m
                 JOIN threads t ON t.id = m.thread_id
                 LEFT JOIN members p ON t.kind = 'direct' AND p.thread_id = t.id AND p.user_id != m.user_id
                 LEFT JOIN users u ON u.id = p.user_id
                 LEFT JOIN messages msg ON msg.thread_id = t.id AND msg.seq = t.last_seq AND t.last_seq > m.joined_seq
                 WHERE m.user_id = ?1
                 ORDER BY t.updated_at DESC, t.id",
            )?;
            let rows = stmt.query_map([user_id.as_bytes()], |row| {
                let thread_id = ThreadId::from_bytes(row.get(0)?);
                let kind = thread_kind(&row.get::<_, String>(1)?);
                let last_seq = to_u64(row.get(2)?);
                let joined_seq = to_u64(row.get(11)?);
                // Markers start at joined_seq, so unread never counts what the member cannot see.
                let read_seq = to_u64(row.get(4)?).max(joined_seq);
                let peer = match row.get::<_, Option<[u8; 16]>>(18)? {
                    Some(id) => Some(UserRef { user_id: UserId::from_bytes(id), username: row.get(19)? }),
                    None => None,
                };
                let last_message = match row.get::<_, Option<[u8; 16]>>(22)? {
                    Some(_) => Some(message_from_row_at(row, 22)?),
                    None => None,
                };
                let group = match kind {
                    ThreadKind::Group => Some(social::group_from_row_at(row, thread_id, 12)?),
                    ThreadKind::Direct => None,
                };
                Ok(ThreadSummary {
                    thread_id,
                    kind,
                    peer_read_seq: peer.as_ref().map(|_| row.get::<_, i64>(20)).transpose()?.map(to_u64),
                    peer_delivered_seq: peer.as_ref().map(|_| row.get::<_, i64>(21)).transpose()?.map(to_u64),
                    peer,
                    last_seq,
                    last_message,
                    unread: last_seq.saturating_sub(read_seq),
                    muted: row.get(6)?,
                    pinned: row.get(7)?,
                    archived: row.get(8)?,
                    nickname: row.get(9)?,
                    role: group.as_ref().map(|_| row.get::<_, String>(10)).transpose()?.map(|r| Role::parse(&r)),
                    group,
                    joined_seq,
                    read_seq,
                    delivered_seq: to_u64(row.get(5)?).max(joined_seq),
                    updated_at: row.get(3)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn create_group(
        &self,
        creator: Actor,
        group: NewGroup,
        limits: GroupLimits,
        on_commit: Hook<GroupChanged>,
    ) -> Result<GroupChanged> {
        self.write_then(
            move |conn, state| social::create_group(conn, state, creator, group, limits),
            on_commit,
        )
        .await
    }

    async fn change_group(
        &self,
        actor: Actor,
        thread_id: ThreadId,
        change: GroupChange,
        limits: GroupLimits,
        on_commit: Hook<GroupChanged>,
    ) -> Result<GroupChanged> {
        self.write_then(
            move |conn, state| social::change_group(conn, state, actor, thread_id, change, limits),
            on_commit,
        )
        .await
    }

    async fn get_group(&self, thread_id: ThreadId) -> Result<GroupInfo> {
        self.read(move |conn| social::read_group(conn, thread_id))
            .await
    }

    async fn list_members(
        &self,
        thread_id: ThreadId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<MemberInfo>> {
        self.read(move |conn| {
            let after = after.map(|id| *id.as_bytes()).unwrap_or([0u8; 16]);
            let mut stmt = conn.prepare_cached(
                "SELECT m.user_id, u.username, m.role, m.joined_at,
                        max(m.last_read_seq, m.joined_seq), max(m.last_delivered_seq, m.joined_seq)
                 FROM members m JOIN users u ON u.id = m.user_id
                 WHERE m.thread_id = ?1 AND m.user_id > ?2 ORDER BY m.user_id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![thread_id.as_bytes(), &after[..], limit], |row| {
                Ok(MemberInfo {
                    user_id: UserId::from_bytes(row.get(0)?),
                    username: row.get(1)?,
                    role: Role::parse(&row.get::<_, String>(2)?),
                    joined_at: row.get(3)?,
                    read_seq: Some(crate::common::to_u64(row.get(4)?)),
                    delivered_seq: Some(crate::common::to_u64(row.get(5)?)),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn find_groups(&self, members: Vec<UserId>) -> Result<Vec<GroupInfo>> {
        let hash = crate::common::participants_hash(&members);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id FROM threads WHERE participants_hash = ?1 AND kind = 'group' AND closed = 0 ORDER BY updated_at DESC",
            )?;
            let ids = stmt
                .query_map([&hash[..]], |row| Ok(ThreadId::from_bytes(row.get(0)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            ids.into_iter().map(|id| social::read_group(conn, id)).collect()
        })
        .await
    }

    async fn set_thread_settings(
        &self,
        user_id: UserId,
        thread_id: ThreadId,
        patch: SettingsPatch,
    ) -> Result<(ThreadSettings, UserEventRecord)> {
        self.write(move |conn, state| {
            social::set_thread_settings(conn, state, user_id, thread_id, patch)
        })
        .await
    }

    async fn contact_action(
        &self,
        owner: UserId,
        peer: UserId,
        action: ContactAction,
    ) -> Result<ContactChanged> {
        self.write(move |conn, state| social::contact_action(conn, state, owner, peer, action))
            .await
    }

    async fn set_alias(
        &self,
        owner: UserId,
        peer: UserId,
        alias: Option<String>,
    ) -> Result<ContactChanged> {
        self.write(move |conn, _| social::set_alias(conn, owner, peer, alias))
            .await
    }

    async fn list_contacts(&self, owner: UserId) -> Result<Vec<ContactInfo>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT c.peer_id, u.username, c.state, c.blocked, c.alias, u.last_seen_at, u.hide_last_seen
                 FROM contacts c JOIN users u ON u.id = c.peer_id
                 WHERE c.owner_id = ?1 ORDER BY u.username",
            )?;
            let rows = stmt.query_map([owner.as_bytes()], |row| {
                let state = row.get::<_, Option<String>>(2)?.as_deref().and_then(ContactState::parse);
                let hidden: bool = row.get(6)?;
                Ok(ContactInfo {
                    user_id: UserId::from_bytes(row.get(0)?),
                    username: row.get(1)?,
                    state,
                    blocked: row.get(3)?,
                    alias: row.get(4)?,
                    online: None,
                    // Last seen goes to friends only, and never when hidden.
                    last_seen: if state == Some(ContactState::Friend) && !hidden { row.get(5)? } else { None },
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn search_users(&self, viewer: UserId, prefix: &str, limit: u32) -> Result<Vec<UserRef>> {
        // Usernames are [a-z0-9_.-]; '{' sorts right after 'z', closing the prefix range.
        let low = prefix.to_owned();
        let high = format!("{prefix}{{");
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT u.id, u.username FROM users u
                 WHERE u.username >= ?1 AND u.username < ?2 AND u.id != ?3
                   AND NOT EXISTS (SELECT 1 FROM contacts c WHERE c.owner_id = u.id AND c.peer_id = ?3 AND c.blocked = 1)
                 ORDER BY u.username LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![low, high, viewer.as_bytes(), limit], |row| {
                Ok(UserRef { user_id: UserId::from_bytes(row.get(0)?), username: row.get(1)? })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn set_privacy(&self, user_id: UserId, hide_last_seen: bool) -> Result<UserEventRecord> {
        self.write(move |conn, _| social::set_privacy(conn, user_id, hide_last_seen))
            .await
    }

    async fn list_user_events(
        &self,
        user_id: UserId,
        after: u64,
        limit: u32,
    ) -> Result<UserEventsPage> {
        self.read(move |conn| {
            let (oldest, last): (Option<i64>, Option<i64>) = conn
                .prepare_cached("SELECT min(seq), max(seq) FROM user_events WHERE user_id = ?1")?
                .query_row([user_id.as_bytes()], |row| Ok((row.get(0)?, row.get(1)?)))?;
            let last_seq = to_u64(last.unwrap_or(0));
            let oldest = to_u64(oldest.unwrap_or(0));
            // Pruned events between the client's cursor and the oldest kept one: reset.
            let reset = oldest > after.saturating_add(1) && last_seq > after;
            let mut stmt = conn.prepare_cached(
                "SELECT seq, body FROM user_events WHERE user_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let events = stmt
                .query_map(params![user_id.as_bytes(), to_i64(after), limit], |row| {
                    Ok((to_u64(row.get(0)?), row.get::<_, String>(1)?))
                })?
                .map(|row| {
                    let (seq, body) = row?;
                    let event = serde_json::from_str(&body).map_err(|e| StoreError::Internal(format!("user event: {e}")))?;
                    Ok(UserEventRecord { seq, event })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(UserEventsPage { events, last_seq, reset })
        })
        .await
    }

    async fn close(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.jobs.send(Command::Close(done_tx)).await.is_ok() {
            let _ = done_rx.await;
        }
        self.readers.close();
    }
}

/// What the writer keeps between jobs: per-thread heads, and metadata to write once per batch.
struct WriterState {
    /// `pigeon_messages_stored_total`, resolved once.
    stored: metrics::Counter,
    /// Messages appended in the current transaction, counted once it commits.
    appended_in_batch: u64,
    threads: HashMap<ThreadId, CachedThread>,
    /// Threads whose `last_seq` / `updated_at` changed in this batch.
    dirty_threads: HashSet<ThreadId>,
    /// Senders' read markers to move in this batch: (thread, user) → seq.
    read_markers: HashMap<(ThreadId, UserId), u64>,
    /// Every block, as (blocker, blocked): checked on each direct send and group add.
    blocks: HashSet<(UserId, UserId)>,
}

#[derive(Clone)]
struct CachedThread {
    kind: ThreadKind,
    closed: bool,
    last_seq: u64,
    updated_at: i64,
    members: Arc<[UserId]>,
}

impl WriterState {
    /// Returns the thread's cached head, loading it on a miss.
    fn thread(&mut self, conn: &Connection, thread_id: ThreadId) -> Result<&mut CachedThread> {
        match self.threads.entry(thread_id) {
            Entry::Occupied(entry) => Ok(entry.into_mut()),
            Entry::Vacant(entry) => {
                let head: Option<(String, bool, i64, i64)> = conn
                    .prepare_cached(
                        "SELECT kind, closed, last_seq, updated_at FROM threads WHERE id = ?1",
                    )?
                    .query_row([thread_id.as_bytes()], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                    })
                    .optional()?;
                let (kind, closed, last_seq, updated_at) =
                    head.ok_or(StoreError::ThreadNotFound)?;
                let mut stmt =
                    conn.prepare_cached("SELECT user_id FROM members WHERE thread_id = ?1")?;
                let members = stmt
                    .query_map([thread_id.as_bytes()], |row| {
                        Ok(UserId::from_bytes(row.get(0)?))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(entry.insert(CachedThread {
                    kind: thread_kind(&kind),
                    closed,
                    last_seq: to_u64(last_seq),
                    updated_at,
                    members: members.into(),
                }))
            }
        }
    }

    fn flush_read_markers(&mut self, conn: &Connection) -> Result<()> {
        if self.read_markers.is_empty() {
            return Ok(());
        }
        let mut stmt = conn.prepare_cached(
            "UPDATE members SET last_read_seq = max(last_read_seq, ?3), last_delivered_seq = max(last_delivered_seq, ?3)
             WHERE thread_id = ?1 AND user_id = ?2",
        )?;
        for ((thread_id, user_id), seq) in self.read_markers.drain() {
            stmt.execute(params![
                thread_id.as_bytes(),
                user_id.as_bytes(),
                to_i64(seq)
            ])?;
        }
        Ok(())
    }

    /// Writes the batch's thread heads and markers; called once per transaction.
    fn flush(&mut self, conn: &Connection) -> Result<()> {
        self.flush_read_markers(conn)?;
        let mut stmt =
            conn.prepare_cached("UPDATE threads SET last_seq = ?2, updated_at = ?3 WHERE id = ?1")?;
        for thread_id in self.dirty_threads.drain() {
            let head = &self.threads[&thread_id];
            stmt.execute(params![
                thread_id.as_bytes(),
                to_i64(head.last_seq),
                head.updated_at
            ])?;
        }
        Ok(())
    }

    /// Replaces a cached thread's member list after a membership change.
    fn set_members(&mut self, thread_id: ThreadId, members: Arc<[UserId]>) {
        if let Some(thread) = self.threads.get_mut(&thread_id) {
            thread.members = members;
        }
    }

    fn close_thread(&mut self, thread_id: ThreadId) {
        if let Some(thread) = self.threads.get_mut(&thread_id) {
            thread.closed = true;
        }
    }

    /// Forgets everything not known to be committed (after a failed transaction).
    fn reset(&mut self, conn: &Connection) {
        self.threads.clear();
        self.dirty_threads.clear();
        self.read_markers.clear();
        match load_blocks(conn) {
            Ok(blocks) => self.blocks = blocks,
            Err(error) => tracing::error!(%error, "reloading blocks"),
        }
    }
}

fn append(conn: &Connection, state: &mut WriterState, msg: NewMessage) -> Result<Appended> {
    let thread = state.thread(conn, msg.thread_id)?;
    if !thread.members.contains(&msg.sender_id) {
        return Err(StoreError::NotMember);
    }
    if thread.closed {
        return Err(StoreError::GroupClosed);
    }
    let members = thread.members.clone();
    // A user who blocked the sender gets no direct messages from them.
    if thread.kind == ThreadKind::Direct
        && members
            .iter()
            .any(|peer| *peer != msg.sender_id && state.blocks.contains(&(*peer, msg.sender_id)))
    {
        return Err(StoreError::Blocked);
    }

    let existing = conn
        .prepare_cached(
            "SELECT id, thread_id, seq, sender_id, sender_device_id, client_msg_id, kind, body, created_at
             FROM messages WHERE sender_id = ?1 AND client_msg_id = ?2",
        )?
        .query_row(params![msg.sender_id.as_bytes(), msg.client_msg_id], message_from_row)
        .optional()?;
    if let Some(message) = existing {
        let members = if message.thread_id == msg.thread_id {
            members
        } else {
            state.thread(conn, message.thread_id)?.members.clone()
        };
        return Ok(Appended {
            message,
            duplicate: true,
            members,
        });
    }
    let message = insert_message(
        conn,
        state,
        msg.thread_id,
        msg.sender_id,
        msg.sender_device_id,
        msg.client_msg_id,
        msg.kind,
        msg.body,
    )?;
    state
        .read_markers
        .insert((msg.thread_id, msg.sender_id), message.seq);
    Ok(Appended {
        message,
        duplicate: false,
        members,
    })
}

/// Inserts a message with the thread's next seq and advances the cached head.
/// The thread must be in the cache already.
#[allow(clippy::too_many_arguments)]
fn insert_message(
    conn: &Connection,
    state: &mut WriterState,
    thread_id: ThreadId,
    sender_id: UserId,
    sender_device_id: DeviceId,
    client_msg_id: String,
    kind: MessageKind,
    body: String,
) -> Result<Message> {
    let next_seq = state.thread(conn, thread_id)?.last_seq + 1;
    let message = Message {
        thread_id,
        seq: next_seq,
        message_id: MessageId::new(),
        sender_id,
        sender_device_id,
        client_msg_id,
        kind,
        body,
        system: None,
        created_at: now_ms(),
    };
    conn.prepare_cached(
        "INSERT INTO messages (id, thread_id, seq, sender_id, sender_device_id, client_msg_id, kind, body, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        message.message_id.as_bytes(),
        message.thread_id.as_bytes(),
        to_i64(message.seq),
        message.sender_id.as_bytes(),
        message.sender_device_id.as_bytes(),
        message.client_msg_id,
        message_kind_str(message.kind),
        message.body,
        message.created_at,
    ])?;
    // Only now that every statement succeeded does the job touch the cache.
    let thread = state.threads.get_mut(&thread_id).expect("loaded above");
    thread.last_seq = next_seq;
    thread.updated_at = message.created_at;
    state.dirty_threads.insert(thread_id);
    state.appended_in_batch += 1;
    Ok(message)
}

/// The outcome of a queued job, once its batch has committed (or failed).
async fn committed<T>(done: oneshot::Receiver<Result<T>>) -> Result<T> {
    done.await
        .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
}

fn load_blocks(conn: &Connection) -> Result<HashSet<(UserId, UserId)>> {
    let mut stmt = conn.prepare("SELECT owner_id, peer_id FROM contacts WHERE blocked = 1")?;
    let rows = stmt.query_map([], |row| {
        Ok((
            UserId::from_bytes(row.get(0)?),
            UserId::from_bytes(row.get(1)?),
        ))
    })?;
    Ok(rows.collect::<rusqlite::Result<HashSet<_>>>()?)
}

fn run_writer(
    mut conn: Connection,
    mut jobs_rx: mpsc::Receiver<Command>,
    mut checkpoints: Checkpoints,
) {
    let mut state = WriterState {
        stored: metrics::counter!("pigeon_messages_stored_total"),
        appended_in_batch: 0,
        threads: HashMap::new(),
        dirty_threads: HashSet::new(),
        read_markers: HashMap::new(),
        blocks: HashSet::new(),
    };
    state.reset(&conn);
    let commit_seconds = metrics::histogram!("pigeon_store_commit_seconds");
    let batch_size = metrics::histogram!("pigeon_store_batch_size");
    // Rows inserted, updated or deleted by committed transactions: the write cost per message.
    let rows_written = metrics::counter!("pigeon_store_rows_written_total");
    let mut closed: Option<oneshot::Sender<()>> = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);

    while closed.is_none() {
        let Some(first) = jobs_rx.blocking_recv() else {
            break;
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs_rx.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }

        let started = Instant::now();
        let changes_before = conn.total_changes();
        let mut completions = Vec::with_capacity(batch.len());
        let outcome = run_batch(
            &mut conn,
            &mut state,
            &mut batch,
            &mut completions,
            &mut closed,
        );
        match &outcome {
            Ok(()) => {
                state.stored.increment(state.appended_in_batch);
                rows_written.increment(conn.total_changes().saturating_sub(changes_before));
            }
            Err(error) => {
                tracing::error!(%error, jobs = completions.len(), "store transaction failed; nothing in it is acknowledged");
                state.reset(&conn);
            }
        }
        state.appended_in_batch = 0;
        commit_seconds.record(started.elapsed().as_secs_f64());
        batch_size.record(completions.len() as f64);
        for completion in completions {
            completion(outcome.clone());
        }
        checkpoints.after_batch(&conn);
    }

    // Refuse whatever arrived after the close request.
    jobs_rx.close();
    while let Ok(command) = jobs_rx.try_recv() {
        if let Command::Job(job, _) = command {
            drop(job);
        }
    }
    checkpoints.stop();
    if let Err((_, error)) = conn.close() {
        tracing::warn!(%error, "closing the sqlite writer connection");
    }
    if let Some(done) = closed {
        let _ = done.send(());
    }
}

thread_local! {
    /// Pages in the WAL after the last commit on this thread's connection (the writer's).
    static WAL_PAGES: Cell<u32> = const { Cell::new(0) };
}

/// The writer connection's WAL hook: SQLite calls it after each commit.
fn note_wal_pages(_: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_PAGES.set(u32::try_from(pages).unwrap_or(0));
    Ok(())
}

/// Copies the WAL into the database file off the writer's path.
///
/// SQLite's automatic checkpoint runs inside the commit that crosses its threshold: that
/// batch's acks, and every job queued behind it, waited 10–20 ms while thousands of pages
/// were copied and both files synced. Here a thread of its own copies the log whenever
/// `pages` of it are not copied yet (a PASSIVE checkpoint, which runs alongside the
/// writer's commits). A copied log stays cheap to read: readers look up only the pages
/// after the copied part.
///
/// The log file only starts over from its beginning once a checkpoint has copied all of it
/// and no transaction is open in between, which never happens while the writer commits
/// every millisecond. So once the log is `restart_pages` long, the writer checkpoints the
/// pages committed since the thread's last copy itself, between two batches (about 5 ms
/// once per 20,000 pages at 20,000 messages/s, mostly the two syncs), and its next
/// transaction restarts the log. A reader still reading older pages of the log stops the
/// restart; the writer tries again once `pages` more are uncopied.
struct Checkpoints {
    request: std::sync::mpsc::SyncSender<()>,
    /// One answer per request once its copy is done: the log pages copied by then, if the
    /// checkpoint could tell. Disconnected once the thread has stopped.
    copies: std::sync::mpsc::Receiver<Option<u32>>,
    thread: std::thread::JoinHandle<()>,
    copying: bool,
    /// The log's length after the last batch: a shorter log means it started over.
    last_pages: u32,
    /// Pages of the current log known to be copied.
    copied_upto: u32,
    pages: u32,
    restart_pages: u32,
    /// `pigeon_store_checkpoint_seconds{on="writer"}`: how long the writer's share held it.
    on_writer: metrics::Histogram,
}

impl Checkpoints {
    fn start(path: &Path, pages: u32) -> Result<Self> {
        let conn = Connection::open(path).map_err(map_err)?;
        // The checkpoint syncs the log before copying it and the database file after.
        conn.execute_batch("PRAGMA synchronous = FULL;")
            .map_err(map_err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(map_err)?;
        let (request, requests) = std::sync::mpsc::sync_channel::<()>(1);
        let (copied, copies) = std::sync::mpsc::sync_channel::<Option<u32>>(1);
        let thread = std::thread::Builder::new()
            .name("pigeon-sqlite-checkpoint".into())
            .spawn(move || {
                let seconds =
                    metrics::histogram!("pigeon_store_checkpoint_seconds", "on" => "thread");
                // Ends when the writer, which holds the only sender, stops.
                while requests.recv().is_ok() {
                    // A copy takes the log as it was when it began. Copying the pages
                    // committed meanwhile at once, while they are few, leaves the writer
                    // less to copy before a restart (about 5 ms against 9 at 20,000 msg/s).
                    let mut before = None;
                    let mut pages = None;
                    for _ in 0..3 {
                        let Some((log, done)) = checkpoint(&conn, &seconds) else {
                            break;
                        };
                        pages = Some(done);
                        if before.is_some_and(|before: u32| log.saturating_sub(before) <= 64) {
                            break;
                        }
                        before = Some(log);
                    }
                    // The writer holds one request at a time, so this never waits.
                    if copied.send(pages).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| StoreError::Internal(format!("spawn checkpoint: {e}")))?;
        let pages = pages.max(1);
        Ok(Self {
            request,
            copies,
            thread,
            copying: false,
            last_pages: 0,
            copied_upto: 0,
            pages,
            restart_pages: pages.saturating_mul(5),
            on_writer: metrics::histogram!("pigeon_store_checkpoint_seconds", "on" => "writer"),
        })
    }

    /// Waits for the checkpoint thread to finish and close its connection.
    fn stop(self) {
        drop(self.request);
        if self.thread.join().is_err() {
            tracing::error!("the WAL checkpoint thread panicked");
        }
    }

    /// Runs on the writer thread after each batch, outside any transaction.
    fn after_batch(&mut self, conn: &Connection) {
        let pages = WAL_PAGES.get();
        if pages < self.last_pages {
            // The log started over.
            self.copied_upto = 0;
        }
        self.last_pages = pages;
        if self.copying {
            match self.copies.try_recv() {
                Ok(copied) => {
                    self.copying = false;
                    // Had the log started over since, its new pages are the few written
                    // since.
                    if let Some(copied) = copied {
                        self.copied_upto = copied.min(pages);
                    }
                    if pages >= self.restart_pages {
                        self.checkpoint_here(conn, pages);
                        return;
                    }
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    tracing::error!("the WAL checkpoint thread stopped; the writer checkpoints");
                    self.copying = false;
                }
            }
        }
        if pages.saturating_sub(self.copied_upto) >= self.pages {
            // The thread only ends early by panicking; then the writer copies instead.
            if self.request.try_send(()).is_ok() {
                self.copying = true;
            } else {
                self.checkpoint_here(conn, pages);
            }
        }
    }

    fn checkpoint_here(&mut self, conn: &Connection, pages: u32) {
        if let Some((_, copied)) = checkpoint(conn, &self.on_writer) {
            self.copied_upto = copied.min(pages);
        }
    }
}

/// Copies as much of the WAL into the database file as readers and the writer allow, and
/// returns the log's length and how many of its pages are copied.
fn checkpoint(conn: &Connection, seconds: &metrics::Histogram) -> Option<(u32, u32)> {
    let started = Instant::now();
    let pages = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    });
    seconds.record(started.elapsed().as_secs_f64());
    match pages {
        // -1 when another checkpoint was running.
        Ok((log, copied)) => Some((u32::try_from(log).ok()?, u32::try_from(copied).ok()?)),
        Err(error) => {
            tracing::warn!(%error, "WAL checkpoint");
            None
        }
    }
}

fn run_batch(
    conn: &mut Connection,
    state: &mut WriterState,
    batch: &mut Vec<Command>,
    completions: &mut Vec<Completion>,
    closed: &mut Option<oneshot::Sender<()>>,
) -> Result<()> {
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for command in batch.drain(..) {
        match command {
            Command::Job(job, Isolation::SingleWrite) => {
                let (_, completion) = job(&tx, state);
                completions.push(completion);
            }
            Command::Job(job, Isolation::Savepoint) => {
                let savepoint = tx.savepoint()?;
                let (ok, completion) = job(&savepoint, state);
                completions.push(completion);
                if ok {
                    savepoint.commit()?;
                } else {
                    savepoint.finish()?;
                }
            }
            // Jobs queued before the close are in this batch and commit with it.
            Command::Close(done) => *closed = Some(done),
        }
    }
    state.flush(&tx)?;
    tx.commit()?;
    Ok(())
}

fn find_direct_thread(conn: &Connection, pair_key: &[u8; 32]) -> Result<Option<ThreadId>> {
    let id: Option<[u8; 16]> = conn
        .prepare_cached("SELECT id FROM threads WHERE pair_key = ?1")?
        .query_row([&pair_key[..]], |row| row.get(0))
        .optional()?;
    Ok(id.map(ThreadId::from_bytes))
}

fn read_membership(conn: &Connection, thread_id: ThreadId, user_id: UserId) -> Result<Membership> {
    let row = conn
        .prepare_cached(
            "SELECT t.kind, t.last_seq, m.joined_seq, m.last_read_seq, m.last_delivered_seq, m.user_id IS NOT NULL, m.role
             FROM threads t LEFT JOIN members m ON m.thread_id = t.id AND m.user_id = ?2
             WHERE t.id = ?1",
        )?
        .query_row(params![thread_id.as_bytes(), user_id.as_bytes()], |row| {
            let member: bool = row.get(5)?;
            Ok(member.then(|| -> rusqlite::Result<Membership> {
                Ok(Membership {
                    kind: thread_kind(&row.get::<_, String>(0)?),
                    last_seq: to_u64(row.get(1)?),
                    joined_seq: to_u64(row.get(2)?),
                    read_seq: to_u64(row.get(3)?),
                    delivered_seq: to_u64(row.get(4)?),
                    role: Role::parse(&row.get::<_, String>(6)?),
                })
            }))
        })
        .optional()?;
    match row {
        None => Err(StoreError::ThreadNotFound),
        Some(None) => Err(StoreError::NotMember),
        Some(Some(membership)) => Ok(membership?),
    }
}

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: UserId::from_bytes(row.get(0)?),
        username: row.get(1)?,
        password_hash: row.get(2)?,
        created_at: row.get(3)?,
        last_seen_at: row.get(4)?,
        hide_last_seen: row.get(5)?,
    })
}

fn device_from_row(row: &Row<'_>) -> rusqlite::Result<Device> {
    Ok(Device {
        id: DeviceId::from_bytes(row.get(0)?),
        user_id: UserId::from_bytes(row.get(1)?),
        name: row.get(2)?,
        created_at: row.get(3)?,
        last_seen_at: row.get(4)?,
    })
}

fn message_from_row(row: &Row<'_>) -> rusqlite::Result<Message> {
    message_from_row_at(row, 0)
}

/// Reads the 9 message columns starting at `at`, in the order
/// id, thread_id, seq, sender_id, sender_device_id, client_msg_id, kind, body, created_at.
fn message_from_row_at(row: &Row<'_>, at: usize) -> rusqlite::Result<Message> {
    let kind = message_kind(row.get_ref(at + 6)?.as_str()?);
    let (body, system) = decode_body(kind, row.get(at + 7)?);
    Ok(Message {
        message_id: MessageId::from_bytes(row.get(at)?),
        thread_id: ThreadId::from_bytes(row.get(at + 1)?),
        seq: to_u64(row.get(at + 2)?),
        sender_id: UserId::from_bytes(row.get(at + 3)?),
        sender_device_id: DeviceId::from_bytes(row.get(at + 4)?),
        client_msg_id: row.get(at + 5)?,
        kind,
        body,
        system,
        created_at: row.get(at + 8)?,
    })
}

fn map_err(error: rusqlite::Error) -> StoreError {
    use rusqlite::ffi::ErrorCode as Code;
    match &error {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            Code::ConstraintViolation => StoreError::Conflict,
            Code::DatabaseBusy
            | Code::DatabaseLocked
            | Code::DiskFull
            | Code::SystemIoFailure
            | Code::CannotOpen
            | Code::ReadOnly
            | Code::OutOfMemory => StoreError::Unavailable(error.to_string()),
            _ => StoreError::Internal(error.to_string()),
        },
        _ => StoreError::Internal(error.to_string()),
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        map_err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> SqliteStore {
        SqliteStore::open(&SqliteConfig::in_dir(dir)).expect("open sqlite store")
    }

    fn fresh() -> (Arc<dyn Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        (Arc::new(open(dir.path())), dir)
    }

    crate::suite::store_suite!(fresh());

    #[tokio::test]
    async fn reopening_keeps_messages_and_continues_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let alice = store.create_user("alice", "h").await.unwrap().id;
        let bob = store.create_user("bob", "h").await.unwrap().id;
        let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
        let message = |n: u32| NewMessage {
            thread_id: thread,
            sender_id: alice,
            sender_device_id: DeviceId::new(),
            client_msg_id: format!("m{n}"),
            kind: MessageKind::Text,
            body: "hi".into(),
        };
        for n in 0..3 {
            store
                .append_message(message(n), Box::new(|_| {}))
                .await
                .unwrap();
        }
        store.close().await;
        assert!(
            matches!(
                store.set_last_seen(alice, 1).await,
                Err(StoreError::Unavailable(_))
            ),
            "closed"
        );

        let store = open(dir.path());
        let again = store
            .append_message(message(3), Box::new(|_| {}))
            .await
            .unwrap();
        assert_eq!(again.message.seq, 4);
        let dupe = store
            .append_message(message(0), Box::new(|_| {}))
            .await
            .unwrap();
        assert!(dupe.duplicate && dupe.message.seq == 1);
        store.close().await;
    }

    #[tokio::test]
    async fn the_log_is_copied_and_starts_over_while_writes_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let config = SqliteConfig {
            checkpoint_pages: 20,
            ..SqliteConfig::in_dir(dir.path())
        };
        let store = Arc::new(SqliteStore::open(&config).unwrap());
        let alice = store.create_user("alice", "h").await.unwrap().id;
        let bob = store.create_user("bob", "h").await.unwrap().id;
        let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
        // About one log page per message: each body fills most of a page.
        let send = move |store: Arc<SqliteStore>, key: String| async move {
            store
                .append_message(
                    NewMessage {
                        thread_id: thread,
                        sender_id: alice,
                        sender_device_id: DeviceId::new(),
                        body: format!("{key} {}", "x".repeat(3000)),
                        client_msg_id: key,
                        kind: MessageKind::Text,
                    },
                    Box::new(|_| {}),
                )
                .await
                .unwrap()
        };
        let page_size: i64 = Connection::open(&config.path)
            .unwrap()
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .unwrap();
        let page_size = page_size.unsigned_abs();
        // The log's file never shrinks: its size shows the longest the log got.
        let longest_log = || {
            let wal = std::fs::metadata(dir.path().join("pigeon.db-wal")).unwrap();
            wal.len().saturating_sub(32) / (page_size + 24)
        };

        // The log starts over only when the writer finishes a checkpoint between two
        // batches: without that, it grew past 4,000 pages in this test. First one commit
        // at a time, then sixteen senders at once, whose commits overlap the thread's copies.
        for n in 0..600 {
            assert_eq!(
                send(store.clone(), format!("a{n}")).await.message.seq,
                n + 1
            );
        }
        let after_sequential = longest_log();
        let senders = (0..16).map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..100 {
                    send(store.clone(), format!("b{task}-{n}")).await;
                }
            })
        });
        for sender in futures::future::join_all(senders).await {
            sender.unwrap();
        }
        // Without restarts the log would hold every one of the 2,200 pages or more; here it
        // starts over at 100.
        let longest = longest_log();
        assert!(
            after_sequential < 300 && longest < 800,
            "the log grew to {after_sequential} pages, then to {longest}"
        );
        store.close().await;

        // Nothing was lost on the way: every message is there, in order, after a reopen.
        let store = SqliteStore::open(&config).unwrap();
        let mut seqs = Vec::new();
        let mut after = 0;
        loop {
            let page = store
                .list_messages(
                    thread,
                    SeqRange {
                        after,
                        before: u64::MAX,
                    },
                    PageFrom::Oldest,
                    100,
                )
                .await
                .unwrap();
            let Some(last) = page.last() else { break };
            after = last.seq;
            seqs.extend(page.iter().map(|m| m.seq));
        }
        assert_eq!(seqs, (1..=2200).collect::<Vec<u64>>());
        store.close().await;
    }
}

//! The PostgreSQL backend: several server nodes share one database, so nothing kept in a
//! node's memory is trusted for correctness.
//!
//! - **Seqs.** A send locks its thread's row (`SELECT … FOR NO KEY UPDATE`), checks the
//!   rules against what is committed, then `UPDATE threads SET last_seq = last_seq + 1`
//!   and inserts the message in the same transaction. The row lock serialises senders on
//!   every node, so seqs are unique, ordered and gap-free; a rollback returns the number.
//! - **Dedupe.** `message_keys` holds (sender, client_msg_id) as its primary key. A resend
//!   finds the original there; two racing first sends collide on the key, the loser rolls
//!   back, runs again and returns the winner's message as a duplicate.
//! - **Commit hooks.** A node takes the thread's turn ([`locks`]) before the row lock and
//!   keeps it through COMMIT and the hook, so one thread's hooks run in seq order on that
//!   node. Writes with hooks run in a spawned task: a caller that goes away cannot cancel a
//!   commit and skip its hook.
//! - **Deadlocks.** Transactions take row locks in one order (thread, then member rows,
//!   then user rows in id order); a deadlock or a lost key race anyway is retried whole.
//! - **Failures.** An unreachable database is [`StoreError::Unavailable`]; the pool drops
//!   closed connections when handing them out and opens new ones when the database is back.
//!
//! Connections are plain TCP without TLS (`NoTls`): the database must be on loopback or a
//! private network.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Transaction,
};
use futures::future::BoxFuture;
use pigeon_proto::{
    ContactAction, ContactInfo, DeviceId, GroupInfo, MarkKind, MemberInfo, Message, ThreadId,
    ThreadSettings, ThreadSummary, UserEventRecord, UserId, UserRef,
};
use tokio_postgres::NoTls;

use self::error::{Error, PgResult, describe};
use self::locks::ThreadTurns;
use self::members::MemberCache;
use crate::{
    Actor, Appended, CommitHook, ContactChanged, Device, GroupChange, GroupChanged, GroupLimits,
    Hook, MarkerUpdate, Membership, NewGroup, NewMessage, PageFrom, Result, SeqRange,
    SettingsPatch, Store, StoreError, User, UserEventsPage,
};

mod accounts;
mod batch;
mod contacts;
pub(crate) mod error;
mod groups;
mod locks;
mod members;
mod messages;
mod presence;
mod sql;
#[cfg(test)]
mod tests;
mod threads;
mod user_events;

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

/// Key of the advisory lock held while migrating, so nodes starting together migrate once.
const MIGRATION_LOCK: i64 = 0x7069_6765_6f6e; // "pigeon"

/// Idle time before TCP keepalives probe a connection (unless the URL sets less).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// How long the server lets a session sit idle inside a transaction before ending it.
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(30);

/// Times a transaction runs when it keeps meeting a deadlock or a lost key race.
const ATTEMPTS: u32 = 5;

/// Settings of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// Connection string, as a URL (`postgres://pigeon@10.0.0.5:5432/pigeon`) or as
    /// `key=value` pairs. Connections do not use TLS: keep the database on loopback or a
    /// private network.
    pub url: String,
    /// Most connections this store (this node) opens.
    pub pool_size: usize,
    /// How long a request waits for a connection, or to open one, before failing with
    /// [`StoreError::Unavailable`]; also the connect timeout unless the URL sets one.
    pub acquire_timeout: Duration,
}

impl PostgresConfig {
    /// Uses `url` with 16 connections and a 5 s acquire timeout.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// The shared-database store. Cheap to share behind an `Arc`.
pub struct PostgresStore {
    shared: Arc<Shared>,
    /// Sends, batched into shared transactions.
    appender: batch::Appender,
}

/// What the store's methods and the tasks they spawn share.
struct Shared {
    pool: Pool,
    /// Per-thread turns: held from the seq lock through COMMIT and the commit hook.
    turns: ThreadTurns,
    /// Member lists of large threads, checked against `threads.members_version` on use.
    members: MemberCache,
    /// `pigeon_messages_stored_total`, resolved once.
    stored: metrics::Counter,
    /// `pigeon_store_commit_seconds`: one write transaction, first statement to COMMIT.
    commit_seconds: metrics::Histogram,
}

impl PostgresStore {
    /// Connects, runs the migrations (one node at a time) and opens the pool.
    ///
    /// Fails with [`StoreError::Unavailable`] when the database cannot be reached and with
    /// [`StoreError::Internal`] when the URL is invalid or a migration fails.
    pub async fn connect(config: &PostgresConfig) -> Result<Self> {
        let mut pg_config: tokio_postgres::Config = config.url.parse().map_err(|error| {
            StoreError::Internal(format!("invalid postgresql url: {}", describe(&error)))
        })?;
        if pg_config.get_connect_timeout().is_none() {
            pg_config.connect_timeout(config.acquire_timeout);
        }
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("pigeon");
        }
        // A node cut off mid-transaction would keep its thread's row locked, stalling that
        // thread on every node, until the server's TCP keepalive gave up (hours): the
        // server ends such a session instead. Our transactions never wait on a client.
        let options = pg_config.get_options().unwrap_or_default().to_owned();
        if !options.contains("idle_in_transaction_session_timeout") {
            pg_config.options(format!(
                "{options} -c idle_in_transaction_session_timeout={}",
                IDLE_IN_TRANSACTION.as_millis()
            ));
        }
        // Notice a server that vanished without closing within about a minute, not the
        // default two hours.
        if pg_config.get_keepalives_idle() > KEEPALIVE_IDLE {
            pg_config.keepalives_idle(KEEPALIVE_IDLE);
        }
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                // A connection the server closed is dropped when taken from the pool; a
                // query on one that died silently fails once with Unavailable, and closes it.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.acquire_timeout))
            .create_timeout(Some(config.acquire_timeout))
            .recycle_timeout(Some(config.acquire_timeout))
            .build()
            .map_err(|error| StoreError::Internal(format!("postgresql pool: {error}")))?;

        let mut client = pool.get().await.map_err(Error::from)?;
        migrate(&mut client).await?;
        drop(client);

        let shared = Arc::new(Shared {
            pool,
            turns: ThreadTurns::new(),
            members: MemberCache::default(),
            stored: metrics::counter!("pigeon_messages_stored_total"),
            commit_seconds: metrics::histogram!("pigeon_store_commit_seconds"),
        });
        Ok(Self {
            appender: batch::Appender::start(shared.clone()),
            shared,
        })
    }
}

/// Runs the embedded migrations under an advisory lock: nodes starting at once take turns,
/// and the later ones find nothing left to do.
async fn migrate(client: &mut Object) -> Result<()> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(Error::from)?;
    let outcome = embedded::migrations::runner()
        .run_async(&mut ***client)
        .await
        .map_err(|error| StoreError::Internal(format!("postgresql migrations: {error}")));
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(Error::from);
    outcome?;
    unlocked?;
    Ok(())
}

impl Shared {
    /// Takes a pooled connection.
    async fn client(&self) -> PgResult<Object> {
        Ok(self.pool.get().await?)
    }

    /// Runs `work` in a transaction and commits it. A deadlock, a serialisation failure
    /// or a key taken by a concurrent transaction rolls back and runs `work` again.
    ///
    /// `work` gets what it needs from the caller as `env`: borrowing it through that
    /// argument (rather than capturing it) lets the returned future hold the borrow.
    async fn transaction<E, T, F>(&self, env: E, mut work: F) -> PgResult<T>
    where
        E: Sync,
        T: Send,
        F: for<'t> FnMut(&'t Transaction<'t>, &'t E) -> BoxFuture<'t, PgResult<T>> + Send,
    {
        let mut client = self.client().await?;
        let mut attempt = 1;
        loop {
            let started = Instant::now();
            let outcome = run_once(&mut client, &env, &mut work).await;
            self.commit_seconds.record(started.elapsed().as_secs_f64());
            match outcome {
                Err(error) if error.is_transient() && attempt < ATTEMPTS => {
                    tracing::debug!(
                        ?error,
                        attempt,
                        "postgresql transaction conflicted; running it again"
                    );
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }
}

async fn run_once<E, T, F>(client: &mut Object, env: &E, work: &mut F) -> PgResult<T>
where
    F: for<'t> FnMut(&'t Transaction<'t>, &'t E) -> BoxFuture<'t, PgResult<T>>,
{
    let transaction = client.transaction().await?;
    match work(&transaction, env).await {
        Ok(value) => {
            transaction.commit().await?;
            Ok(value)
        }
        Err(error) => {
            // On a broken connection the rollback fails too; the server rolls back alone.
            if let Err(rollback) = transaction.rollback().await {
                tracing::debug!(error = %describe(&rollback), "rolling back");
            }
            Err(error)
        }
    }
}

/// Runs a write whose hook must follow its commit in a task of its own, holding the
/// thread's turn from before the transaction until the hook has run: hooks of one thread
/// run in seq order on this node, and a caller that stops waiting cannot skip a hook.
async fn with_turn<T, W>(
    shared: &Arc<Shared>,
    thread_id: ThreadId,
    write: W,
    on_commit: Hook<T>,
) -> Result<T>
where
    T: Send + 'static,
    W: for<'s> FnOnce(&'s Shared) -> BoxFuture<'s, PgResult<T>> + Send + 'static,
{
    let shared = shared.clone();
    tokio::spawn(async move {
        let _turn = shared.turns.take(thread_id).await;
        let value = write(&shared).await?;
        on_commit(&value);
        Ok(value)
    })
    .await
    .map_err(|error| StoreError::Internal(format!("store task: {error}")))?
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_user(&self, username: &str, password_hash: &str) -> Result<User> {
        Ok(accounts::create_user(&self.shared, username, password_hash).await?)
    }

    async fn get_user(&self, id: UserId) -> Result<Option<User>> {
        Ok(accounts::get_user(&self.shared, id).await?)
    }

    async fn get_user_by_username(&self, username: &str) -> Result<Option<User>> {
        Ok(accounts::get_user_by_username(&self.shared, username).await?)
    }

    async fn set_last_seen(&self, user_id: UserId, at: i64) -> Result<()> {
        Ok(accounts::set_last_seen(&self.shared, user_id, at).await?)
    }

    async fn create_device(
        &self,
        user_id: UserId,
        name: &str,
        token_hash: [u8; 32],
    ) -> Result<Device> {
        Ok(accounts::create_device(&self.shared, user_id, name, token_hash).await?)
    }

    async fn get_device_by_token(&self, token_hash: [u8; 32]) -> Result<Option<(Device, User)>> {
        Ok(accounts::get_device_by_token(&self.shared, token_hash).await?)
    }

    async fn list_devices(&self, user_id: UserId) -> Result<Vec<Device>> {
        Ok(accounts::list_devices(&self.shared, user_id).await?)
    }

    async fn delete_device(&self, user_id: UserId, device_id: DeviceId) -> Result<bool> {
        Ok(accounts::delete_device(&self.shared, user_id, device_id).await?)
    }

    async fn touch_device(&self, device_id: DeviceId, at: i64) -> Result<()> {
        Ok(accounts::touch_device(&self.shared, device_id, at).await?)
    }

    async fn get_or_create_direct_thread(&self, a: UserId, b: UserId) -> Result<ThreadId> {
        Ok(threads::get_or_create_direct_thread(&self.shared, a, b).await?)
    }

    async fn get_membership(&self, thread_id: ThreadId, user_id: UserId) -> Result<Membership> {
        Ok(threads::get_membership(&self.shared, thread_id, user_id).await?)
    }

    async fn presence_set(&self, node: i64, user: UserId, online: bool, ttl_ms: i64) -> Result<()> {
        Ok(presence::set(&self.shared, node, user, online, ttl_ms).await?)
    }

    async fn presence_refresh(&self, node: i64, users: &[UserId], ttl_ms: i64) -> Result<()> {
        Ok(presence::refresh(&self.shared, node, users, ttl_ms).await?)
    }

    async fn presence_online(&self, users: &[UserId]) -> Result<Option<Vec<UserId>>> {
        Ok(Some(presence::online(&self.shared, users).await?))
    }

    async fn list_presence_audience(&self, user_id: UserId) -> Result<Vec<UserId>> {
        Ok(threads::list_presence_audience(&self.shared, user_id).await?)
    }

    async fn can_see_presence(&self, viewer: UserId, target: UserId) -> Result<bool> {
        if viewer == target {
            return Ok(true);
        }
        Ok(threads::can_see_presence(&self.shared, viewer, target).await?)
    }

    async fn is_blocked(&self, blocker: UserId, blocked: UserId) -> Result<bool> {
        Ok(contacts::is_blocked(&self.shared, blocker, blocked).await?)
    }

    async fn get_members(&self, thread_id: ThreadId) -> Result<Arc<[UserId]>> {
        let client = self.shared.client().await?;
        Ok(threads::load_members(&self.shared.members, &client, thread_id).await?)
    }

    async fn append_message(&self, msg: NewMessage, on_commit: CommitHook) -> Result<Appended> {
        self.appender.append(msg, on_commit).await
    }

    async fn append_messages(&self, msgs: Vec<(NewMessage, CommitHook)>) -> Vec<Result<Appended>> {
        self.appender.append_all(msgs).await
    }

    async fn list_messages(
        &self,
        thread_id: ThreadId,
        range: SeqRange,
        from: PageFrom,
        limit: u32,
    ) -> Result<Vec<Message>> {
        Ok(messages::list_messages(&self.shared, thread_id, range, from, limit).await?)
    }

    async fn set_marker(
        &self,
        thread_id: ThreadId,
        user_id: UserId,
        kind: MarkKind,
        seq: u64,
    ) -> Result<MarkerUpdate> {
        let shared = &self.shared;
        Ok(shared
            .transaction(&shared.members, |tx, members| {
                Box::pin(messages::set_marker(
                    members, tx, thread_id, user_id, kind, seq,
                ))
            })
            .await?)
    }

    async fn list_threads(&self, user_id: UserId) -> Result<Vec<ThreadSummary>> {
        Ok(threads::list_threads(&self.shared, user_id).await?)
    }

    async fn create_group(
        &self,
        creator: Actor,
        group: NewGroup,
        limits: GroupLimits,
        on_commit: Hook<GroupChanged>,
    ) -> Result<GroupChanged> {
        // The id is chosen here so the new thread's turn can be taken before it exists.
        let thread_id = ThreadId::new();
        with_turn(
            &self.shared,
            thread_id,
            move |shared| {
                Box::pin(async move {
                    let changed = shared
                        .transaction(&group, |tx, group| {
                            Box::pin(groups::create_group(tx, thread_id, creator, group, limits))
                        })
                        .await?;
                    shared.stored.increment(1);
                    Ok(changed)
                })
            },
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
        with_turn(
            &self.shared,
            thread_id,
            move |shared| {
                Box::pin(async move {
                    let changed = shared
                        .transaction(&change, |tx, change| {
                            Box::pin(groups::change_group(tx, actor, thread_id, change, limits))
                        })
                        .await?;
                    if changed.message.is_some() {
                        shared.stored.increment(1);
                    }
                    Ok(changed)
                })
            },
            on_commit,
        )
        .await
    }

    async fn get_group(&self, thread_id: ThreadId) -> Result<GroupInfo> {
        let client = self.shared.client().await?;
        Ok(groups::read_group(&client, thread_id).await?)
    }

    async fn list_members(
        &self,
        thread_id: ThreadId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<MemberInfo>> {
        Ok(groups::list_members(&self.shared, thread_id, after, limit).await?)
    }

    async fn find_groups(&self, members: Vec<UserId>) -> Result<Vec<GroupInfo>> {
        Ok(groups::find_groups(&self.shared, &members).await?)
    }

    async fn set_thread_settings(
        &self,
        user_id: UserId,
        thread_id: ThreadId,
        patch: SettingsPatch,
    ) -> Result<(ThreadSettings, UserEventRecord)> {
        Ok(self
            .shared
            .transaction(&patch, |tx, patch| {
                Box::pin(groups::set_thread_settings(tx, user_id, thread_id, patch))
            })
            .await?)
    }

    async fn contact_action(
        &self,
        owner: UserId,
        peer: UserId,
        action: ContactAction,
    ) -> Result<ContactChanged> {
        Ok(self
            .shared
            .transaction((), |tx, ()| {
                Box::pin(contacts::contact_action(tx, owner, peer, action))
            })
            .await?)
    }

    async fn set_alias(
        &self,
        owner: UserId,
        peer: UserId,
        alias: Option<String>,
    ) -> Result<ContactChanged> {
        Ok(self
            .shared
            .transaction(&alias, |tx, alias| {
                Box::pin(contacts::set_alias(tx, owner, peer, alias.as_deref()))
            })
            .await?)
    }

    async fn list_contacts(&self, owner: UserId) -> Result<Vec<ContactInfo>> {
        Ok(contacts::list_contacts(&self.shared, owner).await?)
    }

    async fn search_users(&self, viewer: UserId, prefix: &str, limit: u32) -> Result<Vec<UserRef>> {
        Ok(contacts::search_users(&self.shared, viewer, prefix, limit).await?)
    }

    async fn set_privacy(&self, user_id: UserId, hide_last_seen: bool) -> Result<UserEventRecord> {
        Ok(self
            .shared
            .transaction((), |tx, ()| {
                Box::pin(contacts::set_privacy(tx, user_id, hide_last_seen))
            })
            .await?)
    }

    async fn list_user_events(
        &self,
        user_id: UserId,
        after: u64,
        limit: u32,
    ) -> Result<UserEventsPage> {
        Ok(user_events::list_user_events(&self.shared, user_id, after, limit).await?)
    }

    async fn close(&self) {
        // Batches in their transactions commit and run their hooks. Then requests holding
        // a connection finish; every later one fails with Unavailable.
        self.appender.drain().await;
        self.shared.pool.close();
    }
}

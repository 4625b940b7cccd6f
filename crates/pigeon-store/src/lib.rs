//! Persistent chat state behind one async trait, [`Store`], shaped for a networked backend.
//!
//! [`SqliteStore`] is the embedded default: one writer thread commits many requests in one
//! transaction (group commit) and answers none of them before that commit is durable.

mod sqlite;
#[cfg(test)]
mod suite;

use std::sync::Arc;

use async_trait::async_trait;
use pigeon_proto::{
    DeviceId, MarkKind, Message, MessageKind, ThreadId, ThreadKind, ThreadSummary, UserId,
};

pub use sqlite::{SqliteConfig, SqliteStore};

/// The crate's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a store operation failed. Backends map their own errors to these.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The thread does not exist.
    #[error("thread not found")]
    ThreadNotFound,
    /// The user is not a member of the thread.
    #[error("not a member of the thread")]
    NotMember,
    /// A unique key already exists (a username, a token).
    #[error("already exists")]
    Conflict,
    /// The backend cannot serve requests now (closed, disk full, busy); retrying may work.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Anything else; a bug or corruption.
    #[error("storage failure: {0}")]
    Internal(String),
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Its id.
    pub id: UserId,
    /// Its unique username.
    pub username: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// Creation time (ms).
    pub created_at: i64,
    /// When the user was last connected (ms).
    pub last_seen_at: Option<i64>,
}

/// A logged-in device: one session token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its id.
    pub id: DeviceId,
    /// Its owner.
    pub user_id: UserId,
    /// Name given at login.
    pub name: String,
    /// Login time (ms).
    pub created_at: i64,
    /// When it was last connected (ms).
    pub last_seen_at: Option<i64>,
}

/// A message to append to a thread.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The thread.
    pub thread_id: ThreadId,
    /// The sender (must be a member).
    pub sender_id: UserId,
    /// The sender's device.
    pub sender_device_id: DeviceId,
    /// The sender's dedupe key.
    pub client_msg_id: String,
    /// What it is.
    pub kind: MessageKind,
    /// Its text.
    pub body: String,
}

/// The result of [`Store::append_message`].
#[derive(Debug, Clone)]
pub struct Appended {
    /// The stored message: the new one, or the one first stored under the same dedupe key.
    pub message: Message,
    /// True when the dedupe key was already used and nothing new was stored.
    pub duplicate: bool,
    /// Current members of the thread, to deliver to.
    pub members: Arc<[UserId]>,
}

/// Called with a message as its transaction commits (see [`Store::append_message`]).
pub type CommitHook = Box<dyn FnOnce(&Appended) + Send>;

/// A user's membership of a thread, with the thread's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// What the thread is.
    pub kind: ThreadKind,
    /// Seq of the thread's newest message.
    pub last_seq: u64,
    /// The member sees messages after this seq.
    pub joined_seq: u64,
    /// Read marker.
    pub read_seq: u64,
    /// Delivered marker.
    pub delivered_seq: u64,
}

/// The result of [`Store::set_marker`].
#[derive(Debug, Clone)]
pub struct MarkerUpdate {
    /// The marker's value after the update (markers never move back).
    pub seq: u64,
    /// Whether it moved.
    pub changed: bool,
    /// Current members of the thread, to notify.
    pub members: Arc<[UserId]>,
}

/// A range of seqs, both ends exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    /// Only seqs above this.
    pub after: u64,
    /// Only seqs below this.
    pub before: u64,
}

/// Which end of a [`SeqRange`] a page is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFrom {
    /// The lowest seqs (filling forwards).
    Oldest,
    /// The highest seqs (paging backwards).
    Newest,
}

/// Persistent chat state. Implemented by [`SqliteStore`]; a PostgreSQL backend comes next.
///
/// Every write is durable when its future resolves `Ok`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates an account. Fails with `Conflict` when the username is taken.
    async fn create_user(&self, username: &str, password_hash: &str) -> Result<User>;
    /// Returns a user by id.
    async fn get_user(&self, id: UserId) -> Result<Option<User>>;
    /// Returns a user by username.
    async fn get_user_by_username(&self, username: &str) -> Result<Option<User>>;
    /// Records when a user was last connected.
    async fn set_last_seen(&self, user_id: UserId, at: i64) -> Result<()>;

    /// Registers a device whose session token hashes to `token_hash`.
    async fn create_device(
        &self,
        user_id: UserId,
        name: &str,
        token_hash: [u8; 32],
    ) -> Result<Device>;
    /// Returns the device and its owner for a session token hash.
    async fn get_device_by_token(&self, token_hash: [u8; 32]) -> Result<Option<(Device, User)>>;
    /// Lists a user's devices, oldest first.
    async fn list_devices(&self, user_id: UserId) -> Result<Vec<Device>>;
    /// Deletes one of a user's devices. Returns false when it was not theirs or not there.
    async fn delete_device(&self, user_id: UserId, device_id: DeviceId) -> Result<bool>;
    /// Records when a device was last connected.
    async fn touch_device(&self, device_id: DeviceId, at: i64) -> Result<()>;

    /// Returns the direct thread of two users, creating it (and both memberships) on first use.
    async fn get_or_create_direct_thread(&self, a: UserId, b: UserId) -> Result<ThreadId>;
    /// Returns a user's membership of a thread: `ThreadNotFound`, `NotMember`, or the membership.
    async fn get_membership(&self, thread_id: ThreadId, user_id: UserId) -> Result<Membership>;
    /// Lists the users sharing at least one thread with `user_id`.
    async fn list_thread_peers(&self, user_id: UserId) -> Result<Vec<UserId>>;

    /// Appends a message with the thread's next seq, or returns the message first stored
    /// under the same (sender, client_msg_id). Moves the sender's read marker to it.
    ///
    /// `on_commit` runs once the message is durable, before the future resolves, and in
    /// seq order for the messages of one thread; it must not block.
    async fn append_message(&self, msg: NewMessage, on_commit: CommitHook) -> Result<Appended>;
    /// Returns up to `limit` messages of a thread within `range`, in ascending seq order,
    /// taken from the given end of the range.
    async fn list_messages(
        &self,
        thread_id: ThreadId,
        range: SeqRange,
        from: PageFrom,
        limit: u32,
    ) -> Result<Vec<Message>>;
    /// Moves a member's marker up to `seq` (clamped to the thread's last seq). Read implies delivered.
    async fn set_marker(
        &self,
        thread_id: ThreadId,
        user_id: UserId,
        kind: MarkKind,
        seq: u64,
    ) -> Result<MarkerUpdate>;
    /// Lists a user's threads, most recently updated first.
    async fn list_threads(&self, user_id: UserId) -> Result<Vec<ThreadSummary>>;

    /// Finishes pending writes and stops accepting new ones.
    async fn close(&self);
}

//! Persistent chat state behind one async trait, [`Store`], shaped for a networked backend.
//!
//! [`SqliteStore`] is the embedded default: one writer thread commits many requests in one
//! transaction (group commit) and answers none of them before that commit is durable.
//! [`PostgresStore`] serves several server nodes sharing one PostgreSQL database: row locks,
//! not in-process state, order seqs and changes, and the same suite checks both backends.

mod common;
mod postgres;
mod sqlite;
#[cfg(test)]
mod suite;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

use std::sync::Arc;

use async_trait::async_trait;
use pigeon_proto::{
    ContactAction, ContactInfo, DeviceId, GroupInfo, MarkKind, MemberInfo, Message, MessageKind,
    Role, ThreadId, ThreadKind, ThreadSettings, ThreadSummary, UserEventRecord, UserId, UserRef,
};

pub use postgres::{PostgresConfig, PostgresStore};
pub use sqlite::{SqliteConfig, SqliteStore};

/// Threads with more members than this do not make their members each other's presence
/// audience, and do not broadcast read receipts: in a 10,000-member group that would be
/// 10,000 events per connect or read, to people who mostly do not know each other.
pub const PRESENCE_GROUP_LIMIT: u32 = 256;

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
    /// The backend cannot serve requests now (closed, disk full, busy, database
    /// unreachable); retrying may work.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The caller's role does not allow the change.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The other user blocked the caller.
    #[error("blocked")]
    Blocked,
    /// A limit would be exceeded.
    #[error("{0}")]
    LimitExceeded(String),
    /// The group is closed.
    #[error("group is closed")]
    GroupClosed,
    /// A user named in the request does not exist.
    #[error("unknown user")]
    UnknownUser,
    /// The user the change is about is not a member of the thread.
    #[error("user is not a member of the thread")]
    TargetNotMember,
    /// There is no pending friend request in the needed direction.
    #[error("no pending friend request")]
    NoPendingRequest,
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
    /// Whether the user hides last-seen from everyone.
    pub hide_last_seen: bool,
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

/// Called with a result as its transaction commits, in commit order; must not block.
pub type Hook<T> = Box<dyn FnOnce(&T) + Send>;

/// Called with a message as its transaction commits (see [`Store::append_message`]).
pub type CommitHook = Hook<Appended>;

/// Who makes a group change: the user and the device (the system message's sender).
#[derive(Debug, Clone, Copy)]
pub struct Actor {
    /// The user.
    pub user_id: UserId,
    /// Their device.
    pub device_id: DeviceId,
}

/// A group to create.
#[derive(Debug, Clone)]
pub struct NewGroup {
    /// Title.
    pub title: String,
    /// Topic.
    pub topic: Option<String>,
    /// Avatar reference.
    pub avatar: Option<String>,
    /// Whether new members see earlier messages.
    pub share_history: bool,
    /// The other first members.
    pub members: Vec<UserId>,
}

/// Limits checked inside the transaction that changes membership.
#[derive(Debug, Clone, Copy)]
pub struct GroupLimits {
    /// Most members in a group.
    pub max_members: u32,
    /// Most groups a user may belong to.
    pub max_groups_per_user: u32,
}

/// A change to a group.
#[derive(Debug, Clone)]
pub enum GroupChange {
    /// Add these users (admins and the owner).
    AddMembers(Vec<UserId>),
    /// Remove this member (admins remove members; the owner anyone).
    RemoveMember(UserId),
    /// The actor leaves.
    Leave,
    /// Change shared settings (admins and the owner); `Some("")` clears topic or avatar.
    Update {
        /// New title.
        title: Option<String>,
        /// New topic.
        topic: Option<String>,
        /// New avatar.
        avatar: Option<String>,
        /// New history visibility.
        share_history: Option<bool>,
    },
    /// Make a member an admin or a plain member (the owner only).
    SetRole(UserId, Role),
    /// Hand ownership over (the owner only).
    TransferOwnership(UserId),
}

/// What a group change did.
#[derive(Debug, Clone)]
pub struct GroupChanged {
    /// The group after the change.
    pub group: GroupInfo,
    /// The system message recording it (none when nothing changed).
    pub message: Option<Message>,
    /// Who gets the system message: the members after the change, plus anyone removed.
    pub recipients: Arc<[UserId]>,
    /// Per-user events written (joined, left), to publish to those users.
    pub user_events: Vec<(UserId, UserEventRecord)>,
}

/// A partial change of a member's own thread settings.
#[derive(Debug, Clone, Default)]
pub struct SettingsPatch {
    /// Mute.
    pub muted: Option<bool>,
    /// Pin.
    pub pinned: Option<bool>,
    /// Archive.
    pub archived: Option<bool>,
    /// Nickname; `Some("")` clears it.
    pub nickname: Option<String>,
}

/// What a contact action did.
#[derive(Debug, Clone)]
pub struct ContactChanged {
    /// The owner's entry now.
    pub contact: ContactInfo,
    /// Per-user events written, to publish to those users (the peer's only when they may know).
    pub user_events: Vec<(UserId, UserEventRecord)>,
}

/// A page of a user's event log.
#[derive(Debug, Clone)]
pub struct UserEventsPage {
    /// Events after the requested seq, in order.
    pub events: Vec<UserEventRecord>,
    /// The user's highest event seq.
    pub last_seq: u64,
    /// True when some events after the requested seq are no longer kept.
    pub reset: bool,
}

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
    /// Role (groups).
    pub role: Role,
}

/// The result of [`Store::set_marker`].
#[derive(Debug, Clone)]
pub struct MarkerUpdate {
    /// The marker's value after the update (markers never move back).
    pub seq: u64,
    /// The user's own `read` event, when a read marker moved.
    pub user_event: Option<UserEventRecord>,
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

/// Persistent chat state. Implemented by [`SqliteStore`] and [`PostgresStore`].
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
    /// Lists the users who may see `user_id`'s presence: friends and users sharing a
    /// thread of at most [`PRESENCE_GROUP_LIMIT`] members, minus users `user_id` blocked.
    async fn list_presence_audience(&self, user_id: UserId) -> Result<Vec<UserId>>;
    /// Whether `viewer` may see `target`'s presence: a friend or thread peer not blocked by them.
    async fn can_see_presence(&self, viewer: UserId, target: UserId) -> Result<bool>;
    /// Whether `blocker` blocked `blocked`.
    async fn is_blocked(&self, blocker: UserId, blocked: UserId) -> Result<bool>;
    /// Returns the current members of a thread.
    async fn get_members(&self, thread_id: ThreadId) -> Result<Arc<[UserId]>>;

    /// Appends a message with the thread's next seq, or returns the message first stored
    /// under the same (sender, client_msg_id). Moves the sender's read marker to it.
    ///
    /// `on_commit` runs once the message is durable, before the future resolves, and in
    /// seq order for the messages of one thread; it must not block.
    async fn append_message(&self, msg: NewMessage, on_commit: CommitHook) -> Result<Appended>;
    /// Appends several messages as [`Self::append_message`] would one after the other, in
    /// this order (the sends one connection had waiting), usually in one transaction.
    /// One outcome per message, in the same order; a refused message does not stop the
    /// others.
    async fn append_messages(&self, msgs: Vec<(NewMessage, CommitHook)>) -> Vec<Result<Appended>> {
        let mut outcomes = Vec::with_capacity(msgs.len());
        for (msg, on_commit) in msgs {
            outcomes.push(self.append_message(msg, on_commit).await);
        }
        outcomes
    }
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

    /// Creates a group with its first system message; `on_commit` runs in commit order.
    async fn create_group(
        &self,
        creator: Actor,
        group: NewGroup,
        limits: GroupLimits,
        on_commit: Hook<GroupChanged>,
    ) -> Result<GroupChanged>;
    /// Applies a membership or settings change to a group, checking the actor's role,
    /// and records it as a system message; `on_commit` runs in commit order.
    async fn change_group(
        &self,
        actor: Actor,
        thread_id: ThreadId,
        change: GroupChange,
        limits: GroupLimits,
        on_commit: Hook<GroupChanged>,
    ) -> Result<GroupChanged>;
    /// Returns a group's settings.
    async fn get_group(&self, thread_id: ThreadId) -> Result<GroupInfo>;
    /// Lists a group's members in user id order, after `after`.
    async fn list_members(
        &self,
        thread_id: ThreadId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<MemberInfo>>;
    /// Lists the open groups whose members are exactly `members`.
    async fn find_groups(&self, members: Vec<UserId>) -> Result<Vec<GroupInfo>>;
    /// Changes a member's own settings for a thread.
    async fn set_thread_settings(
        &self,
        user_id: UserId,
        thread_id: ThreadId,
        patch: SettingsPatch,
    ) -> Result<(ThreadSettings, UserEventRecord)>;

    /// Applies a contact action of `owner` towards `peer`.
    async fn contact_action(
        &self,
        owner: UserId,
        peer: UserId,
        action: ContactAction,
    ) -> Result<ContactChanged>;
    /// Sets `owner`'s alias for `peer`.
    async fn set_alias(
        &self,
        owner: UserId,
        peer: UserId,
        alias: Option<String>,
    ) -> Result<ContactChanged>;
    /// Lists `owner`'s contact book (presence not included).
    async fn list_contacts(&self, owner: UserId) -> Result<Vec<ContactInfo>>;
    /// Finds users whose username starts with `prefix`, leaving out those who blocked `viewer`.
    async fn search_users(&self, viewer: UserId, prefix: &str, limit: u32) -> Result<Vec<UserRef>>;
    /// Sets whether `user_id` hides last-seen.
    async fn set_privacy(&self, user_id: UserId, hide_last_seen: bool) -> Result<UserEventRecord>;
    /// Lists `user_id`'s events after `after` (at most `limit`).
    async fn list_user_events(
        &self,
        user_id: UserId,
        after: u64,
        limit: u32,
    ) -> Result<UserEventsPage>;

    /// Finishes pending writes and stops accepting new ones.
    async fn close(&self);

    /// Cluster presence: `user` has (`online`) or no longer has connections on `node`; the
    /// record counts for `ttl_ms` unless refreshed. Time is the database's clock, so nodes'
    /// clocks need not agree. A single-node store keeps no shared presence and ignores
    /// this (see [`Store::presence_online`]).
    async fn presence_set(
        &self,
        _node: i64,
        _user: UserId,
        _online: bool,
        _ttl_ms: i64,
    ) -> Result<()> {
        Ok(())
    }

    /// Cluster presence: extends the records of `users`, the users with connections on
    /// `node`, by `ttl_ms` (writing any a failed [`Store::presence_set`] missed), and
    /// forgets expired records.
    async fn presence_refresh(&self, _node: i64, _users: &[UserId], _ttl_ms: i64) -> Result<()> {
        Ok(())
    }

    /// Cluster presence: which of `users` have connections on some live node.
    /// `None` when this store keeps no shared presence: the node's own count is the truth.
    async fn presence_online(&self, _users: &[UserId]) -> Result<Option<Vec<UserId>>> {
        Ok(None)
    }

    /// Checks that the backend answers (for `/healthz`): one cheap read.
    async fn ping(&self) -> Result<()> {
        self.get_user(UserId::from_bytes([0; 16])).await.map(|_| ())
    }
}

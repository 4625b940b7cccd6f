//! Gateway frames: what clients send ([`ClientFrame`]) and what the server sends ([`ServerFrame`]).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{
    ContactInfo, DeviceId, ErrorCode, GroupInfo, MemberInfo, MessageId, ReqId, Role, SystemEvent,
    ThreadId, ThreadSettings, UserEvent, UserId,
};

/// A frame sent by a client: a request, answered by a [`ServerFrame`] carrying the same `id`.
///
/// ```
/// use pigeon_proto::ClientFrame;
/// let frame: ClientFrame = serde_json::from_str(
///     r#"{"type":"send","id":1,"to":"bob","client_msg_id":"m1","body":"hi"}"#,
/// ).unwrap();
/// assert!(matches!(frame, ClientFrame::Send { .. }));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Authenticates a socket opened without an `Authorization` header. Must be the first frame.
    Hello {
        /// Request id.
        id: ReqId,
        /// The session token returned by login.
        token: String,
    },
    /// Application heartbeat; answered by `pong`.
    Ping {
        /// Request id.
        id: ReqId,
    },
    /// Sends a text message, to a user (`to`) or into a thread (`thread_id`).
    Send {
        /// Request id.
        id: ReqId,
        /// Recipient of a direct message: a username or a user id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        /// Thread to post into (instead of `to`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        thread_id: Option<ThreadId>,
        /// Client-chosen id, unique per sender; a resend with the same id is not stored twice.
        client_msg_id: String,
        /// Message text.
        body: String,
    },
    /// Moves the caller's delivered or read marker in a thread up to `seq`.
    Mark {
        /// Request id.
        id: ReqId,
        /// The thread.
        thread_id: ThreadId,
        /// Highest seq delivered or read.
        seq: u64,
        /// Which marker.
        kind: MarkKind,
    },
    /// Reads a page of a thread's history.
    History {
        /// Request id.
        id: ReqId,
        /// The thread.
        thread_id: ThreadId,
        /// Only messages with a lower seq (paging backwards); the newest when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        /// Only messages with a higher seq (filling a gap forwards).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
        /// Page size (default 50, at most 200).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Fetches everything missed: `have` maps each thread the client knows to the highest
    /// contiguous seq it holds; threads absent from it are sent from the start.
    Sync {
        /// Request id.
        id: ReqId,
        /// Highest contiguous seq held, per thread.
        #[serde(default)]
        have: HashMap<ThreadId, u64>,
        /// Most messages in this page (default 500, at most 1000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        /// The highest per-user event seq the client holds; events after it are returned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        events_after: Option<u64>,
        /// Only threads with an id at or after this one are considered (ids in byte order,
        /// which is the order of their lowercase text). With `threads_before`, a client
        /// holding more threads than one frame can list syncs them range by range.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        threads_from: Option<ThreadId>,
        /// Only threads with an id before this one are considered.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        threads_before: Option<ThreadId>,
    },
    /// Lists the caller's conversations, most recent first, with the total unread.
    Threads {
        /// Request id.
        id: ReqId,
    },
    /// Asks whether a user is online, and when they were last seen.
    Presence {
        /// Request id.
        id: ReqId,
        /// A username or a user id.
        user: String,
    },
    /// Lists the caller's logged-in devices.
    Devices {
        /// Request id.
        id: ReqId,
    },
    /// Revokes one of the caller's devices; its connections close.
    RevokeDevice {
        /// Request id.
        id: ReqId,
        /// The device to revoke.
        device_id: DeviceId,
    },
    /// Creates a group; the caller becomes its owner.
    CreateGroup {
        /// Request id.
        id: ReqId,
        /// Its title (1–128 characters).
        title: String,
        /// The other first members: usernames or user ids.
        #[serde(default)]
        members: Vec<String>,
        /// Its topic.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
        /// A reference to its avatar.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        avatar: Option<String>,
        /// Whether new members see messages from before they joined (default false).
        #[serde(default)]
        share_history: bool,
    },
    /// Adds members to a group (admins and the owner).
    AddMembers {
        /// Request id.
        id: ReqId,
        /// The group.
        thread_id: ThreadId,
        /// Usernames or user ids (at most 1,000 per request).
        members: Vec<String>,
    },
    /// Removes a member from a group (admins remove members; the owner removes anyone).
    RemoveMember {
        /// Request id.
        id: ReqId,
        /// The group.
        thread_id: ThreadId,
        /// A username or user id.
        user: String,
    },
    /// Leaves a group.
    LeaveGroup {
        /// Request id.
        id: ReqId,
        /// The group.
        thread_id: ThreadId,
    },
    /// Changes a group's title, topic, avatar or history visibility (admins and the owner).
    UpdateGroup {
        /// Request id.
        id: ReqId,
        /// The group.
        thread_id: ThreadId,
        /// New title.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
        /// New topic; empty clears it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
        /// New avatar reference; empty clears it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        avatar: Option<String>,
        /// New history visibility for members who join from now on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        share_history: Option<bool>,
    },
    /// Promotes a member to admin or demotes an admin (the owner only).
    SetRole {
        /// Request id.
        id: ReqId,
        /// The group.
        thread_id: ThreadId,
        /// A username or user id.
        user: String,
        /// `admin` or `member`.
        role: Role,
    },
    /// Hands ownership to another member; the caller becomes an admin (the owner only).
    TransferOwnership {
        /// Request id.
        id: ReqId,
        /// The group.
        thread_id: ThreadId,
        /// A username or user id.
        user: String,
    },
    /// Returns a group's settings.
    GroupInfo {
        /// Request id.
        id: ReqId,
        /// The group.
        thread_id: ThreadId,
    },
    /// Lists a group's members, in user id order, a page at a time.
    GroupMembers {
        /// Request id.
        id: ReqId,
        /// The group.
        thread_id: ThreadId,
        /// Only members with a higher user id (the last one of the previous page).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<UserId>,
        /// Page size (default 200, at most 1,000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Finds the caller's open groups whose members are exactly the caller plus `members`.
    FindGroups {
        /// Request id.
        id: ReqId,
        /// The other members: usernames or user ids.
        members: Vec<String>,
    },
    /// Changes the caller's own settings for a thread; absent fields stay as they are.
    ThreadSettings {
        /// Request id.
        id: ReqId,
        /// The thread.
        thread_id: ThreadId,
        /// Mute (no push, out of the total unread).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        muted: Option<bool>,
        /// Pin to the top.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pinned: Option<bool>,
        /// Archive.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        archived: Option<bool>,
        /// The caller's own name for the thread; empty clears it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nickname: Option<String>,
    },
    /// Tells the thread's other members the caller is (or stopped) typing. Never stored.
    Typing {
        /// Request id.
        id: ReqId,
        /// The thread.
        thread_id: ThreadId,
        /// True while typing; false when stopped.
        #[serde(default = "default_true")]
        active: bool,
    },
    /// Acts on a contact: friend requests, removal, blocking.
    Contact {
        /// Request id.
        id: ReqId,
        /// A username or user id.
        user: String,
        /// What to do.
        action: ContactAction,
    },
    /// Sets (or clears, with null or empty) the caller's name for a contact.
    SetAlias {
        /// Request id.
        id: ReqId,
        /// A username or user id.
        user: String,
        /// The alias.
        #[serde(default)]
        alias: Option<String>,
    },
    /// Lists the caller's contact book, with presence where visible.
    Contacts {
        /// Request id.
        id: ReqId,
    },
    /// Finds users by username prefix, to add them.
    SearchUsers {
        /// Request id.
        id: ReqId,
        /// The start of a username.
        prefix: String,
        /// Most results (default and maximum 20).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Sets the caller's privacy settings.
    SetPrivacy {
        /// Request id.
        id: ReqId,
        /// Hide last-seen from everyone.
        hide_last_seen: bool,
    },
}

impl ClientFrame {
    /// Returns the request id of this frame.
    pub fn id(&self) -> &ReqId {
        match self {
            Self::Hello { id, .. }
            | Self::Ping { id }
            | Self::Send { id, .. }
            | Self::Mark { id, .. }
            | Self::History { id, .. }
            | Self::Sync { id, .. }
            | Self::Threads { id }
            | Self::Presence { id, .. }
            | Self::Devices { id }
            | Self::RevokeDevice { id, .. }
            | Self::CreateGroup { id, .. }
            | Self::AddMembers { id, .. }
            | Self::RemoveMember { id, .. }
            | Self::LeaveGroup { id, .. }
            | Self::UpdateGroup { id, .. }
            | Self::SetRole { id, .. }
            | Self::TransferOwnership { id, .. }
            | Self::GroupInfo { id, .. }
            | Self::GroupMembers { id, .. }
            | Self::FindGroups { id, .. }
            | Self::ThreadSettings { id, .. }
            | Self::Typing { id, .. }
            | Self::Contact { id, .. }
            | Self::SetAlias { id, .. }
            | Self::Contacts { id }
            | Self::SearchUsers { id, .. }
            | Self::SetPrivacy { id, .. } => id,
        }
    }
}

fn default_true() -> bool {
    true
}

/// What a `contact` request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContactAction {
    /// Sends a friend request (accepts theirs if they already sent one).
    Request,
    /// Accepts their request.
    Accept,
    /// Declines their request.
    Decline,
    /// Withdraws the caller's request.
    Cancel,
    /// Ends a friendship.
    Remove,
    /// Blocks them: no direct messages, group adds, requests or presence from them.
    Block,
    /// Lifts a block.
    Unblock,
}

/// Which per-member marker a `mark` request or a `receipt` event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkKind {
    /// Messages up to `seq` reached one of the member's devices.
    Delivered,
    /// Messages up to `seq` were seen by the member (implies delivered).
    Read,
}

/// What a thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThreadKind {
    /// The one thread of a pair of users.
    Direct,
    /// A group conversation.
    Group,
}

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// Text written by a user.
    Text,
    /// A membership or settings change, described by the message's `system` field.
    System,
}

/// A stored message, as delivered in events, history and sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The thread it belongs to.
    pub thread_id: ThreadId,
    /// Its position in the thread: 1, 2, 3… with no gaps.
    pub seq: u64,
    /// Its unique id.
    pub message_id: MessageId,
    /// Who sent it.
    pub sender_id: UserId,
    /// From which of the sender's devices.
    pub sender_device_id: DeviceId,
    /// The sender's id for it (dedupe key).
    pub client_msg_id: String,
    /// What it is.
    pub kind: MessageKind,
    /// Its text (empty for system messages).
    pub body: String,
    /// What a system message records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<SystemEvent>,
    /// When the server committed it, in milliseconds since the Unix epoch.
    pub created_at: i64,
}

/// A user, named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRef {
    /// The user's id.
    pub user_id: UserId,
    /// The user's username.
    pub username: String,
}

/// One entry of the conversation list, also returned by `sync` for threads that changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadSummary {
    /// The thread.
    pub thread_id: ThreadId,
    /// Direct or group.
    pub kind: ThreadKind,
    /// The other user of a direct thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<UserRef>,
    /// Seq of the newest message (0 when empty).
    pub last_seq: u64,
    /// The newest message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message: Option<Message>,
    /// `last_seq − read_seq`.
    pub unread: u64,
    /// Whether the caller muted the thread (muted threads are left out of the total unread).
    pub muted: bool,
    /// Whether the caller pinned it.
    pub pinned: bool,
    /// Whether the caller archived it.
    pub archived: bool,
    /// The caller's own name for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nickname: Option<String>,
    /// The group's settings (group threads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupInfo>,
    /// The caller's role (group threads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The caller sees messages after this seq (they joined then; 0 when they see all).
    pub joined_seq: u64,
    /// The caller's read marker.
    pub read_seq: u64,
    /// The caller's delivered marker.
    pub delivered_seq: u64,
    /// The peer's read marker (direct threads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_read_seq: Option<u64>,
    /// The peer's delivered marker (direct threads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_delivered_seq: Option<u64>,
    /// Time of the last message (or creation), in milliseconds since the Unix epoch.
    pub updated_at: i64,
}

/// One of a user's logged-in devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The device.
    pub device_id: DeviceId,
    /// The name given at login.
    pub name: String,
    /// When it logged in, in milliseconds since the Unix epoch.
    pub created_at: i64,
    /// When it was last connected, in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_at: Option<i64>,
    /// Whether this is the device making the request.
    pub current: bool,
}

/// A frame sent by the server: the answer to a request (with its `id`) or an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The socket is authenticated. Sent at once with header auth, or in answer to `hello`.
    Welcome {
        /// The `hello` request id, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        /// Protocol version.
        protocol: u16,
        /// The authenticated user.
        user_id: UserId,
        /// Their username.
        username: String,
        /// This device.
        device_id: DeviceId,
        /// Milliseconds of silence after which the server closes the socket; ping well before.
        heartbeat_timeout_ms: u64,
        /// Largest message body accepted, in bytes.
        max_body_bytes: usize,
        /// Largest frame accepted, in bytes.
        max_frame_bytes: usize,
    },
    /// Answer to `ping`.
    Pong {
        /// Request id.
        id: ReqId,
        /// Server time, in milliseconds since the Unix epoch.
        server_time: i64,
    },
    /// Answer to `send`: the message is committed. A resend gets the same answer.
    Sent {
        /// Request id.
        id: ReqId,
        /// The client's id for the message.
        client_msg_id: String,
        /// The thread it went into.
        thread_id: ThreadId,
        /// Its seq in the thread.
        seq: u64,
        /// Its id.
        message_id: MessageId,
        /// When it was committed, in milliseconds since the Unix epoch.
        server_time: i64,
    },
    /// Answer to a request that returns nothing else (`mark`, `revoke_device`).
    Ok {
        /// Request id.
        id: ReqId,
    },
    /// Answer to `history`: messages in ascending seq order.
    History {
        /// Request id.
        id: ReqId,
        /// The thread.
        thread_id: ThreadId,
        /// The page, oldest first.
        messages: Vec<Message>,
        /// Whether more messages lie beyond the page in the direction asked.
        more: bool,
    },
    /// Answer to `sync`: threads that changed, and the messages missed (ascending seq per thread).
    Sync {
        /// Request id.
        id: ReqId,
        /// Summaries of the threads with something new or unknown to the client.
        threads: Vec<ThreadSummary>,
        /// Missed messages, grouped by thread, ascending seq within a thread.
        messages: Vec<Message>,
        /// Whether another `sync` (with `have` advanced) is needed.
        more: bool,
        /// Per-user events after `events_after` (only when it was given).
        #[serde(default)]
        events: Vec<UserEventRecord>,
        /// The highest per-user event seq: pass it as `events_after` next time.
        event_cursor: u64,
        /// True when events after `events_after` are no longer kept: refetch `threads` and
        /// `contacts` instead of replaying.
        #[serde(default)]
        events_reset: bool,
    },
    /// Answer to `threads`: the conversation list.
    Threads {
        /// Request id.
        id: ReqId,
        /// Conversations, most recent first.
        threads: Vec<ThreadSummary>,
        /// Sum of `unread` over the threads that are not muted.
        total_unread: u64,
    },
    /// Presence of a user: an answer to `presence` (with `id`) or an event (without).
    Presence {
        /// Request id, when this answers a request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        /// The user.
        user_id: UserId,
        /// Their username.
        username: String,
        /// Whether any of their devices is connected.
        online: bool,
        /// When they were last connected, in milliseconds since the Unix epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_seen: Option<i64>,
    },
    /// Answer to `devices`.
    Devices {
        /// Request id.
        id: ReqId,
        /// The caller's devices.
        devices: Vec<DeviceInfo>,
    },
    /// Event: a new message in one of the user's threads.
    Message(Message),
    /// Event: a member's delivered or read marker moved.
    Receipt {
        /// The thread.
        thread_id: ThreadId,
        /// Whose marker.
        user_id: UserId,
        /// Which marker.
        kind: MarkKind,
        /// Its new value.
        seq: u64,
    },
    /// Answer to `create_group`, `update_group` and `group_info`.
    Group {
        /// Request id.
        id: ReqId,
        /// The group now.
        group: GroupInfo,
    },
    /// Answer to `group_members`.
    Members {
        /// Request id.
        id: ReqId,
        /// The group.
        thread_id: ThreadId,
        /// A page of members, in user id order.
        members: Vec<MemberInfo>,
        /// Whether more follow (ask again with `after` = the last user id).
        more: bool,
    },
    /// Answer to `find_groups`.
    Groups {
        /// Request id.
        id: ReqId,
        /// The matching groups.
        groups: Vec<GroupInfo>,
    },
    /// Answer to `thread_settings`.
    Settings {
        /// Request id.
        id: ReqId,
        /// The thread.
        thread_id: ThreadId,
        /// The settings now.
        settings: ThreadSettings,
    },
    /// Answer to `contact` and `set_alias`: the entry now.
    Contact {
        /// Request id.
        id: ReqId,
        /// The entry.
        contact: ContactInfo,
    },
    /// Answer to `contacts`.
    Contacts {
        /// Request id.
        id: ReqId,
        /// The contact book.
        contacts: Vec<ContactInfo>,
    },
    /// Answer to `search_users`.
    Users {
        /// Request id.
        id: ReqId,
        /// Users whose username starts with the prefix.
        users: Vec<UserRef>,
    },
    /// Event: a member is typing in a thread (or stopped). Show it for at most `expires_ms`.
    Typing {
        /// The thread.
        thread_id: ThreadId,
        /// Who.
        user_id: UserId,
        /// False when they stopped.
        active: bool,
        /// Milliseconds after which to hide it unless refreshed.
        expires_ms: u64,
    },
    /// Event: a change to the user's own state, from the per-user event log.
    UserEvent(UserEventRecord),
    /// A request failed. The connection stays usable.
    Error {
        /// Request id, when the request had a readable one.
        #[serde(default)]
        id: Option<ReqId>,
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
}

impl ServerFrame {
    /// Returns the request id of an answer; `None` for events.
    pub fn request_id(&self) -> Option<&ReqId> {
        match self {
            Self::Welcome { id, .. } | Self::Presence { id, .. } | Self::Error { id, .. } => {
                id.as_ref()
            }
            Self::Pong { id, .. }
            | Self::Sent { id, .. }
            | Self::Ok { id }
            | Self::History { id, .. }
            | Self::Sync { id, .. }
            | Self::Threads { id, .. }
            | Self::Devices { id, .. }
            | Self::Group { id, .. }
            | Self::Members { id, .. }
            | Self::Groups { id, .. }
            | Self::Settings { id, .. }
            | Self::Contact { id, .. }
            | Self::Contacts { id, .. }
            | Self::Users { id, .. } => Some(id),
            Self::Message(_) | Self::Receipt { .. } | Self::Typing { .. } | Self::UserEvent(_) => {
                None
            }
        }
    }
}

/// One entry of a user's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEventRecord {
    /// Its position in the user's log: 1, 2, 3…
    pub seq: u64,
    /// What happened.
    pub event: UserEvent,
}

/// The body of a long-poll answer (`GET /v1/events`). `events` are server frames.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PollResponse {
    /// Pass this as `cursor` in the next poll.
    pub cursor: String,
    /// True when the server started a new event stream: sync before trusting it.
    pub reset: bool,
    /// Events since the cursor, in order.
    pub events: Vec<ServerFrame>,
}

/// Whether `sync` with `threads_from` and `threads_before` covers `id`: at or after the
/// first, before the second (ids in byte order). The server and the SDK both decide by it.
pub fn in_sync_range(id: ThreadId, from: Option<ThreadId>, before: Option<ThreadId>) -> bool {
    from.is_none_or(|from| id >= from) && before.is_none_or(|before| id < before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_event_is_flat() {
        let msg = Message {
            thread_id: ThreadId::new(),
            seq: 3,
            message_id: MessageId::new(),
            sender_id: UserId::new(),
            sender_device_id: DeviceId::new(),
            client_msg_id: "c1".into(),
            kind: MessageKind::Text,
            body: "hi".into(),
            system: None,
            created_at: 1,
        };
        let value = serde_json::to_value(ServerFrame::Message(msg.clone())).unwrap();
        assert_eq!(value["type"], "message");
        assert_eq!(value["seq"], 3);
        assert_eq!(value["body"], "hi");
        let back: ServerFrame = serde_json::from_value(value).unwrap();
        assert_eq!(back, ServerFrame::Message(msg));
    }

    #[test]
    fn error_frame_shape() {
        let frame = ServerFrame::Error {
            id: Some(ReqId::Int(4)),
            code: ErrorCode::NotMember,
            message: "not a member of this thread".into(),
        };
        let value = serde_json::to_value(frame).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"type":"error","id":4,"code":"not_member","message":"not a member of this thread"})
        );
    }

    #[test]
    fn sync_have_defaults_to_empty() {
        let frame: ClientFrame = serde_json::from_str(r#"{"type":"sync","id":"s"}"#).unwrap();
        assert_eq!(
            frame,
            ClientFrame::Sync {
                id: ReqId::Str("s".into()),
                have: HashMap::new(),
                limit: None,
                events_after: None,
                threads_from: None,
                threads_before: None,
            }
        );
    }
}

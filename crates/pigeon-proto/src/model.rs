//! Data carried by frames for groups, contacts, settings and the per-user event log.

use serde::{Deserialize, Serialize};

use crate::{ThreadId, UserId};

/// A member's role in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sends and reads; may leave and change their own settings.
    Member,
    /// Also adds and removes members, renames, sets topic, avatar and history visibility.
    Admin,
    /// Also promotes and demotes admins and hands ownership over.
    Owner,
}

impl Role {
    /// Returns the stored name of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Admin => "admin",
            Self::Owner => "owner",
        }
    }

    /// Reads a stored role name; unknown names are plain members.
    pub fn parse(text: &str) -> Self {
        match text {
            "owner" => Self::Owner,
            "admin" => Self::Admin,
            _ => Self::Member,
        }
    }
}

/// A group's shared settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// The group's thread.
    pub thread_id: ThreadId,
    /// Its title.
    pub title: String,
    /// Its topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// A reference to its avatar (an opaque string: a URL or a media id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// Whether new members see messages from before they joined.
    pub share_history: bool,
    /// Number of members.
    pub member_count: u32,
    /// Whether the group is closed (its last member left).
    pub closed: bool,
}

/// One member of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The member.
    pub user_id: UserId,
    /// Their username.
    pub username: String,
    /// Their role.
    pub role: Role,
    /// When they joined, in milliseconds since the Unix epoch.
    pub joined_at: i64,
    /// Their read marker (never below the seq they joined at). Only in groups small enough
    /// to send read receipts, where members see the same markers move live as `receipt`s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_seq: Option<u64>,
    /// Their delivered marker, like `read_seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_seq: Option<u64>,
}

/// What a system message (kind `system`) records. Membership and settings changes are
/// messages in the thread's own timeline, so every device sees the same history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SystemEvent {
    /// The group was created with these members.
    Created {
        /// Its title.
        title: String,
        /// Its first members, creator included.
        members: Vec<UserId>,
    },
    /// The sender added these users.
    MembersAdded {
        /// Who was added.
        users: Vec<UserId>,
    },
    /// The sender removed this user.
    MemberRemoved {
        /// Who was removed.
        user: UserId,
    },
    /// The sender left. `new_owner` is set when ownership passed on because of it.
    MemberLeft {
        /// The member who became owner, if the last owner left.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        new_owner: Option<UserId>,
    },
    /// The sender changed the group's settings; only the changed fields are present.
    Updated {
        /// New title.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
        /// New topic (empty: cleared).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
        /// New avatar (empty: cleared).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        avatar: Option<String>,
        /// New history visibility.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        share_history: Option<bool>,
    },
    /// The sender changed a member's role.
    RoleChanged {
        /// Whose role.
        user: UserId,
        /// The new role.
        role: Role,
    },
    /// The sender handed ownership to `user` and became an admin.
    OwnershipTransferred {
        /// The new owner.
        user: UserId,
    },
}

/// A user's private settings for one thread.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadSettings {
    /// No push, and left out of the total unread.
    pub muted: bool,
    /// Kept at the top of the list.
    pub pinned: bool,
    /// Kept out of the main list.
    pub archived: bool,
    /// The user's own name for the thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nickname: Option<String>,
}

/// Where a contact relationship stands, seen from its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContactState {
    /// The owner sent a friend request, not yet answered.
    Requested,
    /// The peer sent the owner a friend request.
    Incoming,
    /// Both agreed.
    Friend,
}

impl ContactState {
    /// Returns the stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Incoming => "incoming",
            Self::Friend => "friend",
        }
    }

    /// Reads a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "requested" => Some(Self::Requested),
            "incoming" => Some(Self::Incoming),
            "friend" => Some(Self::Friend),
            _ => None,
        }
    }
}

/// One entry of the contact book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactInfo {
    /// The peer.
    pub user_id: UserId,
    /// Their username.
    pub username: String,
    /// Friendship state, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ContactState>,
    /// Whether the owner blocked them.
    pub blocked: bool,
    /// The owner's name for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Whether they are online (friends only, and only if they allow it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    /// When they were last seen (friends only, unless they hide it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<i64>,
}

/// A change to a user's own state, kept in their per-user event log and sent to all of
/// their devices, so every device converges (the log is read back by `sync`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UserEvent {
    /// The user joined a thread (created it, or was added).
    Joined {
        /// The thread.
        thread_id: ThreadId,
    },
    /// The user is no longer in a thread (left, or was removed).
    Left {
        /// The thread.
        thread_id: ThreadId,
    },
    /// The user's settings for a thread changed.
    ThreadSettings {
        /// The thread.
        thread_id: ThreadId,
        /// The settings now.
        settings: ThreadSettings,
    },
    /// The user's read marker in a thread moved.
    Read {
        /// The thread.
        thread_id: ThreadId,
        /// The new marker.
        seq: u64,
    },
    /// A contact entry changed (request, answer, block, alias).
    Contact {
        /// The entry now.
        contact: ContactInfo,
    },
    /// The user's privacy settings changed.
    Privacy {
        /// Whether last-seen is hidden from everyone.
        hide_last_seen: bool,
    },
}

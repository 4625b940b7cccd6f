//! Rules and encodings both backends share, so they store and answer alike.

use std::time::{SystemTime, UNIX_EPOCH};

use pigeon_proto::{
    ContactAction, ContactState, MessageKind, Role, SystemEvent, ThreadKind, UserId,
};
use sha2::{Digest, Sha256};

use crate::{GroupChange, Result, StoreError};

/// Events kept per user; older ones are pruned and a client behind them refetches lists.
pub(crate) const USER_EVENTS_KEPT: u64 = 1000;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Whether appending the event with this seq prunes the log, and up to which seq.
pub(crate) fn user_events_prune_upto(seq: u64) -> Option<u64> {
    (seq.is_multiple_of(100) && seq > USER_EVENTS_KEPT).then(|| seq - USER_EVENTS_KEPT)
}

/// The participants hash: SHA-256 over the sorted member ids.
pub(crate) fn participants_hash(members: &[UserId]) -> [u8; 32] {
    let mut sorted = members.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut hasher = Sha256::new();
    for member in sorted {
        hasher.update(member.as_bytes());
    }
    hasher.finalize().into()
}

/// Splits a stored body: a system message's body is its event as JSON, which goes on the
/// wire as the `system` field with an empty body.
pub(crate) fn decode_body(kind: MessageKind, body: String) -> (String, Option<SystemEvent>) {
    match kind {
        MessageKind::System => (String::new(), serde_json::from_str(&body).ok()),
        MessageKind::Text => (body, None),
    }
}

pub(crate) fn message_kind(stored: &str) -> MessageKind {
    if stored == "system" {
        MessageKind::System
    } else {
        MessageKind::Text
    }
}

pub(crate) fn message_kind_str(kind: MessageKind) -> &'static str {
    match kind {
        MessageKind::Text => "text",
        MessageKind::System => "system",
    }
}

pub(crate) fn thread_kind(kind: &str) -> ThreadKind {
    if kind == "group" {
        ThreadKind::Group
    } else {
        ThreadKind::Direct
    }
}

pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// `Forbidden(why)` unless `allowed`.
pub(crate) fn require(allowed: bool, why: &'static str) -> Result<()> {
    if allowed {
        Ok(())
    } else {
        Err(StoreError::Forbidden(why))
    }
}

/// The rules of a group change that depend only on the actor's role and the request.
/// Both backends check them first, in the transaction that applies the change; rules that
/// depend on the target's role (removing a member) are checked where the role is read.
pub(crate) fn check_group_change(
    actor: UserId,
    actor_role: Role,
    change: &GroupChange,
) -> Result<()> {
    match change {
        GroupChange::AddMembers(_) => require(
            actor_role >= Role::Admin,
            "only admins and the owner add members",
        ),
        GroupChange::Update { .. } => require(
            actor_role >= Role::Admin,
            "only admins and the owner change the group",
        ),
        GroupChange::SetRole(user, role) => {
            require(
                actor_role == Role::Owner,
                "only the owner promotes and demotes admins",
            )?;
            require(
                *role != Role::Owner,
                "use transfer_ownership to hand ownership over",
            )?;
            require(
                *user != actor,
                "the owner's role changes only by transfer_ownership",
            )
        }
        GroupChange::TransferOwnership(user) => {
            require(
                actor_role == Role::Owner,
                "only the owner hands ownership over",
            )?;
            require(*user != actor, "already the owner")
        }
        GroupChange::RemoveMember(_) | GroupChange::Leave => Ok(()),
    }
}

/// One side of a contact relationship as stored: the owner's view of the peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ContactSide {
    pub(crate) state: Option<ContactState>,
    pub(crate) blocked: bool,
    pub(crate) alias: Option<String>,
}

/// The contact state machine: applies `action` by the owner of `mine` to both sides and
/// returns whether the peer may learn of the change (never of a block).
pub(crate) fn apply_contact_action(
    action: ContactAction,
    mine: &mut ContactSide,
    theirs: &mut ContactSide,
) -> Result<bool> {
    let mut tell_peer = true;
    match action {
        ContactAction::Request => {
            if theirs.blocked {
                return Err(StoreError::Blocked);
            }
            require(!mine.blocked, "unblock them first")?;
            match mine.state {
                Some(ContactState::Friend | ContactState::Requested) => {}
                Some(ContactState::Incoming) => {
                    mine.state = Some(ContactState::Friend);
                    theirs.state = Some(ContactState::Friend);
                }
                None => {
                    mine.state = Some(ContactState::Requested);
                    theirs.state = Some(ContactState::Incoming);
                }
            }
        }
        ContactAction::Accept => {
            if mine.state != Some(ContactState::Incoming) {
                return Err(StoreError::NoPendingRequest);
            }
            mine.state = Some(ContactState::Friend);
            theirs.state = Some(ContactState::Friend);
        }
        ContactAction::Decline | ContactAction::Cancel => {
            let needed = if action == ContactAction::Decline {
                ContactState::Incoming
            } else {
                ContactState::Requested
            };
            if mine.state != Some(needed) {
                return Err(StoreError::NoPendingRequest);
            }
            mine.state = None;
            theirs.state = None;
        }
        ContactAction::Remove => {
            mine.state = None;
            theirs.state = None;
        }
        ContactAction::Block => {
            mine.blocked = true;
            mine.state = None;
            theirs.state = None;
            tell_peer = false;
        }
        ContactAction::Unblock => {
            mine.blocked = false;
            tell_peer = false;
        }
    }
    Ok(tell_peer)
}

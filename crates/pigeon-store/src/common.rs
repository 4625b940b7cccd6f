//! Rules and encodings both backends share, so they store and answer alike.

use std::time::{SystemTime, UNIX_EPOCH};

use pigeon_proto::{MessageKind, SystemEvent, ThreadKind, UserId};
use sha2::{Digest, Sha256};

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

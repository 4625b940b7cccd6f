//! `typing`: an ephemeral event to the thread's other members. Never stored; throttled per
//! user and thread; clients hide it after `expires_ms` unless it is refreshed.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use pigeon_proto::{ReqId, ServerFrame, ThreadId, ThreadKind, UserId};

use crate::{Caller, ChatError, ChatService, Result};

/// How long a typing indicator shows without a refresh.
const TYPING_TTL: Duration = Duration::from_secs(6);
/// At most one "typing" broadcast per user and thread this often; extra ones are answered
/// but not sent (the indicator is still showing).
const TYPING_INTERVAL: Duration = Duration::from_secs(3);

/// When each (user, thread) last broadcast "typing".
#[derive(Default)]
pub(crate) struct TypingThrottle {
    last: DashMap<(UserId, ThreadId), Instant>,
}

impl TypingThrottle {
    /// Whether a "typing" broadcast is due; records it if so.
    fn admit(&self, user: UserId, thread: ThreadId, now: Instant) -> bool {
        if self.last.len() > 100_000 {
            self.last
                .retain(|_, at| now.duration_since(*at) < TYPING_TTL);
        }
        let mut entry = self
            .last
            .entry((user, thread))
            .or_insert(now - TYPING_INTERVAL);
        if now.duration_since(*entry) < TYPING_INTERVAL {
            return false;
        }
        *entry = now;
        true
    }

    fn clear(&self, user: UserId, thread: ThreadId) -> bool {
        self.last.remove(&(user, thread)).is_some()
    }
}

pub(crate) async fn execute(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    thread_id: ThreadId,
    active: bool,
) -> Result<ServerFrame> {
    let membership = chat.store.get_membership(thread_id, caller.user_id).await?;
    let members = chat.store.get_members(thread_id).await?;
    if membership.kind == ThreadKind::Direct {
        for peer in members.iter().filter(|peer| **peer != caller.user_id) {
            if chat.store.is_blocked(*peer, caller.user_id).await? {
                return Err(ChatError::Blocked);
            }
        }
    }
    let due = if active {
        chat.typing.admit(caller.user_id, thread_id, Instant::now())
    } else {
        chat.typing.clear(caller.user_id, thread_id)
    };
    if due {
        let others: Vec<UserId> = members
            .iter()
            .copied()
            .filter(|m| *m != caller.user_id)
            .collect();
        let expires_ms = u64::try_from(TYPING_TTL.as_millis()).unwrap_or(u64::MAX);
        let frame = ServerFrame::Typing {
            thread_id,
            user_id: caller.user_id,
            active,
            expires_ms,
        };
        chat.publish(others.into(), caller.conn, &frame).await?;
    }
    Ok(ServerFrame::Ok { id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_is_throttled_per_user_and_thread() {
        let throttle = TypingThrottle::default();
        let (user, thread) = (UserId::new(), ThreadId::new());
        let start = Instant::now();
        assert!(throttle.admit(user, thread, start));
        assert!(!throttle.admit(user, thread, start + Duration::from_secs(1)));
        assert!(
            throttle.admit(UserId::new(), thread, start),
            "another user is not throttled"
        );
        assert!(throttle.admit(user, thread, start + TYPING_INTERVAL));
        assert!(throttle.clear(user, thread));
        assert!(!throttle.clear(user, thread), "a stop is sent once");
    }
}

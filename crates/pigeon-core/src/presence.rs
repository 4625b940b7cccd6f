//! Presence: a user is online while any of their connections is open on this node.

use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use pigeon_proto::{ServerFrame, UserId};

use crate::{Caller, ChatError, ChatService, Result, now_ms};

/// Open connections per online user.
#[derive(Default)]
pub(crate) struct Presence {
    online: DashMap<UserId, u32>,
}

impl Presence {
    /// Counts a new connection; true when the user just came online.
    fn add(&self, user: UserId) -> bool {
        let mut count = self.online.entry(user).or_insert(0);
        *count += 1;
        *count == 1
    }

    /// Counts a closed connection; true when the user just went offline.
    fn remove(&self, user: UserId) -> bool {
        match self.online.entry(user) {
            Entry::Occupied(mut entry) => {
                *entry.get_mut() -= 1;
                if *entry.get() == 0 {
                    entry.remove();
                    true
                } else {
                    false
                }
            }
            Entry::Vacant(_) => false,
        }
    }

    pub(crate) fn is_online(&self, user: UserId) -> bool {
        self.online.contains_key(&user)
    }
}

impl ChatService {
    /// Records a newly authenticated connection; announces the user online on their first.
    pub async fn connection_opened(&self, caller: &Caller) {
        if self.presence.add(caller.user_id) {
            if let Err(error) = self.bus.subscribe(caller.user_id).await {
                tracing::warn!(%error, user = %caller.user_id, "bus subscribe failed");
            }
            self.announce_presence(caller).await;
        }
    }

    /// Records a closed connection; announces the user offline when it was their last.
    pub async fn connection_closed(&self, caller: &Caller) {
        let now = now_ms();
        if let Err(error) = self.store.touch_device(caller.device_id, now).await {
            tracing::warn!(%error, "recording device last-seen failed");
        }
        if self.presence.remove(caller.user_id) {
            if let Err(error) = self.store.set_last_seen(caller.user_id, now).await {
                tracing::warn!(%error, "recording last-seen failed");
            }
            if let Err(error) = self.bus.unsubscribe(caller.user_id).await {
                tracing::warn!(%error, user = %caller.user_id, "bus unsubscribe failed");
            }
            self.announce_presence(caller).await;
        }
    }

    /// Sends the user's current presence to the online users sharing a thread with them.
    /// The state is read at send time, so a quick reconnect cannot leave a stale "offline".
    async fn announce_presence(&self, caller: &Caller) {
        let result: Result<()> = async {
            let peers: Vec<UserId> = self
                .store
                .list_presence_audience(caller.user_id)
                .await?
                .into_iter()
                .filter(|peer| self.presence.is_online(*peer))
                .collect();
            if peers.is_empty() {
                return Ok(());
            }
            let frame = self
                .presence_frame(None, caller.user_id, caller.username.clone())
                .await?;
            self.publish(Arc::from(peers), None, &frame).await
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, user = %caller.user_id, "presence announcement failed");
        }
    }

    /// Builds a `presence` frame from the current state.
    pub(crate) async fn presence_frame(
        &self,
        id: Option<pigeon_proto::ReqId>,
        user_id: UserId,
        username: String,
    ) -> Result<ServerFrame> {
        let online = self.presence.is_online(user_id);
        let last_seen = if online {
            None
        } else {
            let user = self
                .store
                .get_user(user_id)
                .await?
                .ok_or(ChatError::UnknownUser)?;
            // Hidden last-seen is hidden from everyone.
            if user.hide_last_seen {
                None
            } else {
                user.last_seen_at
            }
        };
        Ok(ServerFrame::Presence {
            id,
            user_id,
            username,
            online,
            last_seen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_until_the_last_connection_closes() {
        let presence = Presence::default();
        let user = UserId::new();
        assert!(presence.add(user));
        assert!(!presence.add(user));
        assert!(!presence.remove(user));
        assert!(presence.is_online(user));
        assert!(presence.remove(user));
        assert!(!presence.is_online(user));
        assert!(!presence.remove(user), "an extra close never underflows");
    }
}

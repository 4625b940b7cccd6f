//! Presence: a user is online while any of their connections is open, on any node.
//!
//! Each node counts its own connections. In a cluster the store also keeps a record per
//! user and node (see `Store::presence_set`), refreshed every third of the TTL, so a
//! node that dies takes its users offline within one TTL; queries read those records.

use std::collections::HashSet;
use std::sync::{Arc, Weak};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use pigeon_proto::{ServerFrame, UserId};

use crate::{Caller, ChatError, ChatService, Result, now_ms};

/// Open connections per online user on this node.
pub(crate) struct Presence {
    online: DashMap<UserId, u32>,
    /// This process in the cluster's presence records.
    node: i64,
}

impl Default for Presence {
    fn default() -> Self {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Self {
            online: DashMap::new(),
            node: i64::from_le_bytes(seed),
        }
    }
}

/// Refreshes this node's presence records until the service is gone.
pub(crate) fn start_refresh(chat: Weak<ChatService>) {
    tokio::spawn(async move {
        let period = match chat.upgrade() {
            Some(chat) => chat.config.presence_ttl / 3,
            None => return,
        };
        let mut ticks = tokio::time::interval(period.max(std::time::Duration::from_millis(100)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(chat) = chat.upgrade() else { return };
            let users: Vec<UserId> = chat.presence.online.iter().map(|e| *e.key()).collect();
            if let Err(error) = chat
                .store
                .presence_refresh(chat.presence.node, &users, chat.presence_ttl_ms())
                .await
            {
                tracing::warn!(%error, "refreshing presence records failed");
            }
        }
    });
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

    fn is_online(&self, user: UserId) -> bool {
        self.online.contains_key(&user)
    }
}

impl ChatService {
    /// Records a newly authenticated connection; announces the user online on their first.
    pub async fn connection_opened(&self, caller: &Caller) {
        // Every connection counts on the bus (it keeps its own count), so a quick close
        // and reopen cannot leave the user without a subscription.
        if let Err(error) = self.bus.subscribe(caller.user_id).await {
            tracing::warn!(%error, user = %caller.user_id, "bus subscribe failed");
        }
        if self.presence.add(caller.user_id) {
            self.record_presence(caller.user_id, true).await;
            self.announce_presence(caller).await;
        }
    }

    /// Records a closed connection; announces the user offline when it was their last.
    pub async fn connection_closed(&self, caller: &Caller) {
        if let Err(error) = self.bus.unsubscribe(caller.user_id).await {
            tracing::warn!(%error, user = %caller.user_id, "bus unsubscribe failed");
        }
        let now = now_ms();
        if let Err(error) = self.store.touch_device(caller.device_id, now).await {
            tracing::warn!(%error, "recording device last-seen failed");
        }
        if self.presence.remove(caller.user_id) {
            self.record_presence(caller.user_id, false).await;
            if let Err(error) = self.store.set_last_seen(caller.user_id, now).await {
                tracing::warn!(%error, "recording last-seen failed");
            }
            self.announce_presence(caller).await;
        }
    }

    fn presence_ttl_ms(&self) -> i64 {
        i64::try_from(self.config.presence_ttl.as_millis()).unwrap_or(i64::MAX / 2)
    }

    /// Writes this node's presence record for the user (cluster stores keep one).
    async fn record_presence(&self, user: UserId, online: bool) {
        if let Err(error) = self
            .store
            .presence_set(self.presence.node, user, online, self.presence_ttl_ms())
            .await
        {
            // The next refresh writes it.
            tracing::warn!(%error, %user, "recording presence failed");
        }
    }

    /// Which of `users` are online on any node.
    pub(crate) async fn online_among(&self, users: &[UserId]) -> Result<HashSet<UserId>> {
        match self.store.presence_online(users).await? {
            Some(online) => Ok(online.into_iter().collect()),
            None => Ok(users
                .iter()
                .copied()
                .filter(|user| self.presence.is_online(*user))
                .collect()),
        }
    }

    /// Sends the user's current presence to the online users sharing a thread with them.
    /// The state is read at send time, so a quick reconnect cannot leave a stale "offline".
    async fn announce_presence(&self, caller: &Caller) {
        let result: Result<()> = async {
            let audience = self.store.list_presence_audience(caller.user_id).await?;
            let online = self.online_among(&audience).await?;
            let peers: Vec<UserId> = audience
                .into_iter()
                .filter(|peer| online.contains(peer))
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
        let online = !self.online_among(&[user_id]).await?.is_empty();
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

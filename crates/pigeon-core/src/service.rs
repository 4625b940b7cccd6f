//! The chat service: the state shared by every request, and request dispatch.

use std::sync::Arc;

use pigeon_bus::{Bus, ConnId, Envelope, Payload};
use pigeon_proto::{ClientFrame, DeviceId, ServerFrame, UserId};
use pigeon_store::Store;
use tokio::sync::Semaphore;

use crate::presence::Presence;
use crate::publish::Publisher;
use crate::{ChatError, Result, commands};

/// Limits and settings of the chat service.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Largest message body, in bytes.
    pub max_body_bytes: usize,
    /// Password hashes computed at once (each takes ~19 MiB and a core for ~20 ms).
    pub max_concurrent_hashes: usize,
    /// Argon2id memory cost in KiB (OWASP: 19,456) and iterations (2).
    pub argon2_memory_kib: u32,
    /// Argon2id iterations.
    pub argon2_iterations: u32,
    /// Most members in a group.
    pub max_group_members: u32,
    /// Most groups a user may belong to.
    pub max_groups_per_user: u32,
    /// Longest group title, in characters.
    pub max_title_chars: usize,
    /// Longest group topic, in characters.
    pub max_topic_chars: usize,
    /// In a cluster, how long a node's presence records count without a refresh: a node
    /// that dies takes its users offline after this (the heartbeat timeout).
    pub presence_ttl: std::time::Duration,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024,
            max_concurrent_hashes: 2,
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            max_group_members: 10_000,
            max_groups_per_user: 500,
            max_title_chars: 128,
            max_topic_chars: 1024,
            presence_ttl: std::time::Duration::from_secs(60),
        }
    }
}

/// Who is making a request: an authenticated device, and the connection it came on.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user.
    pub user_id: UserId,
    /// Their username.
    pub username: String,
    /// The device (session token) used.
    pub device_id: DeviceId,
    /// The connection the request came on; events it causes are not echoed back to it.
    pub conn: Option<ConnId>,
}

/// What `/healthz` reports.
#[derive(Debug, Clone, Copy)]
pub struct Health {
    /// The store answered a read.
    pub store: bool,
    /// The bus can reach other nodes (always true for the in-process bus).
    pub bus: bool,
}

/// The chat service. One per node, shared by every connection.
pub struct ChatService {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) config: ChatConfig,
    pub(crate) presence: Presence,
    pub(crate) publisher: Publisher,
    pub(crate) hashing: Semaphore,
    pub(crate) typing: crate::commands::TypingThrottle,
    /// `search_users` per user: enumeration of usernames is slowed down.
    pub(crate) search_limit: governor::DefaultKeyedRateLimiter<UserId>,
}

impl ChatService {
    /// Creates the service over a store and a bus. Must be called inside a tokio runtime.
    pub fn new(store: Arc<dyn Store>, bus: Arc<dyn Bus>, config: ChatConfig) -> Arc<Self> {
        let chat = Arc::new(Self {
            publisher: Publisher::start(bus.clone()),
            hashing: Semaphore::new(config.max_concurrent_hashes.max(1)),
            typing: crate::commands::TypingThrottle::default(),
            search_limit: governor::RateLimiter::keyed(
                governor::Quota::per_second(std::num::NonZeroU32::new(2).expect("nonzero"))
                    .allow_burst(std::num::NonZeroU32::new(10).expect("nonzero")),
            ),
            presence: Presence::default(),
            store,
            bus,
            config,
        });
        crate::presence::start_refresh(Arc::downgrade(&chat));
        chat
    }

    /// Returns the service's settings.
    pub fn config(&self) -> &ChatConfig {
        &self.config
    }

    /// Returns the store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Whether the store answers and the bus can reach other nodes.
    pub async fn health(&self) -> Health {
        Health {
            store: self.store.ping().await.is_ok(),
            bus: self.bus.is_healthy(),
        }
    }

    /// Answers one request. Failures become `error` frames carrying the request id.
    pub async fn handle(&self, caller: &Caller, frame: ClientFrame) -> ServerFrame {
        let id = frame.id().clone();
        match commands::execute(self, caller, frame).await {
            Ok(answer) => answer,
            Err(error) => error.frame(Some(id)),
        }
    }

    /// Answers `send` requests into known threads (`thread_id`, no `to`; see
    /// [`is_thread_send`]) that one connection had waiting at once: they are stored in
    /// this order, usually in one transaction, and answered each on its own, in the same
    /// order. Any other frame among them is answered `invalid_field`.
    pub async fn handle_sends(
        &self,
        caller: &Caller,
        frames: Vec<ClientFrame>,
    ) -> Vec<ServerFrame> {
        commands::execute_sends(self, caller, frames).await
    }

    /// Publishes one event to the connections of `users`, except `skip`.
    pub(crate) async fn publish(
        &self,
        users: Arc<[UserId]>,
        skip: Option<ConnId>,
        frame: &ServerFrame,
    ) -> Result<()> {
        let payload = Payload::Frame(encode(frame)?);
        self.bus
            .publish(Envelope {
                users,
                skip,
                payload,
            })
            .await?;
        Ok(())
    }

    /// Publishes per-user events to their users' devices.
    pub(crate) async fn publish_user_events(
        &self,
        events: Vec<(UserId, pigeon_proto::UserEventRecord)>,
    ) {
        for (user, record) in events {
            let frame = ServerFrame::UserEvent(record);
            if let Err(error) = self.publish(Arc::from(vec![user]), None, &frame).await {
                tracing::warn!(%error, "publishing a user event failed; sync recovers it");
            }
        }
    }

    /// The store's limits for group changes.
    pub(crate) fn group_limits(&self) -> pigeon_store::GroupLimits {
        pigeon_store::GroupLimits {
            max_members: self.config.max_group_members,
            max_groups_per_user: self.config.max_groups_per_user,
        }
    }

    /// Closes the store (its last batch commits, with its hooks), waits until every
    /// committed event has been handed to the bus, then lets the bus flush.
    pub async fn close(&self) {
        self.store.close().await;
        self.publisher.drain().await;
        self.bus.close().await;
    }
}

/// Serializes a frame once; the bytes are shared by every recipient.
pub(crate) fn encode(frame: &ServerFrame) -> Result<bytes::Bytes> {
    serde_json::to_vec(frame)
        .map(bytes::Bytes::from)
        .map_err(|e| ChatError::Internal(format!("encode frame: {e}")))
}

/// Whether a frame is a `send` into a known thread: one that may be taken together with
/// the sends after it (see [`ChatService::handle_sends`]).
pub fn is_thread_send(frame: &ClientFrame) -> bool {
    matches!(
        frame,
        ClientFrame::Send {
            thread_id: Some(_),
            to: None,
            ..
        }
    )
}

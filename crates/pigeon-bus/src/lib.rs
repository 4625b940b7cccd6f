//! Routing of events to the nodes where their recipients are connected.
//!
//! The chat service publishes an [`Envelope`] per event: the recipients, and the frame
//! already encoded once. A node subscribes for the users connected to it; the bus hands
//! every envelope for those users to the node's [`Deliver`] sink. [`LocalBus`] is the
//! single-node backend: publishing is a direct call, nothing waits on a network.
//! [`NatsBus`] is the cluster backend, over core NATS.

mod nats;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pigeon_proto::{DeviceId, UserId};

pub use nats::NatsBus;

/// Why a bus operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// The bus cannot route now; events are recovered by the clients' sync.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// Identifies one client connection (a socket or a long-poll session) across the cluster.
pub type ConnId = u64;

/// What an envelope carries.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A server frame, serialized once, sent as is to every recipient connection.
    Frame(Bytes),
    /// Close every connection of this device: it was revoked or logged out.
    CloseDevice(DeviceId),
}

/// One event for a set of users.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The users whose connections get it.
    pub users: Arc<[UserId]>,
    /// A connection to leave out (the one whose request caused the event).
    pub skip: Option<ConnId>,
    /// The event.
    pub payload: Payload,
}

/// Receives the envelopes for users connected to this node. Must not block.
pub trait Deliver: Send + Sync + 'static {
    /// Hands one envelope to the local connections of its users.
    fn deliver(&self, envelope: &Envelope);

    /// Events for local connections may have been lost (the bus was cut off): ask every
    /// local connection to reconnect or reset, so its client syncs from the store.
    fn resync(&self);
}

/// Routes envelopes to the nodes where their users are connected.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Sends an envelope to every node with a subscription for one of its users.
    async fn publish(&self, envelope: Envelope) -> Result<(), BusError>;
    /// One more connection of `user` on this node: envelopes for them are routed here
    /// from the first until the last one is gone. Called for every connection.
    async fn subscribe(&self, user: UserId) -> Result<(), BusError>;
    /// One connection of `user` on this node fewer.
    async fn unsubscribe(&self, user: UserId) -> Result<(), BusError>;
    /// Hands whatever is still buffered to the network (shutdown).
    async fn close(&self) {}
    /// Whether events can reach other nodes now (for `/healthz`).
    fn is_healthy(&self) -> bool {
        true
    }
}

/// The single-node bus: every user is local, so publishing hands the envelope straight
/// to the node's sink, which ignores users without connections.
pub struct LocalBus {
    sink: Arc<dyn Deliver>,
}

impl LocalBus {
    /// Creates a bus delivering to `sink`.
    pub fn new(sink: Arc<dyn Deliver>) -> Self {
        Self { sink }
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn publish(&self, envelope: Envelope) -> Result<(), BusError> {
        self.sink.deliver(&envelope);
        Ok(())
    }

    async fn subscribe(&self, _user: UserId) -> Result<(), BusError> {
        Ok(())
    }

    async fn unsubscribe(&self, _user: UserId) -> Result<(), BusError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Envelope>>);

    impl Deliver for Recorder {
        fn deliver(&self, envelope: &Envelope) {
            self.0.lock().unwrap().push(envelope.clone());
        }

        fn resync(&self) {}
    }

    #[test]
    fn local_bus_delivers_in_publish_order() {
        let recorder = Arc::new(Recorder::default());
        let bus = LocalBus::new(recorder.clone());
        let user = UserId::new();
        futures_lite_block_on(async {
            bus.subscribe(user).await.unwrap();
            for n in 0..3u8 {
                let envelope = Envelope {
                    users: Arc::from(vec![user]),
                    skip: None,
                    payload: Payload::Frame(Bytes::from(vec![n])),
                };
                bus.publish(envelope).await.unwrap();
            }
        });
        let seen: Vec<Vec<u8>> = recorder
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|e| match &e.payload {
                Payload::Frame(bytes) => bytes.to_vec(),
                Payload::CloseDevice(_) => vec![],
            })
            .collect();
        assert_eq!(seen, vec![vec![0], vec![1], vec![2]]);
    }

    /// Polls a future that never waits (LocalBus never does) to completion.
    fn futures_lite_block_on<F: std::future::Future>(future: F) -> F::Output {
        use std::task::{Context, Poll, Waker};
        let mut future = std::pin::pin!(future);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
        }
    }
}

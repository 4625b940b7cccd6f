//! This node's connections, by user, and the delivery of bus envelopes to them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_channel::mpsc;
use pigeon_bus::{ConnId, Deliver, Envelope, Payload};
use pigeon_proto::{DeviceId, UserId, close};
use tungstenite::Utf8Bytes;

use crate::longpoll::PollSession;

/// What a socket's writer is asked to do.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Send this encoded frame.
    Frame(Utf8Bytes),
    /// Close with this code and reason.
    Close(u16, &'static str),
}

/// When a socket last heard from its client, in milliseconds since the registry began.
/// Its session writes it; the sweep reads it.
#[derive(Default)]
pub(crate) struct Activity(AtomicU64);

impl Activity {
    /// Records that the client was heard from now.
    pub(crate) fn touch(&self, registry: &Registry) {
        self.0.store(registry.clock(), Ordering::Relaxed);
    }
}

/// Where a connection's events go.
pub(crate) enum Sink {
    /// A WebSocket session's bounded queue, and when its client was last heard from.
    Socket(mpsc::Sender<Outbound>, Arc<Activity>),
    /// A long-poll session's buffer.
    Poll(Arc<PollSession>),
}

struct Conn {
    id: ConnId,
    device_id: DeviceId,
    sink: Sink,
}

/// The connections open on this node: user → connections. It is the bus's delivery sink.
pub struct Registry {
    users: DashMap<UserId, Vec<Conn>>,
    /// High bits: random per process, so ids stay unique across nodes and restarts.
    next_conn: AtomicU64,
    /// Zero of the activity clock.
    epoch: Instant,
    slow_consumers: metrics::Counter,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// Creates an empty registry.
    pub fn new() -> Self {
        let mut seed = [0u8; 4];
        let _ = getrandom::fill(&mut seed);
        Self {
            users: DashMap::new(),
            next_conn: AtomicU64::new(u64::from(u32::from_le_bytes(seed)) << 32),
            epoch: Instant::now(),
            slow_consumers: metrics::counter!("pigeon_slow_consumer_closes_total"),
        }
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn add(&self, user_id: UserId, id: ConnId, device_id: DeviceId, sink: Sink) {
        self.users.entry(user_id).or_default().push(Conn {
            id,
            device_id,
            sink,
        });
    }

    pub(crate) fn remove(&self, user_id: UserId, id: ConnId) {
        self.users.remove_if_mut(&user_id, |_, conns| {
            conns.retain(|conn| conn.id != id);
            conns.is_empty()
        });
    }

    fn clock(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Closes the sockets whose clients were silent for longer than `timeout`.
    pub(crate) fn close_silent(&self, timeout: Duration) {
        let now = self.clock();
        let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.close_sockets_where(
            |activity| now.saturating_sub(activity.0.load(Ordering::Relaxed)) > limit,
            close::HEARTBEAT_TIMEOUT,
            "no frame within the heartbeat timeout",
        );
    }

    /// Tells every socket to close with this code (shutdown).
    pub(crate) fn close_sockets(&self, code: u16, reason: &'static str) {
        self.close_sockets_where(|_| true, code, reason);
    }

    fn close_sockets_where(
        &self,
        chosen: impl Fn(&Activity) -> bool,
        code: u16,
        reason: &'static str,
    ) {
        for mut entry in self.users.iter_mut() {
            for conn in entry.value_mut() {
                if let Sink::Socket(queue, activity) = &mut conn.sink
                    && chosen(activity)
                {
                    // A full queue is closed instead; the session ends with 1013 then.
                    if queue.try_send(Outbound::Close(code, reason)).is_err() {
                        queue.close_channel();
                    }
                }
            }
        }
    }

    /// Number of open connections on this node.
    pub fn len(&self) -> usize {
        self.users.iter().map(|entry| entry.value().len()).sum()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

impl Deliver for Registry {
    fn resync(&self) {
        self.close_sockets(
            close::TRY_AGAIN_LATER,
            "events may have been lost; reconnect and sync",
        );
        for entry in self.users.iter() {
            for conn in entry.value() {
                if let Sink::Poll(session) = &conn.sink {
                    session.lose();
                }
            }
        }
        tracing::warn!(
            connections = self.len(),
            "asked every local connection to sync again"
        );
    }

    fn deliver(&self, envelope: &Envelope) {
        match &envelope.payload {
            Payload::Frame(bytes) => {
                // Validated once per event; every connection shares the same bytes.
                let Ok(text) = Utf8Bytes::try_from(bytes.clone()) else {
                    tracing::error!("dropping an event that is not UTF-8");
                    return;
                };
                for user in envelope.users.iter() {
                    let Some(mut conns) = self.users.get_mut(user) else {
                        continue;
                    };
                    for conn in conns
                        .iter_mut()
                        .filter(|conn| Some(conn.id) != envelope.skip)
                    {
                        match &mut conn.sink {
                            Sink::Socket(queue, _) => {
                                if let Err(error) = queue.try_send(Outbound::Frame(text.clone()))
                                    && error.is_full()
                                {
                                    // Never drop silently: close it; the client reconnects and syncs.
                                    self.slow_consumers.increment(1);
                                    queue.close_channel();
                                }
                            }
                            Sink::Poll(session) => session.push(text.clone()),
                        }
                    }
                }
            }
            Payload::CloseDevice(device_id) => {
                for user in envelope.users.iter() {
                    let Some(mut conns) = self.users.get_mut(user) else {
                        continue;
                    };
                    for conn in conns.iter_mut().filter(|conn| conn.device_id == *device_id) {
                        match &mut conn.sink {
                            Sink::Socket(queue, _) => {
                                if queue
                                    .try_send(Outbound::Close(
                                        close::UNAUTHORIZED,
                                        "device revoked",
                                    ))
                                    .is_err()
                                {
                                    queue.close_channel();
                                }
                            }
                            Sink::Poll(session) => session.revoke(),
                        }
                    }
                }
            }
        }
    }
}

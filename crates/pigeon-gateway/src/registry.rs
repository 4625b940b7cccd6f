//! This node's connections, by user, and the delivery of bus envelopes to them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use pigeon_bus::{ConnId, Deliver, Envelope, Payload};
use pigeon_proto::{DeviceId, UserId, close};
use tungstenite::Utf8Bytes;

use crate::longpoll::PollSession;
use crate::mailbox::{Mailbox, Refused};

/// How a socket whose queue overflowed is closed.
pub(crate) const TOO_FAR_BEHIND: (u16, &str) =
    (close::TRY_AGAIN_LATER, "too far behind; reconnect and sync");

/// Where a connection's events go.
pub(crate) enum Sink {
    /// A WebSocket session's bounded queue, which also says when its client was last heard from.
    Socket(Arc<Mailbox>),
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
        let mut conns = self.users.entry(user_id).or_default();
        // Most users have one or two connections: grow one at a time, not by doubling
        // from four (an idle connection's memory is counted in bytes).
        conns.reserve_exact(1);
        conns.push(Conn {
            id,
            device_id,
            sink,
        });
    }

    pub(crate) fn remove(&self, user_id: UserId, id: ConnId) {
        self.users.remove_if_mut(&user_id, |_, conns| {
            conns.retain(|conn| conn.id != id);
            conns.shrink_to_fit();
            conns.is_empty()
        });
    }

    /// Milliseconds since the registry began: the clock of [`Mailbox::heard_at`].
    pub(crate) fn clock(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Closes the sockets whose clients were silent for longer than `timeout`.
    pub(crate) fn close_silent(&self, timeout: Duration) {
        let now = self.clock();
        let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.close_sockets_where(
            |mailbox| now.saturating_sub(mailbox.last_heard()) > limit,
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
        chosen: impl Fn(&Mailbox) -> bool,
        code: u16,
        reason: &'static str,
    ) {
        for entry in self.users.iter() {
            for conn in entry.value() {
                if let Sink::Socket(mailbox) = &conn.sink
                    && chosen(mailbox)
                {
                    mailbox.close(code, reason);
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
                    let Some(conns) = self.users.get(user) else {
                        continue;
                    };
                    for conn in conns.iter().filter(|conn| Some(conn.id) != envelope.skip) {
                        match &conn.sink {
                            Sink::Socket(mailbox) => {
                                // Never dropped silently: a full queue closes the socket, and
                                // the client reconnects and syncs.
                                if mailbox.push(text.clone(), TOO_FAR_BEHIND) == Err(Refused::Full)
                                {
                                    self.slow_consumers.increment(1);
                                }
                            }
                            Sink::Poll(session) => session.push(text.clone()),
                        }
                    }
                }
            }
            Payload::CloseDevice(device_id) => {
                for user in envelope.users.iter() {
                    let Some(conns) = self.users.get(user) else {
                        continue;
                    };
                    for conn in conns.iter().filter(|conn| conn.device_id == *device_id) {
                        match &conn.sink {
                            Sink::Socket(mailbox) => {
                                mailbox.close(close::UNAUTHORIZED, "device revoked");
                            }
                            Sink::Poll(session) => session.revoke(),
                        }
                    }
                }
            }
        }
    }
}

//! This node's connections, by user, and the delivery of bus envelopes to them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use pigeon_bus::{ConnId, Deliver, Envelope, Payload};
use pigeon_proto::{DeviceId, UserId, close};
use tungstenite::Utf8Bytes;

use crate::longpoll::PollSession;
use crate::mailbox::{Events, Mailbox, Refused, Taken};

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
///
/// An event for a few users is written by whoever delivers it. An event for many (a big
/// group) is split over the fan-out threads, one per core, each writing to the users of its
/// shard: on this machine a write into a socket costs about 10 µs, most of it the kernel's
/// loopback TCP work, so one thread alone needs 100 ms for 10,000 members. Each thread takes
/// every event waiting in its queue at once, and an unbroken run of events for the same
/// users (one busy group) goes out as one write per socket: under load the cost per
/// delivery falls instead of the queues growing.
pub struct Registry {
    conns: Arc<Conns>,
    shards: Vec<Arc<Shard>>,
    /// Envelopes queued on the shards and not yet delivered. While any are, small envelopes
    /// queue behind them, so that no event overtakes an earlier one for the same user.
    pending: Arc<AtomicUsize>,
}

struct Conns {
    users: DashMap<UserId, Vec<Conn>>,
    /// High bits: random per process, so ids stay unique across nodes and restarts.
    next_conn: AtomicU64,
    /// Zero of the activity clock.
    epoch: Instant,
    slow_consumers: metrics::Counter,
    frames_out: metrics::Counter,
}

/// Envelopes with at least this many users are split over the fan-out threads.
const SHARDED_FROM: usize = 128;

/// Most envelopes a fan-out thread takes from its queue at a time.
const MAX_TAKEN: usize = 256;

/// Most events written to a socket in one go by a fan-out thread.
const MAX_RUN: usize = 64;

/// Most bytes of events in one run, unless a single event is larger.
const MAX_RUN_BYTES: usize = 64 * 1024;

/// One fan-out thread's queue.
struct Shard {
    queue: Mutex<ShardQueue>,
    ready: Condvar,
}

struct ShardQueue {
    envelopes: VecDeque<Envelope>,
    /// The registry is gone: the thread ends.
    closed: bool,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// Creates an empty registry, and its fan-out threads (one per core, at most 8).
    pub fn new() -> Self {
        let mut seed = [0u8; 4];
        let _ = getrandom::fill(&mut seed);
        let conns = Arc::new(Conns {
            users: DashMap::new(),
            next_conn: AtomicU64::new(u64::from(u32::from_le_bytes(seed)) << 32),
            epoch: Instant::now(),
            slow_consumers: metrics::counter!("pigeon_slow_consumer_closes_total"),
            frames_out: metrics::counter!("pigeon_frames_out_total"),
        });
        let count = std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 8));
        let pending = Arc::new(AtomicUsize::new(0));
        let shards = (0..count)
            .map(|index| {
                let shard = Arc::new(Shard {
                    queue: Mutex::new(ShardQueue {
                        envelopes: VecDeque::new(),
                        closed: false,
                    }),
                    ready: Condvar::new(),
                });
                let (conns, own, pending) = (conns.clone(), shard.clone(), pending.clone());
                std::thread::Builder::new()
                    .name(format!("pigeon-fanout-{index}"))
                    .spawn(move || fan_out(&conns, &own, &pending, index, count))
                    .expect("spawn a fan-out thread");
                shard
            })
            .collect();
        Self {
            conns,
            shards,
            pending,
        }
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        self.conns.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn add(&self, user_id: UserId, id: ConnId, device_id: DeviceId, sink: Sink) {
        let mut conns = self.conns.users.entry(user_id).or_default();
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
        self.conns.users.remove_if_mut(&user_id, |_, conns| {
            conns.retain(|conn| conn.id != id);
            conns.shrink_to_fit();
            conns.is_empty()
        });
    }

    /// Milliseconds since the registry began: the clock of [`Mailbox::heard_at`].
    pub(crate) fn clock(&self) -> u64 {
        u64::try_from(self.conns.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
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
        for entry in self.conns.users.iter() {
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
        self.conns.users.iter().map(|entry| entry.value().len()).sum()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.conns.users.is_empty()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for shard in &self.shards {
            shard.lock().closed = true;
            shard.ready.notify_one();
        }
    }
}

impl Deliver for Registry {
    fn resync(&self) {
        self.close_sockets(
            close::TRY_AGAIN_LATER,
            "events may have been lost; reconnect and sync",
        );
        for entry in self.conns.users.iter() {
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
        if envelope.users.len() < SHARDED_FROM && self.pending.load(Ordering::Acquire) == 0 {
            self.conns.deliver(std::slice::from_ref(envelope), |_| true);
            return;
        }
        self.pending.fetch_add(self.shards.len(), Ordering::AcqRel);
        for shard in &self.shards {
            shard.lock().envelopes.push_back(envelope.clone());
            shard.ready.notify_one();
        }
    }
}

impl Shard {
    fn lock(&self) -> std::sync::MutexGuard<'_, ShardQueue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for envelopes and takes up to [`MAX_TAKEN`] of them; `None` once closed.
    fn take(&self, into: &mut Vec<Envelope>) -> Option<()> {
        let mut queue = self.lock();
        while queue.envelopes.is_empty() {
            if queue.closed {
                return None;
            }
            queue = self
                .ready
                .wait(queue)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        let taken = queue.envelopes.len().min(MAX_TAKEN);
        into.extend(queue.envelopes.drain(..taken));
        Some(())
    }
}

/// Which fan-out thread writes to `user`'s connections. UUIDv7's last byte is random.
fn shard_of(user: &UserId, count: usize) -> usize {
    usize::from(user.as_bytes()[15]) % count
}

/// A fan-out thread: delivers what its queue is given to the users of shard `index`.
fn fan_out(conns: &Conns, shard: &Shard, pending: &AtomicUsize, index: usize, count: usize) {
    let mut taken = Vec::new();
    while shard.take(&mut taken).is_some() {
        conns.deliver(&taken, |user| shard_of(user, count) == index);
        pending.fetch_sub(taken.len(), Ordering::AcqRel);
        taken.clear();
    }
}

/// Whether `next` can go out in the same writes as `first`: the same users, the same
/// connection left out, and both frames.
fn same_run(first: &Envelope, next: &Envelope) -> bool {
    matches!(
        (&first.payload, &next.payload),
        (Payload::Frame(_), Payload::Frame(_))
    ) && first.skip == next.skip
        && (Arc::ptr_eq(&first.users, &next.users) || first.users == next.users)
}

impl Conns {
    /// Delivers envelopes, in order, to the connections of the users `chosen` picks.
    fn deliver(&self, envelopes: &[Envelope], chosen: impl Fn(&UserId) -> bool) {
        let mut texts = Vec::new();
        let mut rest = envelopes;
        while let Some(first) = rest.first() {
            let mut run = 1;
            let mut bytes = payload_len(first);
            while let Some(next) = rest.get(run) {
                bytes += payload_len(next);
                if run == MAX_RUN || bytes > MAX_RUN_BYTES || !same_run(first, next) {
                    break;
                }
                run += 1;
            }
            let (now, later) = rest.split_at(run);
            rest = later;
            match &first.payload {
                Payload::Frame(_) => {
                    texts.clear();
                    // Validated once per event; every connection shares the same bytes.
                    texts.extend(now.iter().filter_map(|envelope| match &envelope.payload {
                        Payload::Frame(bytes) => Utf8Bytes::try_from(bytes.clone())
                            .map_err(|_| tracing::error!("dropping an event that is not UTF-8"))
                            .ok(),
                        Payload::CloseDevice(_) => None,
                    }));
                    self.write(&first.users, first.skip, &texts, &chosen);
                }
                Payload::CloseDevice(device_id) => {
                    self.close_device(&first.users, *device_id, &chosen);
                }
            }
        }
    }

    /// Hands the frames to the connections of the chosen users, leaving out `skip`.
    fn write(
        &self,
        users: &[UserId],
        skip: Option<ConnId>,
        texts: &[Utf8Bytes],
        chosen: &impl Fn(&UserId) -> bool,
    ) {
        if texts.is_empty() {
            return;
        }
        let events = Events::new(texts);
        let mut written = 0;
        for user in users.iter().filter(|user| chosen(user)) {
            let Some(conns) = self.users.get(user) else {
                continue;
            };
            for conn in conns.iter().filter(|conn| Some(conn.id) != skip) {
                match &conn.sink {
                    // Never dropped silently: a full queue closes the socket, and the
                    // client reconnects and syncs.
                    Sink::Socket(mailbox) => match mailbox.push(&events, TOO_FAR_BEHIND) {
                        Ok(Taken::Written) => written += texts.len() as u64,
                        Ok(Taken::Queued) | Err(Refused::Closing) => {}
                        Err(Refused::Full) => self.slow_consumers.increment(1),
                    },
                    Sink::Poll(session) => {
                        for text in texts {
                            session.push(text.clone());
                        }
                    }
                }
            }
        }
        self.frames_out.increment(written);
    }

    fn close_device(
        &self,
        users: &[UserId],
        device_id: DeviceId,
        chosen: &impl Fn(&UserId) -> bool,
    ) {
        for user in users.iter().filter(|user| chosen(user)) {
            let Some(conns) = self.users.get(user) else {
                continue;
            };
            for conn in conns.iter().filter(|conn| conn.device_id == device_id) {
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

fn payload_len(envelope: &Envelope) -> usize {
    match &envelope.payload {
        Payload::Frame(bytes) => bytes.len(),
        Payload::CloseDevice(_) => 0,
    }
}

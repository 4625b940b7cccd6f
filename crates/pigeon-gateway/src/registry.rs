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
#[derive(Clone)]
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

/// A set of fan-out shards, a bit each.
type ShardSet = u8;
/// Fan-out threads at most: one per core, as many as a [`ShardSet`] has bits.
const MAX_SHARDS: usize = ShardSet::BITS as usize;
/// Envelopes with at least this many users are split over the fan-out threads.
const SHARDED_FROM: usize = 128;

/// Most envelopes a fan-out thread takes from its queue at a time.
const MAX_TAKEN: usize = 256;

/// Most member lists of lost envelopes kept apart; past this, the whole shard syncs.
const MAX_LOST: usize = 64;

/// Most envelopes waiting for one fan-out thread. Past this, events arrive faster than the
/// sockets take them: the users of an envelope that finds the queue full have their
/// sockets closed with 1013 and sync, as a socket whose own queue is full does.
const MAX_QUEUED: usize = 65_536;

/// Most events written to a socket in one go by a fan-out thread.
const MAX_RUN: usize = 64;

/// Most bytes of events in one run, unless a single event is larger.
const MAX_RUN_BYTES: usize = 64 * 1024;

/// One fan-out thread's queue.
struct Shard {
    queue: Mutex<ShardQueue>,
    ready: Condvar,
    /// Envelopes given to this shard and not yet delivered (or, for those that found the
    /// queue full, not yet answered by closing their users' sockets). While any are, a
    /// small envelope for a user of this shard queues behind them instead of being
    /// written at once, so that no event overtakes an earlier one for the same user.
    pending: AtomicUsize,
    /// Most envelopes waiting ([`MAX_QUEUED`]).
    max_queued: usize,
}

struct ShardQueue {
    envelopes: VecDeque<Envelope>,
    /// The member lists of envelopes that found the queue full (at most [`MAX_LOST`]).
    lost: Vec<Arc<[UserId]>>,
    /// More lists were lost than `lost` keeps: every socket of the shard is closed.
    lost_all: bool,
    /// Envelopes that found the queue full since the thread last looked.
    lost_count: usize,
    /// The registry is gone: the thread ends.
    closed: bool,
}

/// What a fan-out thread takes from its queue at a time.
#[derive(Default)]
struct Batch {
    envelopes: Vec<Envelope>,
    lost: Vec<Arc<[UserId]>>,
    lost_all: bool,
    lost_count: usize,
}

impl Batch {
    fn clear(&mut self) {
        self.envelopes.clear();
        self.lost.clear();
        self.lost_all = false;
        self.lost_count = 0;
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// Creates an empty registry, and its fan-out threads (one per core, at most 8).
    pub fn new() -> Self {
        Self::build(MAX_QUEUED)
    }

    fn build(max_queued: usize) -> Self {
        let mut seed = [0u8; 4];
        let _ = getrandom::fill(&mut seed);
        let conns = Arc::new(Conns {
            users: DashMap::new(),
            next_conn: AtomicU64::new(u64::from(u32::from_le_bytes(seed)) << 32),
            epoch: Instant::now(),
            slow_consumers: metrics::counter!("pigeon_slow_consumer_closes_total"),
            frames_out: metrics::counter!("pigeon_frames_out_total"),
        });
        let count =
            std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, MAX_SHARDS));
        let shards = (0..count)
            .map(|index| {
                let shard = Arc::new(Shard {
                    queue: Mutex::new(ShardQueue {
                        envelopes: VecDeque::new(),
                        lost: Vec::new(),
                        lost_all: false,
                        lost_count: 0,
                        closed: false,
                    }),
                    ready: Condvar::new(),
                    pending: AtomicUsize::new(0),
                    max_queued,
                });
                let (conns, own) = (conns.clone(), shard.clone());
                std::thread::Builder::new()
                    .name(format!("pigeon-fanout-{index}"))
                    .spawn(move || fan_out(&conns, &own, index, count))
                    .expect("spawn a fan-out thread");
                shard
            })
            .collect();
        Self { conns, shards }
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
        self.conns
            .users
            .iter()
            .map(|entry| entry.value().len())
            .sum()
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
        let closed = self.conns.close_all(&|_| true, LOST);
        tracing::warn!(
            closed,
            connections = self.len(),
            "asked every local connection to sync again"
        );
    }

    fn deliver(&self, envelope: &Envelope) {
        let count = self.shards.len();
        if envelope.users.len() >= SHARDED_FROM {
            for shard in &self.shards {
                shard.give(envelope);
            }
            return;
        }
        // The shards of its users, a bit each.
        let touched = envelope.users.iter().fold(0 as ShardSet, |bits, user| {
            bits | 1 << shard_of(user, count)
        });
        let busy = |index: usize| self.shards[index].pending.load(Ordering::Acquire) > 0;
        if (0..count).any(|index| touched & 1 << index != 0 && busy(index)) {
            for (index, shard) in self.shards.iter().enumerate() {
                if touched & 1 << index != 0 {
                    shard.give(envelope);
                }
            }
        } else {
            self.conns.deliver(std::slice::from_ref(envelope), |_| true);
        }
    }
}

impl Shard {
    fn lock(&self) -> std::sync::MutexGuard<'_, ShardQueue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues an envelope for the thread, or, when the queue is full, notes its users as
    /// having lost it.
    fn give(&self, envelope: &Envelope) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        {
            let mut queue = self.lock();
            if queue.envelopes.len() < self.max_queued {
                queue.envelopes.push_back(envelope.clone());
            } else {
                queue.lost_count += 1;
                let known = queue
                    .lost
                    .iter()
                    .any(|users| Arc::ptr_eq(users, &envelope.users));
                if !known && !queue.lost_all {
                    if queue.lost.len() < MAX_LOST {
                        queue.lost.push(envelope.users.clone());
                    } else {
                        queue.lost_all = true;
                        queue.lost.clear();
                    }
                }
            }
        }
        self.ready.notify_one();
    }

    /// Waits for work and takes up to [`MAX_TAKEN`] envelopes, and what was lost; `false`
    /// once closed.
    fn take(&self, into: &mut Batch) -> bool {
        let mut queue = self.lock();
        while queue.envelopes.is_empty() && queue.lost_count == 0 {
            if queue.closed {
                return false;
            }
            queue = self
                .ready
                .wait(queue)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        let taken = queue.envelopes.len().min(MAX_TAKEN);
        into.envelopes.extend(queue.envelopes.drain(..taken));
        into.lost.append(&mut queue.lost);
        into.lost_all = std::mem::take(&mut queue.lost_all);
        into.lost_count = std::mem::take(&mut queue.lost_count);
        true
    }
}

/// Lowers a shard's `pending` by what a batch held, however the batch ends.
struct Done<'a>(&'a AtomicUsize, usize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// Which fan-out thread writes to `user`'s connections. UUIDv7's last byte is random.
fn shard_of(user: &UserId, count: usize) -> usize {
    usize::from(user.as_bytes()[15]) % count
}

/// A fan-out thread: delivers what its queue is given to the users of shard `index`.
fn fan_out(conns: &Conns, shard: &Shard, index: usize, count: usize) {
    let mine = |user: &UserId| shard_of(user, count) == index;
    let mut batch = Batch::default();
    while shard.take(&mut batch) {
        let _done = Done(&shard.pending, batch.envelopes.len() + batch.lost_count);
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handle(conns, &batch, index, mine);
        }));
        if handled.is_err() {
            // A bug. The thread goes on, and nobody is left with a silent gap: every
            // socket of the shard syncs.
            tracing::error!(
                shard = index,
                "fan-out panicked; closing the shard's sockets so that they sync"
            );
            conns.close_all(&mine, LOST);
        }
        batch.clear();
    }
}

/// Delivers one batch: first closes the sockets of users who missed an event (before
/// anything later could reach them, so none of them sees a gap; they reconnect and sync),
/// then writes the envelopes.
fn handle(conns: &Conns, batch: &Batch, index: usize, mine: impl Fn(&UserId) -> bool + Copy) {
    if batch.lost_count > 0 {
        let closed = if batch.lost_all {
            conns.close_all(&mine, TOO_FAR_BEHIND)
        } else {
            batch
                .lost
                .iter()
                .map(|users| conns.close_sockets_of(users, &mine, TOO_FAR_BEHIND))
                .sum()
        };
        conns.slow_consumers.increment(closed);
        tracing::warn!(
            shard = index,
            envelopes = batch.lost_count,
            closed,
            "fan-out queue full; closed the sockets that missed events, so they sync"
        );
    }
    conns.deliver(&batch.envelopes, mine);
}

thread_local! {
    /// Where [`Conns::write`] copies a user's sinks, reused so that delivery does not
    /// allocate per message (each deliverer, the Publisher's worker or a fan-out thread,
    /// has its own).
    static SINKS: std::cell::Cell<Vec<Sink>> = const { std::cell::Cell::new(Vec::new()) };
}

/// How a socket is closed when events for it may have been lost.
const LOST: (u16, &str) = (
    close::TRY_AGAIN_LATER,
    "events may have been lost; reconnect and sync",
);

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
                    texts.extend(now.iter().filter_map(|envelope| {
                        match &envelope.payload {
                            Payload::Frame(bytes) => Utf8Bytes::try_from(bytes.clone())
                                .map_err(|_| tracing::error!("dropping an event that is not UTF-8"))
                                .ok(),
                            Payload::CloseDevice(_) => None,
                        }
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
        let mut sinks = SINKS.take();
        for user in users.iter().filter(|user| chosen(user)) {
            // The writes happen after the map's lock is let go: a write into a socket is a
            // system call, and a connect or disconnect waits for that lock.
            if let Some(conns) = self.users.get(user) {
                sinks.extend(
                    conns
                        .iter()
                        .filter(|conn| Some(conn.id) != skip)
                        .map(|conn| conn.sink.clone()),
                );
            }
            for sink in sinks.drain(..) {
                match &sink {
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
        // Kept for the next delivery on this thread (it is empty, its capacity is not).
        SINKS.set(sinks);
        self.frames_out.increment(written);
    }

    /// Closes the sockets of the chosen users with `code` and `reason`.
    /// Returns how many were closed (and not closing already).
    fn close_sockets_of(
        &self,
        users: &[UserId],
        chosen: &impl Fn(&UserId) -> bool,
        how: (u16, &'static str),
    ) -> u64 {
        users
            .iter()
            .filter(|user| chosen(user))
            .filter_map(|user| self.users.get(user))
            .map(|conns| close_each(&conns, how))
            .sum()
    }

    /// Closes the sockets of every chosen user; returns how many were closed.
    fn close_all(&self, chosen: &impl Fn(&UserId) -> bool, how: (u16, &'static str)) -> u64 {
        self.users
            .iter()
            .filter(|entry| chosen(entry.key()))
            .map(|entry| close_each(entry.value(), how))
            .sum()
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

/// Closes these connections (a long-poll session is told it lost events); returns how many
/// sockets were closed by this call.
fn close_each(conns: &[Conn], (code, reason): (u16, &'static str)) -> u64 {
    let mut closed = 0;
    for conn in conns {
        match &conn.sink {
            Sink::Socket(mailbox) => closed += u64::from(mailbox.close(code, reason)),
            Sink::Poll(session) => session.lose(),
        }
    }
    closed
}

fn payload_len(envelope: &Envelope) -> usize {
    match &envelope.payload {
        Payload::Frame(bytes) => bytes.len(),
        Payload::CloseDevice(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::mailbox::{Outbound, push_frame};

    /// A user whose events queue in a mailbox with no socket (where the test reads them),
    /// and a member list of that user and enough others to go to the fan-out threads.
    fn listener(registry: &Registry) -> (UserId, Arc<Mailbox>, Arc<[UserId]>) {
        listener_on(registry, None)
    }

    /// [`listener`], on this socket if given.
    fn listener_on(
        registry: &Registry,
        socket: Option<tokio::net::TcpStream>,
    ) -> (UserId, Arc<Mailbox>, Arc<[UserId]>) {
        let user = UserId::new();
        let mailbox = Arc::new(Mailbox::new(64, 0, socket));
        registry.add(user, 1, DeviceId::new(), Sink::Socket(mailbox.clone()));
        let many = std::iter::once(user)
            .chain((1..SHARDED_FROM).map(|_| UserId::new()))
            .collect();
        (user, mailbox, many)
    }

    /// An event to `users` whose frame is `text`.
    fn event(users: &Arc<[UserId]>, text: String) -> Envelope {
        Envelope {
            users: users.clone(),
            skip: None,
            payload: Payload::Frame(Bytes::from(text)),
        }
    }

    fn shard<'a>(registry: &'a Registry, user: &UserId) -> &'a Shard {
        &registry.shards[shard_of(user, registry.shards.len())]
    }

    /// Waits (10 s at most) until `done` holds.
    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until the shard's thread has taken everything from its queue.
    fn taken(shard: &Shard) {
        until("the queue is taken", || shard.lock().envelopes.is_empty());
    }

    /// Waits until the shard's thread has delivered everything it was given.
    fn delivered(shard: &Shard) {
        until("all is delivered", || {
            shard.pending.load(Ordering::Acquire) == 0
        });
    }

    #[test]
    fn a_full_fan_out_queue_closes_the_sockets_that_missed_events() {
        let registry = Registry::build(1);
        let (user, mailbox, users) = listener(&registry);
        let envelope = |n: u32| event(&users, format!("{{\"n\":{n}}}"));
        let shard = shard(&registry, &user);

        // Holding the user's entry stops the user's fan-out thread at it, with the first
        // envelope taken from its queue.
        let entry = registry.conns.users.get_mut(&user).expect("registered");
        registry.deliver(&envelope(1));
        taken(shard);
        registry.deliver(&envelope(2));
        registry.deliver(&envelope(3));
        drop(entry);
        delivered(shard);

        // The first arrived; the second, though queued, comes after the close; the third
        // never came. The client reconnects and syncs 2 and 3 from the store.
        let first = Utf8Bytes::from_static("{\"n\":1}");
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(first)));
        let (code, reason) = TOO_FAR_BEHIND;
        assert_eq!(mailbox.try_next(), Some(Outbound::Close(code, reason)));
        assert_eq!(mailbox.try_next(), None);
    }

    #[test]
    fn a_small_envelope_waits_behind_a_big_one_for_the_same_user() {
        let registry = Arc::new(Registry::new());
        let (user, mailbox, many) = listener(&registry);
        let frame = |text: &'static str| Payload::Frame(Bytes::from_static(text.as_bytes()));
        let shard = shard(&registry, &user);

        let entry = registry.conns.users.get_mut(&user).expect("registered");
        registry.deliver(&Envelope {
            users: many,
            skip: None,
            payload: frame("big"),
        });
        taken(shard);
        // From another thread: written at once, it would wait for the entry held here.
        let (queued_tx, queued_rx) = std::sync::mpsc::channel();
        let sender = registry.clone();
        std::thread::spawn(move || {
            sender.deliver(&Envelope {
                users: Arc::from([user]),
                skip: None,
                payload: frame("small"),
            });
            let _ = queued_tx.send(());
        });
        let queued = queued_rx.recv_timeout(Duration::from_secs(10)).is_ok();
        drop(entry);
        assert!(
            queued,
            "the small envelope did not queue behind the big one"
        );
        delivered(shard);
        let next = || match mailbox.try_next() {
            Some(Outbound::Frame(text)) => text.to_string(),
            other => panic!("expected a frame, got {other:?}"),
        };
        assert_eq!((next(), next()), ("big".into(), "small".into()));
    }

    #[tokio::test]
    async fn events_that_waited_for_a_fan_out_thread_go_out_together_in_order() {
        use tokio::io::AsyncReadExt;

        let registry = Registry::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // The runtime has seen that the socket can take writes (a direct write is only
        // tried then).
        server.writable().await.unwrap();
        let (user, mailbox, users) = listener_on(&registry, Some(server));
        mailbox.ready();
        let envelope = |n: u32| event(&users, format!("event {n}"));
        let shard = shard(&registry, &user);

        // The thread stops at the user with the first event; three more wait meanwhile,
        // and go out as one run once it can go on.
        let entry = registry.conns.users.get_mut(&user).expect("registered");
        registry.deliver(&envelope(1));
        taken(shard);
        for n in 2..=4 {
            registry.deliver(&envelope(n));
        }
        drop(entry);
        delivered(shard);
        assert_eq!(mailbox.try_next(), None, "written straight to the socket");

        let mut expected = Vec::new();
        for n in 1..=4 {
            push_frame(&mut expected, Utf8Bytes::from(format!("event {n}")));
        }
        let mut got = vec![0; expected.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
    }
}

//! The connection task: connect, sync, resend, serve requests, hand on events, reconnect.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use pigeon_proto::{
    ClientFrame, ErrorCode, Message, MessageKind, ServerFrame, SystemEvent, ThreadId,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};

use crate::backoff::Backoff;
use crate::cache::{Cache, Unsent};
use crate::order::Ordering;
use crate::transport::{Connection, Identity, Incoming};
use crate::{
    ClientConfig, Command, Error, Event, Result, Sent, StartFrom, Target, Transport, TransportKind,
};

/// Heartbeat period on a socket (the server's default timeout is 60 s).
const PING_EVERY: Duration = Duration::from_secs(20);
/// Delay before resending a send the server refused for a retryable reason.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Messages per sync page.
const SYNC_PAGE: u32 = 500;
/// How long a gap may stay open before a sync fills it.
const SYNC_DELAY: Duration = Duration::from_millis(250);
/// Longest wait for a connection to open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// A send waiting for its ack.
struct Outgoing {
    unsent: Unsent,
    reply: Option<oneshot::Sender<Result<Sent>>>,
}

/// Why a session ended.
enum End {
    /// Reconnect.
    Lost(String),
    /// Stop for good.
    Stop(Option<Error>),
}

pub(crate) struct Engine {
    config: ClientConfig,
    commands_rx: mpsc::UnboundedReceiver<Command>,
    events_tx: mpsc::UnboundedSender<Event>,
    cache: Option<Cache>,
    ordering: Ordering,
    event_cursor: Option<u64>,
    /// Sends not yet acknowledged, in order.
    outbox: VecDeque<Outgoing>,
    /// Sends refused for a retryable reason, with when to try again.
    retry: Vec<(Instant, String)>,
    next_id: i64,
    /// Request id → waiting caller.
    pending: HashMap<i64, oneshot::Sender<Result<ServerFrame>>>,
    /// Request id → client_msg_id of a send in flight.
    in_flight: HashMap<i64, String>,
    identity: Option<Identity>,
    /// The server's body limit (from `welcome`; the default until known).
    max_body: usize,
    /// The server's frame limit (from `welcome`; the default until known): it bounds how
    /// many threads one `sync` may list in `have`.
    max_frame: usize,
    needs_sync: bool,
    /// When a gap was first noticed (a sync waits for it to persist briefly).
    gap_seen: Option<Instant>,
    last_sync: Instant,
    /// When the connection last sent anything.
    last_heard: Instant,
    /// Whether the current session caught up; whether any session ever did.
    caught_up: bool,
    ever_caught_up: bool,
    done: Option<oneshot::Sender<()>>,
}

impl Engine {
    pub(crate) fn new(
        config: ClientConfig,
        commands_rx: mpsc::UnboundedReceiver<Command>,
        events_tx: mpsc::UnboundedSender<Event>,
    ) -> Result<Self> {
        let cache = config.cache.as_deref().map(Cache::open).transpose()?;
        let mut ordering = Ordering::default();
        let mut outbox = VecDeque::new();
        let mut event_cursor = None;
        if let Some(cache) = &cache {
            ordering.contiguous = cache.positions()?;
            event_cursor = cache.event_cursor()?;
            outbox.extend(cache.unsent()?.into_iter().map(|unsent| Outgoing {
                unsent,
                reply: None,
            }));
        }
        Ok(Self {
            config,
            commands_rx,
            events_tx,
            cache,
            ordering,
            event_cursor,
            outbox,
            retry: Vec::new(),
            next_id: 0,
            pending: HashMap::new(),
            in_flight: HashMap::new(),
            identity: None,
            max_body: 16 * 1024,
            max_frame: 64 * 1024,
            needs_sync: false,
            gap_seen: None,
            last_sync: Instant::now(),
            last_heard: Instant::now(),
            caught_up: false,
            ever_caught_up: false,
            done: None,
        })
    }

    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        loop {
            let opened = tokio::time::timeout(OPEN_TIMEOUT, self.open()).await;
            let end = match opened {
                Ok(Ok(mut connection)) => {
                    let end = self.session(&mut connection).await;
                    // Only a session that caught up counts as a success: a server that
                    // accepts and then fails at once must not be hammered.
                    if self.caught_up {
                        backoff.reset();
                    }
                    end
                }
                Ok(Err(
                    error @ Error::Server {
                        code: ErrorCode::Unauthorized,
                        ..
                    },
                )) => End::Stop(Some(error)),
                Ok(Err(error)) => End::Lost(error.to_string()),
                Err(_) => End::Lost("connecting timed out".into()),
            };
            // Requests in flight die with the connection; sends stay queued.
            for (_, reply) in self.pending.drain() {
                let _ = reply.send(Err(Error::Disconnected("connection lost".into())));
            }
            self.in_flight.clear();
            match end {
                End::Stop(error) => {
                    if let Some(error) = error {
                        self.emit(Event::Fatal(error));
                    }
                    break;
                }
                End::Lost(reason) => self.emit(Event::Disconnected(reason)),
            }
            if !self.wait_offline(backoff.next_delay()).await {
                break;
            }
        }
        for outgoing in self.outbox.drain(..) {
            if let Some(reply) = outgoing.reply {
                let _ = reply.send(Err(Error::Closed));
            }
        }
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }

    async fn open(&mut self) -> Result<Connection> {
        let (server, token) = (self.config.server.clone(), self.config.token.clone());
        let (connection, identity) = match self.config.transport {
            Transport::WebSocket => Connection::websocket(&server, &token).await?,
            Transport::LongPoll => Connection::long_poll(&server, &token).await?,
            Transport::Auto => match Connection::websocket(&server, &token).await {
                Ok(opened) => opened,
                Err(error @ Error::Server { .. }) => return Err(error),
                Err(error) => {
                    tracing::info!(%error, "WebSocket unavailable; using long-poll");
                    Connection::long_poll(&server, &token).await?
                }
            },
        };
        if let Some(max_body) = identity.max_body_bytes {
            self.max_body = max_body;
        }
        if let Some(max_frame) = identity.max_frame_bytes {
            self.max_frame = max_frame;
        }
        self.identity = Some(identity);
        Ok(connection)
    }

    /// While offline: queue sends, refuse requests, until `delay` has passed.
    /// Returns false when the client was closed.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                () = sleep_until(deadline) => return true,
                command = self.commands_rx.recv() => match command {
                    None => return false,
                    Some(Command::Close { done }) => {
                        self.done = Some(done);
                        return false;
                    }
                    Some(Command::Request { reply, .. }) => {
                        let _ = reply.send(Err(Error::Disconnected("reconnecting".into())));
                    }
                    Some(Command::Send { target, client_msg_id, body, reply }) => {
                        self.queue_send(Unsent { client_msg_id, target, body }, Some(reply));
                    }
                },
            }
        }
    }

    async fn session(&mut self, connection: &mut Connection) -> End {
        self.caught_up = false;
        if let Err(end) = self.catch_up(connection).await {
            return end;
        }
        self.caught_up = true;
        self.ever_caught_up = true;
        self.emit(Event::Connected(connection.kind));
        // Everything unacknowledged goes again, with its original client_msg_id.
        let unsent: Vec<Unsent> = self.outbox.iter().map(|o| o.unsent.clone()).collect();
        for unsent in unsent {
            if let Err(error) = self.transmit(connection, &unsent).await {
                return End::Lost(error.to_string());
            }
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut retry_tick = tokio::time::interval(Duration::from_millis(250));
        self.last_heard = Instant::now();
        loop {
            tokio::select! {
                command = self.commands_rx.recv() => {
                    let Some(command) = command else { return End::Stop(None) };
                    if let Err(end) = self.command(connection, command).await {
                        return end;
                    }
                }
                incoming = connection.next() => {
                    self.last_heard = Instant::now();
                    if let Err(end) = self.incoming(incoming) {
                        return end;
                    }
                }
                _ = ping.tick(), if connection.kind == TransportKind::WebSocket => {
                    // A path that went dead silently is noticed here, not when TCP gives up.
                    if self.last_heard.elapsed() > PING_EVERY * 2 {
                        return End::Lost("no answer to heartbeats".into());
                    }
                    let id = self.take_id();
                    if let Err(error) = connection.send(id, &ClientFrame::Ping { id: crate::placeholder() }).await {
                        return End::Lost(error.to_string());
                    }
                }
                _ = retry_tick.tick() => {
                    if let Err(error) = self.resend_due(connection).await {
                        return End::Lost(error.to_string());
                    }
                }
            }
            // A gap often closes by itself (an ack of our own send, a late event); sync
            // only if it is still open a moment later, and not more often than that.
            if self.needs_sync && self.last_sync.elapsed() > SYNC_DELAY {
                match self.gap_seen {
                    None => self.gap_seen = Some(Instant::now()),
                    Some(at) if at.elapsed() > SYNC_DELAY => {
                        if let Err(end) = self.sync(connection).await {
                            return end;
                        }
                    }
                    Some(_) => {}
                }
            }
        }
    }

    /// Brings every thread up to date before live events are trusted.
    async fn catch_up(&mut self, connection: &mut Connection) -> Result<(), End> {
        let fresh = self.ordering.contiguous.is_empty() && self.event_cursor.is_none();
        if !self.ever_caught_up && fresh && self.config.start == StartFrom::Now {
            // Start from the present: every thread's current head counts as held.
            let answer = self
                .call(
                    connection,
                    ClientFrame::Threads {
                        id: crate::placeholder(),
                    },
                )
                .await?;
            if let ServerFrame::Threads { threads, .. } = answer {
                for thread in threads {
                    self.know(thread.thread_id, thread.last_seq);
                }
            }
            // Every thread's head is held now; the sync only finds what came since, and
            // starts the event log at its present end.
            return self.sync_pages(connection, true).await;
        }
        self.sync(connection).await
    }

    /// Runs `sync` pages until nothing more is missing.
    async fn sync(&mut self, connection: &mut Connection) -> Result<(), End> {
        self.sync_pages(connection, false).await
    }

    /// Runs `sync` pages over the whole thread id space, one range at a time: each range
    /// holds as many known threads as one frame can list in `have`, so a user with
    /// thousands of threads syncs like one with ten. With `from_now`, the event log is
    /// taken from its present end instead of from the cursor.
    async fn sync_pages(&mut self, connection: &mut Connection, from_now: bool) -> Result<(), End> {
        self.needs_sync = false;
        self.gap_seen = None;
        let per_page = have_capacity(self.max_frame);
        let mut from: Option<ThreadId> = None;
        let mut events_after = if from_now {
            u64::MAX
        } else {
            self.event_cursor.unwrap_or(0)
        };
        loop {
            // The known threads from `from` on, in id order; the range ends where the
            // frame would be full.
            let mut known: Vec<ThreadId> = self
                .ordering
                .contiguous
                .keys()
                .copied()
                .filter(|id| pigeon_proto::in_sync_range(*id, from, None))
                .collect();
            known.sort_unstable();
            let before = known.get(per_page).copied();
            known.truncate(per_page);
            let have: HashMap<ThreadId, u64> = known
                .iter()
                .map(|id| (*id, self.ordering.contiguous[id]))
                .collect();
            let frame = ClientFrame::Sync {
                id: crate::placeholder(),
                have: have.clone(),
                limit: Some(SYNC_PAGE),
                events_after: Some(events_after),
                threads_from: from,
                threads_before: before,
            };
            let answer = self.call(connection, frame).await?;
            let ServerFrame::Sync {
                threads,
                messages,
                more,
                events,
                event_cursor,
                events_reset,
                ..
            } = answer
            else {
                return Err(End::Lost("unexpected answer to sync".into()));
            };
            for thread in &threads {
                // Where the member's view starts: for a new thread, and for one the user
                // rejoined after a while (`know` keeps the higher of the two).
                self.know(thread.thread_id, thread.joined_seq);
            }
            for message in messages {
                self.ingest(message);
            }
            if events_reset {
                self.emit(Event::EventsReset);
            }
            let got_events = !events.is_empty();
            for record in events {
                // A live event may have been applied while this call was in flight.
                if record.seq > self.event_cursor.unwrap_or(0) {
                    self.set_cursor(record.seq);
                    self.emit(Event::Other(ServerFrame::UserEvent(record)));
                }
            }
            self.set_cursor(event_cursor);
            events_after = self.event_cursor.unwrap_or(event_cursor);
            let known: Vec<ThreadId> = self.ordering.contiguous.keys().copied().collect();
            for thread in known {
                for message in self.ordering.drain(thread) {
                    self.deliver(message);
                }
            }
            let advanced = got_events
                || have
                    .iter()
                    .any(|(id, held)| self.ordering.contiguous.get(id) != Some(held))
                || self.ordering.contiguous.keys().any(|id| {
                    !have.contains_key(id) && pigeon_proto::in_sync_range(*id, from, before)
                });
            if more && advanced {
                // The same range again, from where it now stands.
                continue;
            }
            match before {
                Some(next) => from = Some(next),
                None => break,
            }
        }
        self.last_sync = Instant::now();
        // Whatever still waits (a thread created after this snapshot) asks again, after
        // the delay.
        self.needs_sync = self.ordering.has_waiting();
        Ok(())
    }

    /// Sends a request and waits for its answer, handling whatever else arrives meanwhile.
    async fn call(
        &mut self,
        connection: &mut Connection,
        frame: ClientFrame,
    ) -> Result<ServerFrame, End> {
        let id = self.take_id();
        connection
            .send(id, &frame)
            .await
            .map_err(|e| End::Lost(e.to_string()))?;
        loop {
            match connection.next().await {
                Incoming::Frame(frame) if answer_id(&frame) == Some(id) => {
                    return match frame {
                        ServerFrame::Error { code, message, .. } => {
                            Err(End::Lost(format!("{code:?}: {message}")))
                        }
                        frame => Ok(frame),
                    };
                }
                other => self.incoming(other)?,
            }
        }
    }

    async fn command(&mut self, connection: &mut Connection, command: Command) -> Result<(), End> {
        match command {
            Command::Close { done } => {
                self.done = Some(done);
                Err(End::Stop(None))
            }
            Command::Request { frame, reply } => {
                let id = self.take_id();
                match connection.send(id, &frame).await {
                    Ok(()) => {
                        self.pending.insert(id, reply);
                        Ok(())
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error.clone()));
                        Err(End::Lost(error.to_string()))
                    }
                }
            }
            Command::Send {
                target,
                client_msg_id,
                body,
                reply,
            } => {
                let unsent = Unsent {
                    client_msg_id,
                    target,
                    body,
                };
                self.queue_send(unsent.clone(), Some(reply));
                self.transmit(connection, &unsent)
                    .await
                    .map_err(|e| End::Lost(e.to_string()))
            }
        }
    }

    fn queue_send(&mut self, unsent: Unsent, reply: Option<oneshot::Sender<Result<Sent>>>) {
        if let Some(cache) = &self.cache
            && let Err(error) = cache.add_unsent(&unsent)
        {
            tracing::warn!(%error, "could not keep a send in the cache");
        }
        self.outbox.push_back(Outgoing { unsent, reply });
    }

    async fn transmit(&mut self, connection: &mut Connection, unsent: &Unsent) -> Result<()> {
        let (to, thread_id) = match &unsent.target {
            Target::User(user) => (Some(user.clone()), None),
            Target::Thread(thread) => (None, Some(*thread)),
        };
        let frame = ClientFrame::Send {
            id: crate::placeholder(),
            to,
            thread_id,
            client_msg_id: unsent.client_msg_id.clone(),
            body: unsent.body.clone(),
        };
        let id = self.take_id();
        self.in_flight.insert(id, unsent.client_msg_id.clone());
        connection.send(id, &frame).await
    }

    async fn resend_due(&mut self, connection: &mut Connection) -> Result<()> {
        if self.retry.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.retry.drain(..).partition(|(at, _)| *at <= now);
        self.retry = later;
        for (_, client_msg_id) in due {
            let unsent = self
                .outbox
                .iter()
                .find(|o| o.unsent.client_msg_id == client_msg_id)
                .map(|o| o.unsent.clone());
            if let Some(unsent) = unsent {
                self.transmit(connection, &unsent).await?;
            }
        }
        Ok(())
    }

    fn incoming(&mut self, incoming: Incoming) -> Result<(), End> {
        let frame = match incoming {
            Incoming::Closed(reason) => return Err(End::Lost(reason)),
            Incoming::Reset => {
                self.needs_sync = true;
                return Ok(());
            }
            Incoming::Frame(frame) => frame,
        };
        if let Some(id) = answer_id(&frame) {
            if let Some(client_msg_id) = self.in_flight.remove(&id) {
                if let ServerFrame::Error {
                    code: ErrorCode::Unauthorized,
                    message,
                    ..
                } = &frame
                {
                    // The token is gone (long-poll learns it here): keep the message, stop.
                    let error = Error::Server {
                        code: ErrorCode::Unauthorized,
                        message: message.clone(),
                    };
                    return Err(End::Stop(Some(error)));
                }
                self.send_answered(&client_msg_id, frame);
            } else if let Some(reply) = self.pending.remove(&id) {
                let _ = reply.send(match frame {
                    ServerFrame::Error { code, message, .. } => {
                        Err(Error::Server { code, message })
                    }
                    frame => Ok(frame),
                });
            }
            return Ok(());
        }
        match frame {
            ServerFrame::Message(message) => self.ingest(message),
            ServerFrame::UserEvent(record) => {
                let cursor = self.event_cursor.unwrap_or(0);
                if record.seq > cursor + 1 {
                    self.needs_sync = true;
                } else if record.seq == cursor + 1 {
                    self.set_cursor(record.seq);
                    self.emit(Event::Other(ServerFrame::UserEvent(record)));
                }
            }
            ServerFrame::Error { code, message, .. } => {
                tracing::warn!(?code, %message, "server error without a request id");
            }
            other => self.emit(Event::Other(other)),
        }
        Ok(())
    }

    fn send_answered(&mut self, client_msg_id: &str, frame: ServerFrame) {
        let position = self
            .outbox
            .iter()
            .position(|o| o.unsent.client_msg_id == client_msg_id);
        match frame {
            ServerFrame::Sent {
                client_msg_id,
                thread_id,
                seq,
                message_id,
                server_time,
                ..
            } => {
                let Some(position) = position else { return };
                let outgoing = self.outbox.remove(position).expect("found above");
                if let Some(cache) = &self.cache
                    && let Err(error) = cache.remove_unsent(&client_msg_id)
                {
                    tracing::warn!(%error, "could not clear a sent message from the cache");
                }
                let sent = Sent {
                    client_msg_id,
                    thread_id,
                    seq,
                    message_id,
                    server_time,
                };
                if let Some(identity) = &self.identity {
                    // The server does not echo a send to its own connection: the ack is the message.
                    let message = Message {
                        thread_id,
                        seq,
                        message_id,
                        sender_id: identity.user_id,
                        sender_device_id: identity.device_id,
                        client_msg_id: sent.client_msg_id.clone(),
                        kind: MessageKind::Text,
                        body: outgoing.unsent.body.clone(),
                        system: None,
                        created_at: server_time,
                    };
                    self.ingest(message);
                }
                self.emit(Event::Sent(sent.clone()));
                if let Some(reply) = outgoing.reply {
                    let _ = reply.send(Ok(sent));
                }
            }
            ServerFrame::Error { code, message, .. } if code.is_retryable() => {
                tracing::debug!(?code, %message, "send refused for now; retrying");
                self.retry
                    .push((Instant::now() + RETRY_AFTER, client_msg_id.to_owned()));
            }
            ServerFrame::Error { code, message, .. } => {
                if let Some(position) = position {
                    let outgoing = self.outbox.remove(position).expect("found above");
                    if let Some(cache) = &self.cache {
                        let _ = cache.remove_unsent(client_msg_id);
                    }
                    if let Some(reply) = outgoing.reply {
                        let _ = reply.send(Err(Error::Server { code, message }));
                    }
                }
            }
            other => tracing::warn!(?other, "unexpected answer to send"),
        }
    }

    fn ingest(&mut self, message: Message) {
        // A message that starts my view of a thread says where: a thread's first message,
        // or the "added" message naming me (I see it and what follows). Then nothing
        // before it is missing, even if I am removed again before the next sync.
        let me = self.identity.as_ref().map(|identity| identity.user_id);
        let starts_my_view = message.seq == 1
            || match &message.system {
                Some(SystemEvent::MembersAdded { users }) => {
                    me.is_some_and(|me| users.contains(&me))
                }
                _ => false,
            };
        if starts_my_view {
            self.know(message.thread_id, message.seq - 1);
        }
        let ingested = self.ordering.ingest(message);
        self.needs_sync |= ingested.needs_sync;
        for message in ingested.ready {
            self.deliver(message);
        }
    }

    fn deliver(&mut self, message: Message) {
        if let Some(cache) = &self.cache
            && let Err(error) = cache.delivered(&message)
        {
            tracing::warn!(%error, "could not cache a message");
        }
        self.emit(Event::Message(message));
    }

    fn know(&mut self, thread_id: ThreadId, seq: u64) {
        self.ordering.know(thread_id, seq);
        if let Some(cache) = &self.cache {
            let _ = cache.set_position(thread_id, self.ordering.contiguous[&thread_id]);
        }
    }

    fn set_cursor(&mut self, cursor: u64) {
        if self.event_cursor.is_some_and(|held| held >= cursor) {
            return;
        }
        self.event_cursor = Some(cursor);
        if let Some(cache) = &self.cache {
            let _ = cache.set_event_cursor(cursor);
        }
    }

    fn take_id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    fn emit(&self, event: Event) {
        let _ = self.events_tx.send(event);
    }
}

/// How many threads one `sync` may list in `have` within a frame of `max_frame` bytes: an
/// entry is at most 60 bytes (`"<36-char id>":<20 digits>,`), counted as 64 for slack, and
/// 1 KiB is left for the rest of the frame.
fn have_capacity(max_frame: usize) -> usize {
    (max_frame.saturating_sub(1024) / 64).max(1)
}

/// The request id of an answer, if the frame is one (and the id is ours: an integer).
fn answer_id(frame: &ServerFrame) -> Option<i64> {
    match frame.request_id()? {
        pigeon_proto::ReqId::Int(id) => Some(*id),
        pigeon_proto::ReqId::Str(_) => None,
    }
}

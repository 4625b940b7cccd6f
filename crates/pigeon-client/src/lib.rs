//! Rust SDK for Pigeon.
//!
//! [`Client::connect`] starts a background connection that never gives up on its own:
//! it reconnects with exponential backoff and jitter, syncs what it missed from the last
//! contiguous seq of each thread, fills gaps, resends unacknowledged messages with their
//! original `client_msg_id` (the server deduplicates them), and hands the application
//! messages once each, in seq order per thread, through [`Events`]. When a WebSocket
//! cannot be opened it falls back to HTTP long-poll. With a local cache
//! ([`ClientConfig::cache`]) unsent messages survive a restart of the app, and history
//! is readable offline ([`Cache`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), pigeon_client::Error> {
//! use pigeon_client::{Client, ClientConfig, Event, Target};
//!
//! let session = pigeon_client::login("http://127.0.0.1:8080", "alice", "alice-secret", "laptop").await?;
//! let (client, mut events) = Client::connect(ClientConfig::new("http://127.0.0.1:8080", &session.token))?;
//! let sent = client.send_text(Target::User("bob".into()), "hi bob").await?;
//! println!("stored as seq {} of {}", sent.seq, sent.thread_id);
//! while let Some(event) = events.next().await {
//!     if let Event::Message(message) = event {
//!         println!("{}: {}", message.seq, message.body);
//!     }
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod backoff;
mod cache;
mod engine;
mod http;
mod order;
mod transport;

use std::path::PathBuf;
use std::time::Duration;

pub use cache::Cache;
pub use http::{Rpc, Session, login, logout, register};
pub use pigeon_proto as proto;
use pigeon_proto::{
    ClientFrame, ContactAction, ContactInfo, ErrorCode, GroupInfo, MarkKind, Message, MessageId,
    ReqId, ServerFrame, ThreadId, ThreadSummary,
};
use tokio::sync::{mpsc, oneshot};

/// What can go wrong.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The server answered with an error frame or an HTTP error.
    #[error("{message} ({})", code.as_str())]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server could not be reached, or the connection dropped before the answer.
    /// Sends are not affected: they are retried until acknowledged.
    #[error("not connected: {0}")]
    Disconnected(String),
    /// The client was closed.
    #[error("client closed")]
    Closed,
    /// The local cache failed.
    #[error("local cache: {0}")]
    Cache(String),
    /// An answer did not have the expected shape.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

impl Error {
    /// The server's error code, if the server refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket, falling back to long-poll when the socket cannot be opened.
    Auto,
    /// WebSocket only.
    WebSocket,
    /// HTTP long-poll only.
    LongPoll,
}

/// Where a client without a cache starts its view of each thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// Fetch every thread's history first (a full sync).
    Beginning,
    /// Only what arrives from now on (tools like `pigeon tail`).
    Now,
}

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server's base URL, such as `http://127.0.0.1:8080`.
    pub server: String,
    /// A session token from [`login`].
    pub token: String,
    /// A SQLite file for the outbox, sync state and message cache.
    pub cache: Option<PathBuf>,
    /// Transport choice.
    pub transport: Transport,
    /// Where to start when the cache holds nothing yet.
    pub start: StartFrom,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
}

impl ClientConfig {
    /// Settings with defaults: WebSocket with fallback, no cache, full sync, 0.2–10 s backoff.
    pub fn new(server: &str, token: &str) -> Self {
        Self {
            server: server.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            cache: None,
            transport: Transport::Auto,
            start: StartFrom::Beginning,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(10),
        }
    }
}

/// Where to send a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A user, by username or id: their direct thread with you.
    User(String),
    /// A thread.
    Thread(ThreadId),
}

/// A message the server has committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The client's id for it.
    pub client_msg_id: String,
    /// The thread.
    pub thread_id: ThreadId,
    /// Its seq.
    pub seq: u64,
    /// Its id.
    pub message_id: MessageId,
    /// Commit time (ms since the Unix epoch).
    pub server_time: i64,
}

/// Which transport a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// A WebSocket.
    WebSocket,
    /// HTTP long-poll.
    LongPoll,
}

/// What the client tells the application.
#[derive(Debug, Clone)]
pub enum Event {
    /// Connected and synced; live events follow.
    Connected(TransportKind),
    /// The connection dropped; the client is reconnecting.
    Disconnected(String),
    /// A message, once, in seq order within its thread (yours included, once committed).
    Message(Message),
    /// One of your messages was committed (also returned by [`Client::send_text`]).
    Sent(Sent),
    /// Any other server event: receipts, presence, typing, user events.
    Other(ServerFrame),
    /// Per-user events were missed for good (the log is bounded): refetch the thread
    /// list and the contacts instead of replaying them.
    EventsReset,
    /// The client stopped for good (e.g. the token was revoked).
    Fatal(Error),
}

/// The stream of [`Event`]s of one client.
pub struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Events {
    /// Returns the next event; `None` once the client is gone.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

/// A send already queued by [`Client::queue_send`].
pub struct PendingSend {
    answer: oneshot::Receiver<Result<Sent>>,
}

impl PendingSend {
    /// Waits until the server has committed the message (or refused it).
    pub async fn wait(self) -> Result<Sent> {
        self.answer.await.map_err(|_| Error::Closed)?
    }
}

/// A request to the connection task.
pub(crate) enum Command {
    Request {
        frame: ClientFrame,
        reply: oneshot::Sender<Result<ServerFrame>>,
    },
    Send {
        target: Target,
        client_msg_id: String,
        body: String,
        reply: oneshot::Sender<Result<Sent>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// A handle to a connection. Cheap to clone; the connection lives until [`Client::close`]
/// or until every handle is dropped.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
}

impl Client {
    /// Starts the connection task and returns at once; the client connects in the background.
    pub fn connect(config: ClientConfig) -> Result<(Client, Events)> {
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let engine = engine::Engine::new(config, commands_rx, events_tx)?;
        tokio::spawn(engine.run());
        Ok((
            Client {
                commands: commands_tx,
            },
            Events { rx: events_rx },
        ))
    }

    /// Sends a text message. Resolves once the server has committed it, however many
    /// reconnects that takes; a resend never makes a second message.
    pub async fn send_text(&self, target: Target, body: impl Into<String>) -> Result<Sent> {
        self.send_with_id(target, new_client_msg_id(), body).await
    }

    /// Like [`Client::send_text`] with a `client_msg_id` of the caller's choosing.
    pub async fn send_with_id(
        &self,
        target: Target,
        client_msg_id: String,
        body: impl Into<String>,
    ) -> Result<Sent> {
        self.queue_send(target, client_msg_id, body)?.wait().await
    }

    /// Queues a send now and returns a handle to await its ack. Sends queued one after
    /// another go out, and are stored, in that order.
    pub fn queue_send(
        &self,
        target: Target,
        client_msg_id: String,
        body: impl Into<String>,
    ) -> Result<PendingSend> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Send {
            target,
            client_msg_id,
            body: body.into(),
            reply,
        };
        self.commands.send(command).map_err(|_| Error::Closed)?;
        Ok(PendingSend { answer })
    }

    /// Sends any request and returns its answer; `error` frames become [`Error::Server`].
    /// The frame's `id` is replaced by the client's own.
    pub async fn request(&self, frame: ClientFrame) -> Result<ServerFrame> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request { frame, reply })
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Returns a page of a thread's history, oldest first, and whether more lies beyond.
    pub async fn history(
        &self,
        thread_id: ThreadId,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<(Vec<Message>, bool)> {
        match self
            .request(ClientFrame::History {
                id: placeholder(),
                thread_id,
                before,
                after,
                limit,
            })
            .await?
        {
            ServerFrame::History { messages, more, .. } => Ok((messages, more)),
            other => Err(unexpected(&other)),
        }
    }

    /// Returns the conversation list and the total unread.
    pub async fn threads(&self) -> Result<(Vec<ThreadSummary>, u64)> {
        match self
            .request(ClientFrame::Threads { id: placeholder() })
            .await?
        {
            ServerFrame::Threads {
                threads,
                total_unread,
                ..
            } => Ok((threads, total_unread)),
            other => Err(unexpected(&other)),
        }
    }

    /// Moves your read (or delivered) marker in a thread.
    pub async fn mark(&self, thread_id: ThreadId, seq: u64, kind: MarkKind) -> Result<()> {
        self.request(ClientFrame::Mark {
            id: placeholder(),
            thread_id,
            seq,
            kind,
        })
        .await
        .map(|_| ())
    }

    /// Creates a group with you as its owner; returns it.
    pub async fn create_group(&self, title: &str, members: &[&str]) -> Result<GroupInfo> {
        let frame = ClientFrame::CreateGroup {
            id: placeholder(),
            title: title.to_owned(),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
            topic: None,
            avatar: None,
            share_history: false,
        };
        self.group_request(frame).await
    }

    /// Adds members to a group (usernames or user ids).
    pub async fn add_members(&self, thread_id: ThreadId, members: &[&str]) -> Result<GroupInfo> {
        let members = members.iter().map(|m| (*m).to_owned()).collect();
        self.group_request(ClientFrame::AddMembers {
            id: placeholder(),
            thread_id,
            members,
        })
        .await
    }

    /// Removes a member from a group.
    pub async fn remove_member(&self, thread_id: ThreadId, user: &str) -> Result<GroupInfo> {
        self.group_request(ClientFrame::RemoveMember {
            id: placeholder(),
            thread_id,
            user: user.to_owned(),
        })
        .await
    }

    /// Leaves a group.
    pub async fn leave_group(&self, thread_id: ThreadId) -> Result<GroupInfo> {
        self.group_request(ClientFrame::LeaveGroup {
            id: placeholder(),
            thread_id,
        })
        .await
    }

    async fn group_request(&self, frame: ClientFrame) -> Result<GroupInfo> {
        match self.request(frame).await? {
            ServerFrame::Group { group, .. } => Ok(group),
            other => Err(unexpected(&other)),
        }
    }

    /// Acts on a contact (request, accept, decline, cancel, remove, block, unblock); returns the entry.
    pub async fn contact(&self, user: &str, action: ContactAction) -> Result<ContactInfo> {
        match self
            .request(ClientFrame::Contact {
                id: placeholder(),
                user: user.to_owned(),
                action,
            })
            .await?
        {
            ServerFrame::Contact { contact, .. } => Ok(contact),
            other => Err(unexpected(&other)),
        }
    }

    /// Returns your contact book, with presence for friends.
    pub async fn contacts(&self) -> Result<Vec<ContactInfo>> {
        match self
            .request(ClientFrame::Contacts { id: placeholder() })
            .await?
        {
            ServerFrame::Contacts { contacts, .. } => Ok(contacts),
            other => Err(unexpected(&other)),
        }
    }

    /// Returns whether a user is online and when they were last seen (if you may know).
    pub async fn presence(&self, user: &str) -> Result<(bool, Option<i64>)> {
        match self
            .request(ClientFrame::Presence {
                id: placeholder(),
                user: user.to_owned(),
            })
            .await?
        {
            ServerFrame::Presence {
                online, last_seen, ..
            } => Ok((online, last_seen)),
            other => Err(unexpected(&other)),
        }
    }

    /// Tells a thread's other members you are typing (or stopped).
    pub async fn typing(&self, thread_id: ThreadId, active: bool) -> Result<()> {
        self.request(ClientFrame::Typing {
            id: placeholder(),
            thread_id,
            active,
        })
        .await
        .map(|_| ())
    }

    /// Stops the connection task; unsent messages stay in the cache, if there is one.
    pub async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.commands.send(Command::Close { done }).is_ok() {
            let _ = finished.await;
        }
    }
}

/// A fresh, time-ordered `client_msg_id`.
pub fn new_client_msg_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A request id to put in frames given to [`Client::request`]; the client replaces it.
pub fn placeholder() -> ReqId {
    ReqId::Int(0)
}

pub(crate) fn unexpected(frame: &ServerFrame) -> Error {
    Error::Unexpected(serde_json::to_string(frame).unwrap_or_default())
}

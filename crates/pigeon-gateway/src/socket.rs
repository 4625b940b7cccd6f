//! The WebSocket session: authenticate, register, then one task reads requests and writes
//! events until either side ends.
//!
//! The upgrade is answered by hand rather than by axum's `WebSocketUpgrade`: once hyper hands
//! the connection over, the session owns the bare `TcpStream` (no boxed `Upgraded`, no
//! second task), which keeps an idle connection at about 2 KiB of memory.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use futures::{FutureExt, SinkExt, StreamExt};
use governor::clock::MonotonicClock;
use governor::{Quota, RateLimiter};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use pigeon_core::{Caller, ChatError};
use pigeon_proto::{
    ClientFrame, ErrorCode, FrameError, PROTOCOL_VERSION, ReqId, ServerFrame, close,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes};

use crate::AppState;
use crate::http::{ApiError, bearer_token};
use crate::mailbox::{Mailbox, Outbound, Wire, push_frame};
use crate::registry::Sink;

/// Most queued events gathered into one write.
const MAX_COALESCE: u64 = 64;

/// Bytes gathered into one write before it goes out, unless a single frame is larger.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Bytes read from the socket at a time. An idle connection holds exactly this much, so it
/// is small; a larger frame takes more reads, and the buffer grows while frames queue up.
const READ_BUFFER: usize = 128;

type Socket = WebSocketStream<Wire>;

/// `GET /ws`: upgrades to a WebSocket, authenticated by `Authorization: Bearer` or a `hello` frame.
pub(crate) async fn upgrade(State(state): State<AppState>, mut request: Request) -> Response {
    let accept = match accept_key(request.headers()) {
        Ok(accept) => accept,
        Err(response) => return *response,
    };
    let pre_auth = match bearer_token(request.headers()) {
        Some(token) => match state.chat.authenticate(token, None).await {
            Ok(caller) => Some(caller),
            Err(error) => return ApiError::from(error).into_response(),
        },
        None => None,
    };
    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        return ApiError::new(
            ErrorCode::InvalidField,
            "this connection cannot be upgraded",
        )
        .into_response();
    };
    let limit = state.config.max_frame_bytes;
    // Events and answers bypass tungstenite's write buffer (see `write_frames`), which
    // would keep the size of the largest thing ever written for the socket's lifetime; it
    // only carries pongs and the close frame, written at once.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(limit.max(64 * 1024) * 4)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let handoff = Box::new(Handoff {
        on_upgrade,
        config,
        pre_auth,
    });
    let tasks = state.tasks.clone();
    tasks.spawn(session(state, handoff));

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// Checks an RFC 6455 opening handshake and returns the `Sec-WebSocket-Accept` value.
fn accept_key(headers: &HeaderMap) -> Result<HeaderValue, Box<Response>> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|value| {
                value
                    .split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    let refuse =
        |message: &str| Box::new(ApiError::new(ErrorCode::InvalidField, message).into_response());
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(refuse(
            "expected a WebSocket upgrade (Connection: upgrade, Upgrade: websocket)",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut response = ApiError::new(
            ErrorCode::InvalidField,
            "unsupported WebSocket version; this server speaks 13",
        )
        .into_response();
        *response.status_mut() = StatusCode::UPGRADE_REQUIRED;
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(Box::new(response));
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) => key,
        (None, _) => return Err(refuse("missing Sec-WebSocket-Key")),
        (Some(_), Some(_)) => return Err(refuse("more than one Sec-WebSocket-Key")),
    };
    // RFC 6455 §4.2.1: the base64 encoding of 16 bytes.
    if BASE64_STANDARD
        .decode(key.as_bytes())
        .map_or(true, |nonce| nonce.len() != 16)
    {
        return Err(refuse("Sec-WebSocket-Key is not 16 base64-encoded bytes"));
    }
    HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .map_err(|_| refuse("invalid Sec-WebSocket-Key"))
}

/// Waits for hyper to hand over the connection: the bare stream, and any bytes the
/// client sent right behind the request.
async fn take_over(on_upgrade: OnUpgrade) -> Option<(TcpStream, Vec<u8>)> {
    let upgraded = on_upgrade
        .await
        .map_err(|error| tracing::debug!(%error, "upgrade failed"))
        .ok()?;
    // `crate::serve` runs HTTP/1 connections over `TokioIo<TcpStream>`, so this always fits.
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| tracing::error!("upgraded connection is not a TCP stream"))
        .ok()?;
    Some((parts.io.into_inner(), parts.read_buf.to_vec()))
}

/// Wraps the socket in the mailbox as a WebSocket.
async fn wrap(wire: Wire, early: Vec<u8>, config: WebSocketConfig) -> Socket {
    if early.is_empty() {
        WebSocketStream::from_raw_socket(wire, Role::Server, Some(config)).await
    } else {
        WebSocketStream::from_partially_read(wire, early, Role::Server, Some(config)).await
    }
}

/// Why a session ended, and how to close the socket.
enum End {
    /// Send a close frame with this code and reason.
    Close(u16, &'static str),
    /// The peer closed: answer its close frame (tungstenite has the answer queued).
    Answer,
    /// The peer vanished; nothing to send.
    Gone,
}

/// What the upgrade request leaves to the session.
struct Handoff {
    on_upgrade: OnUpgrade,
    config: WebSocketConfig,
    /// Set when the upgrade request carried a valid token.
    pre_auth: Option<Caller>,
}

/// One connection from upgrade to close. Only `serve` is inline: the other phases are boxed,
/// so their state is freed once done instead of sizing the long-lived future (an idle
/// connection's memory is mostly this future).
async fn session(state: AppState, handoff: Box<Handoff>) {
    let Some(Opened {
        mut socket,
        caller,
        mailbox,
    }) = Box::pin(open(&state, handoff)).await
    else {
        return;
    };
    // From here on, events may be written straight into the socket by the fan-out.
    mailbox.ready();
    let end = serve(&state, &caller, &mut socket, &mailbox).await;
    // And from here on, never again: the close frame must be the last thing sent.
    mailbox.stop();
    Box::pin(close(&state, &caller, &mut socket, end)).await;
}

/// A session past `welcome`.
struct Opened {
    socket: Socket,
    caller: Caller,
    mailbox: Arc<Mailbox>,
}

/// Takes over the connection, authenticates (unless the upgrade request did), registers
/// the connection and says `welcome`. `None` when the session ended before that.
async fn open(state: &AppState, handoff: Box<Handoff>) -> Option<Opened> {
    let Handoff {
        on_upgrade,
        config,
        pre_auth,
    } = *handoff;
    let (stream, early) = take_over(on_upgrade).await?;
    // The mailbox owns the socket (see `mailbox`); it takes no direct writes before `ready`.
    let mailbox = Arc::new(Mailbox::new(
        state.config.send_queue,
        state.registry.clock(),
        Some(stream),
    ));
    let mut wire = Wire(mailbox.clone());
    let (socket, caller) = match pre_auth {
        Some(caller) => {
            let caller = register(state, caller, &mailbox).await;
            // `welcome` goes straight to the stream, framed by tungstenite but before it
            // wraps the stream: its write buffer then stays empty until the first event,
            // which an idle connection never gets.
            let frame = encode(&welcome(state, &caller, None)).map(|text| {
                let mut bytes = Vec::new();
                push_frame(&mut bytes, text);
                bytes
            });
            let written = match frame {
                Some(bytes) => wire.write_all(&bytes).await.is_ok(),
                None => false,
            };
            if !written {
                unregister(state, &caller).await;
                return None;
            }
            state.metrics.frames_out.increment(1);
            (wrap(wire, early, config).await, caller)
        }
        None => {
            let mut socket = wrap(wire, early, config).await;
            let (caller, hello_id) = match await_hello(state, &mut socket).await {
                Ok(authed) => authed,
                Err(end) => {
                    finish(&mut socket, end).await;
                    return None;
                }
            };
            let caller = register(state, caller, &mailbox).await;
            if send_frame(state, &mut socket, &welcome(state, &caller, hello_id))
                .await
                .is_err()
            {
                close(state, &caller, &mut socket, End::Gone).await;
                return None;
            }
            (socket, caller)
        }
    };
    let mut socket = socket;
    // Registered after the shutdown sweep told every socket to close: close now.
    if state.cancel.is_cancelled() {
        let end = End::Close(close::GOING_AWAY, "server shutting down");
        close(state, &caller, &mut socket, end).await;
        return None;
    }
    Some(Opened {
        socket,
        caller,
        mailbox,
    })
}

/// Registers an authenticated connection and counts it for presence. Registered before
/// `welcome`: anything committed after the client sees `welcome` reaches it live, and
/// anything before is in its sync.
async fn register(state: &AppState, mut caller: Caller, mailbox: &Arc<Mailbox>) -> Caller {
    let conn_id = state.registry.next_conn_id();
    caller.conn = Some(conn_id);
    state.registry.add(
        caller.user_id,
        conn_id,
        caller.device_id,
        Sink::Socket(mailbox.clone()),
    );
    state.metrics.connections_open.increment(1.0);
    state.chat.connection_opened(&caller).await;
    caller
}

fn welcome(state: &AppState, caller: &Caller, hello_id: Option<ReqId>) -> ServerFrame {
    ServerFrame::Welcome {
        id: hello_id,
        protocol: PROTOCOL_VERSION,
        user_id: caller.user_id,
        username: caller.username.clone(),
        device_id: caller.device_id,
        heartbeat_timeout_ms: u64::try_from(state.config.heartbeat_timeout.as_millis())
            .unwrap_or(u64::MAX),
        max_body_bytes: state.chat.config().max_body_bytes,
        max_frame_bytes: state.config.max_frame_bytes,
    }
}

/// Takes the connection out of the registry and presence.
async fn unregister(state: &AppState, caller: &Caller) {
    if let Some(conn_id) = caller.conn {
        state.registry.remove(caller.user_id, conn_id);
    }
    state.metrics.connections_open.decrement(1.0);
    state.chat.connection_closed(caller).await;
}

/// Unregisters the connection, records presence and closes the socket.
async fn close(state: &AppState, caller: &Caller, socket: &mut Socket, end: End) {
    unregister(state, caller).await;
    finish(socket, end).await;
}

/// Waits for the `hello` frame of a socket opened without a token header.
async fn await_hello(
    state: &AppState,
    socket: &mut Socket,
) -> Result<(Caller, Option<ReqId>), End> {
    let deadline = Instant::now() + state.config.heartbeat_timeout;
    let text = loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return Err(End::Close(close::HEARTBEAT_TIMEOUT, "no hello received")),
            Ok(None) => return Err(End::Gone),
            Ok(Some(Ok(Message::Close(_)))) => return Err(End::Answer),
            Ok(Some(Err(error))) => return Err(read_error(error)),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
            Ok(Some(Ok(Message::Text(text)))) => break text,
            Ok(Some(Ok(Message::Binary(_)))) => {
                return Err(End::Close(close::UNSUPPORTED_DATA, "frames are JSON text"));
            }
        }
    };
    state.metrics.frames_in.increment(1);
    let (id, token) = match ClientFrame::parse(&text) {
        Ok(ClientFrame::Hello { id, token }) => (id, token),
        Err(FrameError::NotJson) => {
            return Err(End::Close(
                close::INVALID_PAYLOAD,
                "frame is not a JSON object",
            ));
        }
        Ok(_) | Err(FrameError::Invalid { .. }) => {
            return Err(End::Close(
                close::POLICY_VIOLATION,
                "first frame must be hello",
            ));
        }
    };
    match state.chat.authenticate(&token, None).await {
        Ok(caller) => Ok((caller, Some(id))),
        Err(error) => {
            let frame = error.frame(Some(id));
            let _ = send_frame(state, socket, &frame).await;
            Err(match error.code() {
                ErrorCode::Unauthorized => End::Close(close::UNAUTHORIZED, "invalid token"),
                _ => End::Close(close::TRY_AGAIN_LATER, "authentication unavailable"),
            })
        }
    }
}

/// The answers to the request (or the run of sends) in progress, in order.
type Answer<'a> = Pin<Box<dyn Future<Output = Vec<ServerFrame>> + Send + 'a>>;

/// Most `send` frames taken together from what a client has already sent, and most
/// bytes of their bodies: what one connection can make the server hold while its run
/// waits on the store.
const MAX_RUN: usize = 64;
const MAX_RUN_BYTES: usize = 64 * 1024;

/// What the session loop does after `select!`. The arms only decide; the writes happen
/// after it, so nothing an arm held stays in the session's future (apart from a frame
/// that ended a run of sends, boxed, until the run is answered).
enum Step {
    /// Write this queued event and whatever else is queued.
    Events(Utf8Bytes),
    /// Finish a frame the fan-out wrote in part.
    Tail,
    /// Write these encoded answers, in one write.
    Answers(Vec<Utf8Bytes>),
    /// Nothing to write.
    Idle,
    /// End the session.
    End(End),
}

/// What one frame from the client asks for.
enum Incoming {
    /// A request to run.
    Request(ClientFrame),
    /// An answer to write at once (an invalid or rate-limited frame).
    Answer(ServerFrame),
    /// Nothing (a ping or a pong).
    Idle,
    /// End the session.
    End(End),
}

/// Reads one WebSocket message as the session sees it: every frame counts against the
/// rate limit, well-formed or not.
fn classify(
    state: &AppState,
    mailbox: &Mailbox,
    limiter: &Limiter,
    incoming: Option<Result<Message, tungstenite::Error>>,
) -> Incoming {
    match incoming {
        None => Incoming::End(End::Gone),
        Some(Err(error)) => Incoming::End(read_error(error)),
        Some(Ok(Message::Text(text))) => {
            mailbox.heard_at(state.registry.clock());
            state.metrics.frames_in.increment(1);
            let limited = limiter.check().is_err();
            match ClientFrame::parse(&text) {
                Ok(frame) if limited => {
                    Incoming::Answer(ChatError::RateLimited.frame(Some(frame.id().clone())))
                }
                Ok(frame) => Incoming::Request(frame),
                Err(FrameError::NotJson) => Incoming::End(End::Close(
                    close::INVALID_PAYLOAD,
                    "frame is not a JSON object",
                )),
                Err(FrameError::Invalid { id, .. }) if limited => {
                    Incoming::Answer(ChatError::RateLimited.frame(id))
                }
                Err(FrameError::Invalid { id, code, message }) => {
                    Incoming::Answer(ServerFrame::Error { id, code, message })
                }
            }
        }
        Some(Ok(Message::Binary(_))) => {
            Incoming::End(End::Close(close::UNSUPPORTED_DATA, "frames are JSON text"))
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
            mailbox.heard_at(state.registry.clock());
            Incoming::Idle
        }
        Some(Ok(Message::Close(_))) => Incoming::End(End::Answer),
    }
}

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    MonotonicClock,
    governor::middleware::NoOpMiddleware<<MonotonicClock as governor::clock::Clock>::Instant>,
>;

/// After a `send` into a known thread: takes the further such sends the client has
/// already sent (what the socket yields without waiting, up to [`MAX_RUN`] frames and
/// about [`MAX_RUN_BYTES`] of bodies), so they are
/// stored together and answered in one write. A client that sends one message at a time
/// gets no run, and nothing waits for one. The first other frame ends the run and is
/// handled after it, in its place.
fn read_ahead(
    state: &AppState,
    socket: &mut Socket,
    mailbox: &Mailbox,
    limiter: &Limiter,
    first: ClientFrame,
) -> (Vec<ClientFrame>, Option<Incoming>) {
    let mut bytes = body_len(&first);
    let mut run = vec![first];
    while run.len() < MAX_RUN && bytes < MAX_RUN_BYTES {
        let Some(incoming) = socket.next().now_or_never() else {
            break;
        };
        match classify(state, mailbox, limiter, incoming) {
            Incoming::Request(frame) if pigeon_core::is_thread_send(&frame) => {
                bytes += body_len(&frame);
                run.push(frame);
            }
            // Pings do not count towards the run; tokio's task budget bounds this loop.
            Incoming::Idle => {}
            other => return (run, Some(other)),
        }
    }
    (run, None)
}

fn body_len(frame: &ClientFrame) -> usize {
    match frame {
        ClientFrame::Send { body, .. } => body.len(),
        _ => 0,
    }
}

/// The session loop. Requests are answered one at a time, in order, except that `send`
/// frames into known threads which the client has already sent are taken together (see
/// [`read_ahead`]): they are stored in order, usually in one transaction, and answered in
/// order. While requests run, events keep flowing out and reading pauses (backpressure).
/// The heartbeat timeout and shutdown arrive through the queue, from the gateway's sweep.
async fn serve(state: &AppState, caller: &Caller, socket: &mut Socket, mailbox: &Mailbox) -> End {
    let quota =
        Quota::per_second(NonZeroU32::new(state.config.rate_per_second.max(1)).expect("nonzero"))
            .allow_burst(NonZeroU32::new(state.config.rate_burst.max(1)).expect("nonzero"));
    // The std clock: governor's default (quanta) calibrates itself with CPUID for every
    // new limiter, which was a tenth of the server's CPU while sockets were connecting.
    let limiter: Limiter = RateLimiter::direct_with_clock(quota, MonotonicClock);
    let mut pending: Option<Answer<'_>> = None;
    // A frame read after a run of sends, handled once the run is answered. Boxed: it is
    // rare, and an idle session's future should not carry a frame's worth of space.
    let mut deferred: Option<Box<Incoming>> = None;

    loop {
        let incoming = if pending.is_none() {
            deferred.take()
        } else {
            None
        };
        let step = if let Some(incoming) = incoming {
            let incoming = *incoming;
            start(
                state,
                caller,
                socket,
                mailbox,
                &limiter,
                incoming,
                &mut pending,
                &mut deferred,
            )
        } else {
            // Unbiased: a steady stream of events must not starve answers or reads.
            tokio::select! {
                outbound = mailbox.next() => match outbound {
                    Outbound::Frame(text) => Step::Events(text),
                    Outbound::Tail => Step::Tail,
                    Outbound::Close(code, reason) => Step::End(End::Close(code, reason)),
                },
                answers = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                    pending = None;
                    answers
                        .iter()
                        .map(encode)
                        .collect::<Option<Vec<_>>>()
                        .map_or(Step::End(End::Gone), Step::Answers)
                }
                incoming = socket.next(), if pending.is_none() => {
                    let incoming = classify(state, mailbox, &limiter, incoming);
                    start(state, caller, socket, mailbox, &limiter, incoming, &mut pending, &mut deferred)
                }
            }
        };
        // The peer's close ended a run: what is still written goes before the answering
        // close, which tungstenite holds until the session finishes.
        let before_close = matches!(deferred.as_deref(), Some(Incoming::End(End::Answer)));
        match step {
            Step::Events(first) => {
                // Boxed: a batch's state lives only while it is written.
                let batch = write_batch(state, socket, first, mailbox, before_close);
                if let Err(end) = Box::pin(batch).await {
                    return end;
                }
            }
            Step::Tail => {
                if Box::pin(write_frames(state, socket, &[], before_close))
                    .await
                    .is_err()
                {
                    return End::Gone;
                }
            }
            Step::Answers(texts) => {
                let count = texts.len() as u64;
                let mut bytes = Vec::new();
                for text in texts {
                    push_frame(&mut bytes, text);
                }
                // Boxed, like a batch: the write's state lives only while it is written.
                if Box::pin(write_frames(state, socket, &bytes, before_close))
                    .await
                    .is_err()
                {
                    return End::Gone;
                }
                state.metrics.frames_out.increment(count);
            }
            Step::Idle => {}
            Step::End(end) => return end,
        }
    }
}

/// Starts what a frame asks for: a request becomes the pending answer (with the run of
/// sends after it, for a send into a known thread), an immediate answer is written.
#[allow(clippy::too_many_arguments)]
fn start<'a>(
    state: &'a AppState,
    caller: &'a Caller,
    socket: &mut Socket,
    mailbox: &Mailbox,
    limiter: &Limiter,
    incoming: Incoming,
    pending: &mut Option<Answer<'a>>,
    deferred: &mut Option<Box<Incoming>>,
) -> Step {
    match incoming {
        Incoming::Request(frame) if pigeon_core::is_thread_send(&frame) => {
            let (run, next) = read_ahead(state, socket, mailbox, limiter, frame);
            *deferred = next.map(Box::new);
            *pending = Some(Box::pin(state.chat.handle_sends(caller, run)));
            Step::Idle
        }
        Incoming::Request(frame) => {
            *pending = Some(Box::pin(async move {
                vec![state.chat.handle(caller, frame).await]
            }));
            Step::Idle
        }
        Incoming::Answer(answer) => {
            encode(&answer).map_or(Step::End(End::Gone), |text| Step::Answers(vec![text]))
        }
        Incoming::Idle => Step::Idle,
        Incoming::End(end) => Step::End(end),
    }
}

/// Encodes a frame for the socket.
fn encode(frame: &ServerFrame) -> Option<Utf8Bytes> {
    match serde_json::to_string(frame) {
        Ok(text) => Some(text.into()),
        Err(error) => {
            tracing::error!(%error, "encode frame");
            None
        }
    }
}

/// Writes frames formatted by [`push_frame`] straight to the socket, after anything
/// tungstenite still holds (a pong) and the rest of a direct write, so the order on the
/// wire is kept. The bytes are the caller's and are freed after the write: an idle socket
/// keeps no write buffer, whatever it once sent (tungstenite's buffer never shrinks).
///
/// A client that stops reading would otherwise hold its session (and its presence)
/// forever: TCP keeps a zero window open indefinitely. A write that cannot finish within
/// the heartbeat timeout ends the session; the client reconnects and syncs.
///
/// With `before_close`, what tungstenite holds stays there: the peer's close has been
/// read and tungstenite holds the answering close, which must go out after these bytes
/// (nothing may follow a close frame), when the session finishes.
async fn write_frames(
    state: &AppState,
    socket: &mut Socket,
    bytes: &[u8],
    before_close: bool,
) -> std::io::Result<()> {
    let write = async {
        if !before_close {
            socket.flush().await.map_err(std::io::Error::other)?;
        }
        socket.get_mut().write_all(bytes).await
    };
    timeout(state.config.heartbeat_timeout, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Writes one queued event and whatever else is already queued, in one write.
async fn write_batch(
    state: &AppState,
    socket: &mut Socket,
    first: Utf8Bytes,
    mailbox: &Mailbox,
    before_close: bool,
) -> Result<(), End> {
    let mut bytes = Vec::new();
    push_frame(&mut bytes, first);
    let mut written: u64 = 1;
    let mut close_after = None;
    while written < MAX_COALESCE && bytes.len() < MAX_BATCH_BYTES {
        match mailbox.try_next() {
            Some(Outbound::Frame(text)) => {
                push_frame(&mut bytes, text);
                written += 1;
            }
            Some(Outbound::Close(code, reason)) => {
                close_after = Some(End::Close(code, reason));
                break;
            }
            // A tail goes out first in any write.
            Some(Outbound::Tail) | None => break,
        }
    }
    write_frames(state, socket, &bytes, before_close)
        .await
        .map_err(|_| End::Gone)?;
    mailbox.ready();
    state.metrics.frames_out.increment(written);
    close_after.map_or(Ok(()), Err)
}

fn read_error(error: tungstenite::Error) -> End {
    match error {
        tungstenite::Error::Capacity(_) => {
            End::Close(close::MESSAGE_TOO_BIG, "frame over the size limit")
        }
        tungstenite::Error::Utf8(_) => {
            End::Close(close::INVALID_PAYLOAD, "text frame is not UTF-8")
        }
        tungstenite::Error::Protocol(_) => {
            End::Close(close::POLICY_VIOLATION, "websocket protocol error")
        }
        _ => End::Gone,
    }
}

async fn send_frame(state: &AppState, socket: &mut Socket, frame: &ServerFrame) -> Result<(), ()> {
    let mut bytes = Vec::new();
    push_frame(&mut bytes, encode(frame).ok_or(())?);
    write_frames(state, socket, &bytes, false)
        .await
        .map_err(|_| ())?;
    state.metrics.frames_out.increment(1);
    Ok(())
}

async fn finish(socket: &mut Socket, end: End) {
    // Never wait long: a peer that stopped reading cannot even take a close frame.
    let bound = std::time::Duration::from_secs(2);
    match end {
        End::Close(code, reason) => {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: Utf8Bytes::from_static(reason),
            };
            // Give the peer a moment to take the close and answer it, as RFC 6455 asks.
            let _ = timeout(bound, async {
                if socket.send(Message::Close(Some(frame))).await.is_err() {
                    return;
                }
                while let Some(Ok(message)) = socket.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        // tungstenite queued the answer when it read the peer's close; it goes out now,
        // after anything written since (a run's answers), and there is no next read.
        End::Answer => {
            let _ = timeout(bound, socket.flush()).await;
        }
        End::Gone => {}
    }
}

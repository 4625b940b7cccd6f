//! The WebSocket session: authenticate, register, then one task reads requests and writes
//! events until either side ends.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use futures_channel::mpsc;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use pigeon_core::{Caller, ChatError};
use pigeon_proto::{
    ClientFrame, ErrorCode, FrameError, PROTOCOL_VERSION, ReqId, ServerFrame, close,
};
use tokio::time::{Instant, sleep_until, timeout};

use crate::AppState;
use crate::http::{ApiError, bearer_token};
use crate::registry::{Outbound, Sink};

/// Most queued events written before one flush.
const MAX_COALESCE: u64 = 64;

/// `GET /ws`: upgrades to a WebSocket, authenticated by `Authorization: Bearer` or a `hello` frame.
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let pre_auth = match bearer_token(&headers) {
        Some(token) => match state.chat.authenticate(token, None).await {
            Ok(caller) => Some(caller),
            Err(error) => return ApiError::from(error).into_response(),
        },
        None => None,
    };
    let limit = state.config.max_frame_bytes;
    let tasks = state.tasks.clone();
    // Frames fed to the socket gather in the write buffer up to this size, so a backlog of
    // events goes out in few writes; an idle socket keeps only what its largest batch used.
    ws.read_buffer_size(512)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(limit.max(64 * 1024) * 4)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| tasks.track_future(run(state, socket, pre_auth)))
}

/// Why a session ended, and how to close the socket.
enum End {
    /// Send a close frame with this code and reason.
    Close(u16, &'static str),
    /// The peer closed or vanished; nothing to send.
    Gone,
}

async fn run(state: AppState, mut socket: WebSocket, pre_auth: Option<Caller>) {
    let conn_id = state.registry.next_conn_id();
    // Boxed so the handshake's state does not stay in this long-lived future.
    let authed = match pre_auth {
        Some(caller) => Ok((caller, None)),
        None => Box::pin(await_hello(&state, &mut socket)).await,
    };
    let (mut caller, hello_id) = match authed {
        Ok(authed) => authed,
        Err(end) => return finish(&mut socket, end).await,
    };
    caller.conn = Some(conn_id);

    let (queue_tx, queue_rx) = mpsc::channel(state.config.send_queue);
    // Registered before `welcome`: anything committed after the client sees `welcome` reaches
    // it live, and anything before is in its sync.
    state.registry.add(
        caller.user_id,
        conn_id,
        caller.device_id,
        Sink::Socket(queue_tx),
    );
    state.metrics.connections_open.increment(1.0);
    state.chat.connection_opened(&caller).await;

    let welcome = ServerFrame::Welcome {
        id: hello_id,
        protocol: PROTOCOL_VERSION,
        user_id: caller.user_id,
        username: caller.username.clone(),
        device_id: caller.device_id,
        heartbeat_timeout_ms: u64::try_from(state.config.heartbeat_timeout.as_millis())
            .unwrap_or(u64::MAX),
        max_body_bytes: state.chat.config().max_body_bytes,
        max_frame_bytes: state.config.max_frame_bytes,
    };
    let end = match send_frame(&state, &mut socket, &welcome).await {
        Ok(()) => serve(&state, &caller, &mut socket, queue_rx).await,
        Err(()) => End::Gone,
    };

    state.registry.remove(caller.user_id, conn_id);
    state.metrics.connections_open.decrement(1.0);
    state.chat.connection_closed(&caller).await;
    finish(&mut socket, end).await;
}

/// Waits for the `hello` frame of a socket opened without a token header.
async fn await_hello(
    state: &AppState,
    socket: &mut WebSocket,
) -> Result<(Caller, Option<ReqId>), End> {
    let deadline = Instant::now() + state.config.heartbeat_timeout;
    let text = loop {
        match tokio::time::timeout_at(deadline, socket.recv()).await {
            Err(_) => return Err(End::Close(close::HEARTBEAT_TIMEOUT, "no hello received")),
            Ok(None | Some(Ok(Message::Close(_)))) => return Err(End::Gone),
            Ok(Some(Err(error))) => return Err(read_error(error)),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
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
            let frame = error_frame(Some(id), &error);
            let _ = send_frame(state, socket, &frame).await;
            Err(match error.code() {
                ErrorCode::Unauthorized => End::Close(close::UNAUTHORIZED, "invalid token"),
                _ => End::Close(close::TRY_AGAIN_LATER, "authentication unavailable"),
            })
        }
    }
}

type Answer<'a> = Pin<Box<dyn Future<Output = ServerFrame> + Send + 'a>>;

/// The session loop. One request is handled at a time, in order (so a client's sends keep
/// their order); while it runs, events keep flowing out and reading pauses (backpressure).
async fn serve(
    state: &AppState,
    caller: &Caller,
    socket: &mut WebSocket,
    mut queue_rx: mpsc::Receiver<Outbound>,
) -> End {
    let quota =
        Quota::per_second(NonZeroU32::new(state.config.rate_per_second.max(1)).expect("nonzero"))
            .allow_burst(NonZeroU32::new(state.config.rate_burst.max(1)).expect("nonzero"));
    let limiter: DefaultDirectRateLimiter = RateLimiter::direct(quota);
    let heartbeat = state.config.heartbeat_timeout;
    let mut deadline = Instant::now() + heartbeat;
    let mut pending: Option<Answer<'_>> = None;

    loop {
        // Unbiased: a steady stream of events must not starve answers or reads.
        tokio::select! {
            () = state.cancel.cancelled() => return End::Close(close::GOING_AWAY, "server shutting down"),
            outbound = queue_rx.next() => match outbound {
                Some(Outbound::Frame(text)) => {
                    if let Err(end) = write_batch(state, socket, text, &mut queue_rx).await {
                        return end;
                    }
                }
                Some(Outbound::Close(code, reason)) => return End::Close(code, reason),
                None => return End::Close(close::TRY_AGAIN_LATER, "too far behind; reconnect and sync"),
            },
            answer = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                pending = None;
                if send_frame(state, socket, &answer).await.is_err() {
                    return End::Gone;
                }
            }
            incoming = socket.recv(), if pending.is_none() => {
                let text = match incoming {
                    None => return End::Gone,
                    Some(Err(error)) => return read_error(error),
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Binary(_))) => {
                        return End::Close(close::UNSUPPORTED_DATA, "frames are JSON text");
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                        deadline = Instant::now() + heartbeat;
                        continue;
                    }
                    Some(Ok(Message::Close(_))) => return End::Gone,
                };
                deadline = Instant::now() + heartbeat;
                state.metrics.frames_in.increment(1);
                // Every frame counts against the limit, well-formed or not.
                let limited = limiter.check().is_err();
                let answer = match ClientFrame::parse(&text) {
                    Ok(frame) if limited => error_frame(Some(frame.id().clone()), &ChatError::RateLimited),
                    Ok(frame) => {
                        pending = Some(Box::pin(state.chat.handle(caller, frame)));
                        continue;
                    }
                    Err(FrameError::NotJson) => {
                        return End::Close(close::INVALID_PAYLOAD, "frame is not a JSON object");
                    }
                    Err(FrameError::Invalid { id, .. }) if limited => error_frame(id, &ChatError::RateLimited),
                    Err(FrameError::Invalid { id, code, message }) => ServerFrame::Error { id, code, message },
                };
                if send_frame(state, socket, &answer).await.is_err() {
                    return End::Gone;
                }
            }
            () = sleep_until(deadline) => return End::Close(close::HEARTBEAT_TIMEOUT, "no frame within the heartbeat timeout"),
        }
    }
}

/// Writes one queued event and whatever else is already queued, then flushes once.
async fn write_batch(
    state: &AppState,
    socket: &mut WebSocket,
    first: Utf8Bytes,
    queue_rx: &mut mpsc::Receiver<Outbound>,
) -> Result<(), End> {
    socket
        .feed(Message::Text(first))
        .await
        .map_err(|_| End::Gone)?;
    let mut written: u64 = 1;
    let mut close_after = None;
    while written < MAX_COALESCE {
        match queue_rx.try_recv() {
            Ok(Outbound::Frame(text)) => {
                socket
                    .feed(Message::Text(text))
                    .await
                    .map_err(|_| End::Gone)?;
                written += 1;
            }
            Ok(Outbound::Close(code, reason)) => {
                close_after = Some(End::Close(code, reason));
                break;
            }
            // Empty, or closed after a slow-consumer overflow (the next read says so).
            Err(_) => break,
        }
    }
    socket.flush().await.map_err(|_| End::Gone)?;
    state.metrics.frames_out.increment(written);
    close_after.map_or(Ok(()), Err)
}

fn read_error(error: axum::Error) -> End {
    match error.into_inner().downcast::<tungstenite::Error>() {
        Ok(error) if matches!(*error, tungstenite::Error::Capacity(_)) => {
            End::Close(close::MESSAGE_TOO_BIG, "frame over the size limit")
        }
        Ok(error) if matches!(*error, tungstenite::Error::Utf8(_)) => {
            End::Close(close::INVALID_PAYLOAD, "text frame is not UTF-8")
        }
        Ok(error) if matches!(*error, tungstenite::Error::Protocol(_)) => {
            End::Close(close::POLICY_VIOLATION, "websocket protocol error")
        }
        _ => End::Gone,
    }
}

fn error_frame(id: Option<ReqId>, error: &ChatError) -> ServerFrame {
    ServerFrame::Error {
        id,
        code: error.code(),
        message: error.client_message(),
    }
}

async fn send_frame(
    state: &AppState,
    socket: &mut WebSocket,
    frame: &ServerFrame,
) -> Result<(), ()> {
    let text =
        serde_json::to_string(frame).map_err(|error| tracing::error!(%error, "encode frame"))?;
    socket
        .send(Message::Text(text.into()))
        .await
        .map_err(|_| ())?;
    state.metrics.frames_out.increment(1);
    Ok(())
}

async fn finish(socket: &mut WebSocket, end: End) {
    if let End::Close(code, reason) = end {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = socket.send(Message::Close(Some(frame))).await;
        // Give the peer a moment to answer the close, as RFC 6455 asks; never wait long.
        let _ = timeout(std::time::Duration::from_secs(2), async {
            while let Some(Ok(message)) = socket.recv().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

//! Long-poll: the same events as the socket, over plain HTTP, resumed from a cursor.
//!
//! A device's first poll opens a session: a connection in the registry whose events are
//! numbered and buffered until the next poll acknowledges them by cursor. The answer to
//! that first poll (and to any poll whose cursor the server cannot honour: restart,
//! expiry, overflow) has `reset: true`, and the client syncs before trusting the stream.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use pigeon_bus::ConnId;
use pigeon_core::Caller;
use pigeon_proto::{DeviceId, ErrorCode};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tungstenite::Utf8Bytes;

use crate::AppState;
use crate::http::{ApiError, authenticate};
use crate::registry::Sink;

/// Most events returned by one poll.
const MAX_EVENTS_PER_POLL: usize = 500;

/// Open long-poll sessions, one per device.
#[derive(Default)]
pub(crate) struct PollSessions {
    by_device: DashMap<DeviceId, Arc<PollSession>>,
}

impl PollSessions {
    /// The connection id of a device's session, if it has one.
    pub(crate) fn conn_of(&self, device_id: DeviceId) -> Option<ConnId> {
        self.by_device.get(&device_id).map(|session| session.conn)
    }
}

/// One device's event stream between polls.
pub(crate) struct PollSession {
    /// Names the stream in cursors, so a cursor from another stream is never misread.
    stream: u64,
    conn: ConnId,
    caller: Caller,
    state: Mutex<PollState>,
    /// Number of the newest event, for waiting polls.
    newest_tx: watch::Sender<u64>,
}

struct PollState {
    /// Unacknowledged events, numbered from 1.
    events: VecDeque<(u64, Utf8Bytes)>,
    newest: u64,
    capacity: usize,
    /// Events were dropped for lack of room: the stream is broken, the next poll resets.
    overflowed: bool,
    revoked: bool,
    polls_in_flight: u32,
    last_poll: Instant,
}

impl PollSession {
    fn lock(&self) -> MutexGuard<'_, PollState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Buffers an event (called by the registry on delivery).
    pub(crate) fn push(&self, text: Utf8Bytes) {
        let mut state = self.lock();
        if state.overflowed || state.revoked {
            return;
        }
        if state.events.len() >= state.capacity {
            state.overflowed = true;
            state.events = VecDeque::new();
        } else {
            state.newest += 1;
            let number = state.newest;
            state.events.push_back((number, text));
        }
        let newest = state.newest;
        drop(state);
        self.newest_tx.send_replace(newest);
    }

    /// Marks the stream broken: the next poll answers `reset`, and the client syncs.
    pub(crate) fn lose(&self) {
        let mut state = self.lock();
        state.overflowed = true;
        state.events = VecDeque::new();
        drop(state);
        self.newest_tx.send_modify(|_| {});
    }

    /// Ends the session: its device was revoked.
    pub(crate) fn revoke(&self) {
        self.lock().revoked = true;
        self.newest_tx.send_modify(|_| {});
    }

    fn cursor(&self, number: u64) -> String {
        format!("{:x}-{number}", self.stream)
    }
}

#[derive(Deserialize)]
pub(crate) struct PollQuery {
    #[serde(default)]
    cursor: Option<String>,
    /// Seconds to wait for events; 0 answers at once (short poll).
    #[serde(default)]
    wait: Option<u64>,
}

/// `GET /v1/events?cursor=…&wait=…` → {cursor, reset, events}
pub(crate) async fn poll(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<PollQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::new(ErrorCode::InvalidField, e.body_text()))?;
    let caller = authenticate(&state, &headers).await?;
    let wait = Duration::from_secs(query.wait.unwrap_or(30)).min(state.config.poll_max_wait);

    let current = state
        .polls
        .by_device
        .get(&caller.device_id)
        .map(|s| s.clone());
    let resumable = match (&current, query.cursor.as_deref().and_then(parse_cursor)) {
        (Some(session), Some((stream, acked))) if session.stream == stream => {
            let session_state = session.lock();
            (!session_state.overflowed && !session_state.revoked && acked <= session_state.newest)
                .then_some(acked)
        }
        _ => None,
    };
    let Some(acked) = resumable else {
        let session = open_session(&state, caller).await;
        return Ok(respond(&session.cursor(0), true, &[]));
    };
    let session = current.expect("resumable implies a session");

    let mut newest_rx = session.newest_tx.subscribe();
    {
        let mut session_state = session.lock();
        session_state.polls_in_flight += 1;
        while session_state
            .events
            .front()
            .is_some_and(|(number, _)| *number <= acked)
        {
            session_state.events.pop_front();
        }
    }
    let deadline = Instant::now() + wait;
    loop {
        {
            let session_state = session.lock();
            if !session_state.events.is_empty() || session_state.overflowed || session_state.revoked
            {
                break;
            }
        }
        tokio::select! {
            changed = newest_rx.changed() => if changed.is_err() { break },
            () = tokio::time::sleep_until(deadline) => break,
            () = state.cancel.cancelled() => break,
        }
    }

    // The answer is built under the lock; nothing is awaited while holding it.
    let answer = {
        let mut session_state = session.lock();
        session_state.polls_in_flight -= 1;
        session_state.last_poll = Instant::now();
        if session_state.revoked {
            return Err(ApiError::new(ErrorCode::Unauthorized, "device revoked"));
        }
        (!session_state.overflowed).then(|| {
            let page = session_state.events.iter().take(MAX_EVENTS_PER_POLL);
            let last = page.clone().last().map_or(acked, |(number, _)| *number);
            let events: Vec<&Utf8Bytes> = page.map(|(_, text)| text).collect();
            respond(&session.cursor(last), false, &events)
        })
    };
    match answer {
        Some(answer) => Ok(answer),
        None => {
            // Events were lost from this stream: start a new one; the client syncs.
            let fresh = open_session(&state, session.caller.clone()).await;
            Ok(respond(&fresh.cursor(0), true, &[]))
        }
    }
}

/// Opens a new stream for the caller's device, replacing any previous one.
///
/// Whoever takes a session out of `by_device` retires it, so each session is retired
/// exactly once even when polls of one device race each other or the sweeper.
async fn open_session(state: &AppState, mut caller: Caller) -> Arc<PollSession> {
    let conn = state.registry.next_conn_id();
    caller.conn = Some(conn);
    let mut stream = [0u8; 8];
    let _ = getrandom::fill(&mut stream);
    let session = Arc::new(PollSession {
        stream: u64::from_le_bytes(stream),
        conn,
        state: Mutex::new(PollState {
            events: VecDeque::new(),
            newest: 0,
            capacity: state.config.poll_buffer,
            overflowed: false,
            revoked: false,
            polls_in_flight: 0,
            last_poll: Instant::now(),
        }),
        newest_tx: watch::Sender::new(0),
        caller: caller.clone(),
    });
    state.registry.add(
        caller.user_id,
        conn,
        caller.device_id,
        Sink::Poll(session.clone()),
    );
    state.metrics.connections_open.increment(1.0);
    state.chat.connection_opened(&caller).await;
    if let Some(previous) = state
        .polls
        .by_device
        .insert(caller.device_id, session.clone())
    {
        retire(state, &previous).await;
    }
    session
}

/// Closes a session if it is still the device's current one.
async fn close_session(state: &AppState, session: &Arc<PollSession>) {
    let device_id = session.caller.device_id;
    if state
        .polls
        .by_device
        .remove_if(&device_id, |_, current| Arc::ptr_eq(current, session))
        .is_some()
    {
        retire(state, session).await;
    }
}

/// Takes a session, already out of `by_device`, out of the registry and presence.
async fn retire(state: &AppState, session: &Arc<PollSession>) {
    let caller = &session.caller;
    state.registry.remove(caller.user_id, session.conn);
    state.metrics.connections_open.decrement(1.0);
    state.chat.connection_closed(caller).await;
}

/// Closes sessions not polled within the heartbeat timeout (and revoked ones).
pub(crate) async fn expire_idle(state: &AppState) {
    let timeout = state.config.heartbeat_timeout;
    let expired: Vec<Arc<PollSession>> = state
        .polls
        .by_device
        .iter()
        .filter(|entry| {
            let session_state = entry.lock();
            session_state.revoked
                || (session_state.polls_in_flight == 0
                    && session_state.last_poll.elapsed() > timeout)
        })
        .map(|entry| entry.value().clone())
        .collect();
    // Each retirement waits on the store and the bus: one task each, so a slow database
    // does not hold up the sweep (and with it the sockets' heartbeat timeouts).
    for session in expired {
        let state_for_task = state.clone();
        state
            .tasks
            .spawn(async move { close_session(&state_for_task, &session).await });
    }
}

/// Closes every session (shutdown).
pub(crate) async fn close_all(state: &AppState) {
    let all: Vec<Arc<PollSession>> = state
        .polls
        .by_device
        .iter()
        .map(|entry| entry.value().clone())
        .collect();
    for session in all {
        close_session(state, &session).await;
    }
}

fn parse_cursor(cursor: &str) -> Option<(u64, u64)> {
    let (stream, number) = cursor.split_once('-')?;
    Some((u64::from_str_radix(stream, 16).ok()?, number.parse().ok()?))
}

/// Writes the answer by hand: the events are already-encoded frames, embedded as they are.
fn respond(cursor: &str, reset: bool, events: &[&Utf8Bytes]) -> Response {
    let mut body = String::with_capacity(64 + events.iter().map(|e| e.len() + 1).sum::<usize>());
    body.push_str("{\"cursor\":\"");
    body.push_str(cursor);
    body.push_str("\",\"reset\":");
    body.push_str(if reset { "true" } else { "false" });
    body.push_str(",\"events\":[");
    for (index, event) in events.iter().enumerate() {
        if index > 0 {
            body.push(',');
        }
        body.push_str(event.as_str());
    }
    body.push_str("]}");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        assert_eq!(parse_cursor("ff-12"), Some((255, 12)));
        assert_eq!(parse_cursor("zz-1"), None);
        assert_eq!(parse_cursor("12"), None);
    }
}

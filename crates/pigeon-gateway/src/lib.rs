//! The connection service: the HTTP API, the WebSocket gateway and the long-poll endpoint.
//!
//! It knows connections, not storage: requests go to [`ChatService`],
//! and the bus hands events back through the [`Registry`] of this node's connections.

mod http;
mod longpoll;
mod mailbox;
mod metrics;
mod registry;
mod serve;
mod socket;
mod web;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{delete, get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use pigeon_core::ChatService;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use registry::Registry;
pub use serve::serve;

/// Limits and timings of the gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// A connection silent for this long is closed (long-poll: not polled for this long).
    pub heartbeat_timeout: Duration,
    /// Largest WebSocket frame (and HTTP request body) accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Events queued per connection before it counts as too slow and is closed.
    pub send_queue: usize,
    /// Requests per second allowed per connection (or per device over HTTP).
    pub rate_per_second: u32,
    /// Requests allowed in a burst above the rate.
    pub rate_burst: u32,
    /// Register and login attempts per second per client address.
    pub auth_rate_per_second: u32,
    /// Longest a long-poll request waits for events.
    pub poll_max_wait: Duration,
    /// Events kept per long-poll session between polls; past it the session is reset.
    pub poll_buffer: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(60),
            max_frame_bytes: 64 * 1024,
            send_queue: 256,
            rate_per_second: 100,
            rate_burst: 200,
            auth_rate_per_second: 10,
            poll_max_wait: Duration::from_secs(30),
            poll_buffer: 1024,
        }
    }
}

/// State shared by every handler: one pointer, because every WebSocket session keeps it
/// for its whole life (an idle connection's memory is counted in bytes; this was 80).
#[derive(Clone)]
pub(crate) struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] points to.
pub(crate) struct Shared {
    pub(crate) chat: Arc<ChatService>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) polls: Arc<longpoll::PollSessions>,
    pub(crate) config: Arc<GatewayConfig>,
    pub(crate) metrics: Arc<metrics::Metrics>,
    pub(crate) limits: Arc<http::Limits>,
    pub(crate) prometheus: Option<PrometheusHandle>,
    /// Cancelled when the server shuts down: every session closes with `going away`.
    pub(crate) cancel: CancellationToken,
    /// Tracks session tasks so shutdown can wait for their last writes.
    pub(crate) tasks: TaskTracker,
}

/// One task for every connection's timers: sockets and long-poll sessions silent for the
/// heartbeat timeout are closed, and at shutdown every socket is told to close. Sessions
/// hold no timer or shutdown future of their own, so a wakeup of an idle socket touches
/// no shared lock and an idle socket holds no timer.
async fn sweep(state: AppState) {
    let timeout = state.config.heartbeat_timeout;
    let period = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = state.cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        state.registry.close_silent(timeout);
        longpoll::expire_idle(&state).await;
    }
    state
        .registry
        .close_sockets(pigeon_proto::close::GOING_AWAY, "server shutting down");
    longpoll::close_all(&state).await;
}

/// Builds the router. `registry` must be the sink the bus delivers to.
pub fn router(
    chat: Arc<ChatService>,
    registry: Arc<Registry>,
    config: GatewayConfig,
    prometheus: Option<PrometheusHandle>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) -> Router {
    let state = AppState(Arc::new(Shared {
        limits: Arc::new(http::Limits::new(&config)),
        polls: Arc::new(longpoll::PollSessions::default()),
        config: Arc::new(config),
        metrics: Arc::new(metrics::Metrics::new()),
        chat,
        registry,
        prometheus,
        cancel,
        tasks,
    }));
    state.tasks.spawn(sweep(state.clone()));
    let max_body = state.config.max_frame_bytes;
    Router::new()
        .route("/", get(web::index))
        .route("/web/{name}", get(web::file))
        .route("/ws", get(socket::upgrade))
        .route("/v1/register", post(http::register))
        .route("/v1/login", post(http::login))
        .route("/v1/logout", post(http::logout))
        .route("/v1/me", get(http::me))
        .route("/v1/devices", get(http::list_devices))
        .route("/v1/devices/{device_id}", delete(http::revoke_device))
        .route("/v1/rpc", post(http::rpc))
        .route("/v1/events", get(longpoll::poll))
        .route("/healthz", get(http::healthz))
        .route("/metrics", get(http::metrics))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state)
}

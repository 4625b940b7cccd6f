//! The server: builds the store, bus, chat service and gateway from a [`ServerConfig`] and
//! runs them until shutdown. The only crate that names concrete backends.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use pigeon_bus::{Bus, LocalBus, NatsBus};
use pigeon_core::{ChatConfig, ChatService};
use pigeon_gateway::{GatewayConfig, Registry};
use pigeon_store::{PostgresConfig, PostgresStore, SqliteConfig, SqliteStore, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything `pigeon serve` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Folder holding the SQLite database (unused with `database`).
    pub data_dir: PathBuf,
    /// A PostgreSQL URL: store everything there instead of SQLite (cluster mode).
    pub database: Option<String>,
    /// A NATS URL: route events between nodes over NATS instead of in-process.
    pub bus: Option<String>,
    /// Chat limits.
    pub chat: ChatConfig,
    /// Gateway limits and timings.
    pub gateway: GatewayConfig,
}

/// How long shutdown waits for sessions to close before giving up on them.
const SESSION_DRAIN: Duration = Duration::from_secs(10);

/// Runs the server until `shutdown` resolves, then closes sessions with `going away`,
/// lets in-flight commits finish and closes the store.
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let prometheus = install_metrics();
    // Each connection is a file: take every descriptor the hard limit allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(
            limit,
            "open files limit; about {} connections fit",
            limit.saturating_sub(64)
        ),
        Err(error) => tracing::warn!(%error, "could not raise the open files limit"),
    }
    match (&config.database, &config.bus) {
        (None, Some(_)) => anyhow::bail!(
            "--bus needs --database: nodes sharing a bus must share one PostgreSQL database"
        ),
        (Some(_), None) => tracing::warn!(
            "PostgreSQL without --bus: this node cannot run beside others; add --bus nats://… for a cluster"
        ),
        _ => {}
    }
    let store: Arc<dyn Store> = match &config.database {
        Some(url) => {
            let store = PostgresStore::connect(&PostgresConfig::new(url.clone()))
                .await
                .context("connecting to PostgreSQL")?;
            tracing::info!("storing data in PostgreSQL");
            Arc::new(store)
        }
        None => {
            let store =
                SqliteStore::open(&SqliteConfig::in_dir(&config.data_dir)).with_context(|| {
                    format!("opening the database in {}", config.data_dir.display())
                })?;
            tracing::info!(data_dir = %config.data_dir.display(), "storing data in {}", config.data_dir.join("pigeon.db").display());
            Arc::new(store)
        }
    };
    let registry = Arc::new(Registry::new());
    let bus: Arc<dyn Bus> = match &config.bus {
        Some(url) => {
            let bus = NatsBus::connect(url, registry.clone())
                .await
                .with_context(|| format!("connecting to NATS at {url}"))?;
            tracing::info!("routing events over NATS");
            bus
        }
        None => Arc::new(LocalBus::new(registry.clone())),
    };
    let chat = ChatService::new(store, bus, config.chat.clone());

    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let app = pigeon_gateway::router(
        chat.clone(),
        registry,
        config.gateway.clone(),
        prometheus,
        cancel.clone(),
        tasks.clone(),
    );
    let listener = listen(config.listen).with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!("pigeon listening on http://{addr}");

    let stop = cancel.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: closing sessions, finishing commits");
        stop.cancel();
    });
    pigeon_gateway::serve(listener, app, cancel.clone()).await;

    tasks.close();
    if tokio::time::timeout(SESSION_DRAIN, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some sessions did not close in time");
    }
    chat.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Installs the Prometheus recorder once per process (metrics are process-wide).
fn install_metrics() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ];
            let batch = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("pigeon_store_commit_seconds".into()),
                    &latency,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("pigeon_store_checkpoint_seconds".into()),
                        &latency,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("pigeon_store_batch_size".into()),
                        &batch,
                    )
                });
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => Some(handle),
                Err(error) => {
                    tracing::warn!(%error, "metrics disabled");
                    None
                }
            }
        })
        .clone()
}

/// Pending connections the kernel may hold for `accept`. `TcpListener::bind` asks for 128,
/// and a burst of connects overflowed it: dropped SYNs are retried a second later, which
/// halved the connect rate (`TcpExtListenOverflows`). The kernel caps it at `somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the listening socket with a backlog fit for bursts of connects.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does on Unix: a restart can bind while old connections linger
    // in TIME_WAIT. (On Windows it would let another process share the port.)
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

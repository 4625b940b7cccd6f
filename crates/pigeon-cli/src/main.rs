//! `pigeon`: one binary for the server and the tools around it.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pigeon_core::ChatConfig;
use pigeon_gateway::GatewayConfig;
use pigeon_server::ServerConfig;

mod bench;
mod chat;
mod commands;
mod config_file;

/// jemalloc keeps its size classes apart, so the short-lived buffers of each HTTP handshake
/// do not leave holes between long-lived connection state (measured in docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "pigeon",
    version,
    about = "Pigeon: an instant-messaging server that never loses a message"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the server: SQLite in the data folder, nothing else to install.
    Serve(ServeArgs),
    /// Drives a running server with load and reports throughput, latency, CPU and memory.
    Bench(bench::BenchArgs),
    #[command(flatten)]
    User(commands::UserCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// A TOML file of settings, keyed by these flags' long names (`database = "postgres://…"`).
    /// The command line and the environment win over it.
    #[arg(long, env = "PIGEON_CONFIG_FILE")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "PIGEON_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Folder for the database.
    #[arg(long, env = "PIGEON_DATA_DIR", default_value = "./pigeon-data")]
    data_dir: PathBuf,
    /// PostgreSQL instead of SQLite, for a cluster: `postgres://user@host:5432/db`.
    #[arg(long, env = "PIGEON_DATABASE")]
    database: Option<String>,
    /// NATS instead of the in-process bus, for a cluster: `nats://host:4222`.
    #[arg(long, env = "PIGEON_BUS")]
    bus: Option<String>,
    /// Seconds of silence after which a connection is closed (fractions allowed).
    #[arg(long, env = "PIGEON_HEARTBEAT_TIMEOUT", default_value_t = 60.0, value_parser = positive_seconds)]
    heartbeat_timeout: f64,
    /// Largest message body, in bytes.
    #[arg(long, env = "PIGEON_MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    max_body_bytes: usize,
    /// Largest WebSocket frame or HTTP request body, in bytes.
    #[arg(long, env = "PIGEON_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    max_frame_bytes: usize,
    /// Requests per second allowed per connection.
    #[arg(long, env = "PIGEON_RATE_LIMIT", default_value_t = 100)]
    rate_limit: u32,
    /// Requests allowed in a burst above the rate.
    #[arg(long, env = "PIGEON_RATE_BURST", default_value_t = 200)]
    rate_burst: u32,
    /// Events queued for one socket before it counts as too slow: it is closed with 1013,
    /// and its client reconnects and syncs (nothing is dropped silently).
    #[arg(long, env = "PIGEON_SEND_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    send_queue: u32,
    /// Register and login attempts per second per client address.
    #[arg(long, env = "PIGEON_AUTH_RATE_LIMIT", default_value_t = 10)]
    auth_rate_limit: u32,
    /// Most members in a group.
    #[arg(long, env = "PIGEON_MAX_GROUP_MEMBERS", default_value_t = 10_000)]
    max_group_members: u32,
    /// Most groups a user may belong to.
    #[arg(long, env = "PIGEON_MAX_GROUPS_PER_USER", default_value_t = 500)]
    max_groups_per_user: u32,
    /// Argon2id memory cost for new password hashes, in KiB (OWASP's minimum is 19,456).
    #[arg(long, env = "PIGEON_ARGON2_MEMORY_KIB", default_value_t = 19 * 1024)]
    argon2_memory_kib: u32,
    /// Argon2id iterations for new password hashes.
    #[arg(long, env = "PIGEON_ARGON2_ITERATIONS", default_value_t = 2)]
    argon2_iterations: u32,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds.is_finite() => Ok(seconds),
        _ => Err("expected a positive number of seconds".into()),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_from(config_file::expand::<Cli>(std::env::args_os().collect())?);
    let serving = matches!(cli.command, Command::Serve(_));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| if serving { "info" } else { "warn" }.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bench(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            if let Err(error) = runtime.block_on(bench::run(args, &mut std::io::stdout().lock())) {
                eprintln!("pigeon bench: {error:#}");
                #[allow(clippy::exit)]
                std::process::exit(1);
            }
            Ok(())
        }
        Command::User(command) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let result = runtime.block_on(commands::run(command, &mut std::io::stdout().lock()));
            if let Err(error) = result {
                // One clear line, and an exit code a script can branch on.
                eprintln!("pigeon: {error:#}");
                #[allow(clippy::exit)]
                std::process::exit(commands::exit_code(&error));
            }
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.config {
        // Its settings were merged into the flags by `config_file::expand`.
        tracing::info!(path = %path.display(), "settings read from the config file");
    }
    let config = ServerConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        database: args.database.filter(|url| !url.is_empty()),
        bus: args.bus.filter(|url| !url.is_empty()),
        chat: ChatConfig {
            max_body_bytes: args.max_body_bytes,
            max_group_members: args.max_group_members,
            max_groups_per_user: args.max_groups_per_user,
            argon2_memory_kib: args.argon2_memory_kib,
            argon2_iterations: args.argon2_iterations,
            presence_ttl: Duration::from_secs_f64(args.heartbeat_timeout),
            ..ChatConfig::default()
        },
        gateway: GatewayConfig {
            heartbeat_timeout: Duration::from_secs_f64(args.heartbeat_timeout),
            max_frame_bytes: args.max_frame_bytes,
            rate_per_second: args.rate_limit,
            rate_burst: args.rate_burst,
            auth_rate_per_second: args.auth_rate_limit,
            send_queue: args.send_queue as usize,
            ..GatewayConfig::default()
        },
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(pigeon_server::run(config, shutdown_signal()))
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

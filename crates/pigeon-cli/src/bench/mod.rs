//! `pigeon bench`: the load generator. Every scenario drives a running server over
//! loopback, is bounded by `--duration` and a count, and prints a summary or, with
//! `--json`, one JSON object.

mod common;
mod connections;
mod direct;
mod group;
mod listeners;
mod sync;

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::str::FromStr;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

/// Which load to generate.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum Scenario {
    /// Open and hold N authenticated sockets.
    Connections,
    /// Pairs of users exchanging 1:1 messages at a rate.
    Direct,
    /// One group, all members connected, some sending.
    Group,
    /// A user reconnecting to a backlog over many threads.
    Sync,
}

/// A message rate: a number per second, or `max`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rate {
    PerSecond(f64),
    Max,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "max" {
            return Ok(Self::Max);
        }
        match text.parse::<f64>() {
            Ok(rate) if rate > 0.0 => Ok(Self::PerSecond(rate)),
            _ => Err("a positive number of messages per second, or max".into()),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PerSecond(rate) => write!(f, "{rate}"),
            Self::Max => f.write_str("max"),
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// The scenario.
    #[arg(value_enum)]
    scenario: Scenario,
    /// The server (loopback only).
    #[arg(long, env = "PIGEON_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// The server's process id, to read its CPU time and memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
    /// Seconds to run (sending, or holding connections).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// `direct`: users (in pairs).
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// `direct` and `group`: total messages per second, or `max`.
    #[arg(long, default_value = "1000")]
    rate: Rate,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    body: usize,
    /// `connections`: how many sockets.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// `connections`: sockets being opened at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// `group`: members, all connected.
    #[arg(long, default_value_t = 100)]
    members: usize,
    /// `group`: how many members send.
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// `group`: threads that read the listening members' sockets (default: one per core).
    /// One message at a time is read fastest by one; a sustained load needs one per core.
    #[arg(long)]
    listeners: Option<usize>,
    /// `group`: niceness (0 to 19) of the threads that read the listening members' sockets.
    /// At 19 the bench leaves the cores to the server while it fans out, as members on
    /// devices of their own would; arrival times come from the kernel either way.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    listeners_nice: i32,
    /// `sync`: messages waiting.
    #[arg(long, default_value_t = 10_000)]
    backlog: usize,
    /// `sync`: threads they are spread over.
    #[arg(long, default_value_t = 100)]
    threads: usize,
    /// `connections`: processes to spread sockets over (each process may hold < 20,000 files).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Loopback source addresses to spread sockets over (127.0.0.2, .3, …; ~28K ports each).
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// Internal: this process is worker K of a `--workers` run.
    #[arg(long, hide = true)]
    worker: Option<usize>,
}

impl BenchArgs {
    /// The loopback address the `index`th socket connects from.
    fn source_address(&self, index: usize) -> Option<IpAddr> {
        let base = self.worker.unwrap_or(0) * usize::from(self.sources.max(1));
        if self.sources <= 1 && self.worker.is_none() {
            return None;
        }
        let host = 2 + (base + index % usize::from(self.sources.max(1))) % 250;
        Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host as u8)))
    }
}

pub(crate) async fn run(args: BenchArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let server = args.server.trim_end_matches('/').to_owned();
    // Checked before any request: registering users is traffic too.
    common::loopback_server(&server).await?;
    if let Ok(limit) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::debug!(limit, "bench open files limit");
    }
    let result = match (args.scenario, args.workers) {
        (Scenario::Connections, workers) if workers > 1 && args.worker.is_none() => {
            spread(&args, &server).await?
        }
        (Scenario::Connections, _) => connections::run(&server, &args).await?,
        (Scenario::Direct, _) => direct::run(&server, &args).await?,
        (Scenario::Group, _) => group::run(&server, &args).await?,
        (Scenario::Sync, _) => sync::run(&server, &args).await?,
    };
    if args.json {
        writeln!(out, "{result}")?;
    } else {
        summary(&result, "", out)?;
    }
    Ok(())
}

/// Runs `connections` in several processes and adds their results up. Each worker reads
/// the server's memory once its own sockets are open; the largest reading (taken after the
/// most sockets were open) is the one used, so with staggered workers it can be low.
async fn spread(args: &BenchArgs, server: &str) -> anyhow::Result<Value> {
    let per_worker = args.connections.div_ceil(args.workers);
    let rss_before = args.server_pid.and_then(common::rss_bytes);
    let mut children = Vec::new();
    for worker in 0..args.workers {
        let child = Command::new(std::env::current_exe()?)
            .args(["bench", "connections", "--json", "--server", server])
            .args([
                "--connections",
                &per_worker.to_string(),
                "--duration",
                &args.duration.to_string(),
            ])
            .args([
                "--concurrency",
                &args.concurrency.to_string(),
                "--sources",
                &args.sources.to_string(),
            ])
            .args(["--worker", &worker.to_string()])
            .args(
                args.server_pid
                    .map(|pid| vec!["--server-pid".to_owned(), pid.to_string()])
                    .unwrap_or_default(),
            )
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a bench worker")?;
        children.push(child);
    }
    let results = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|mut child| {
                let stdout = child.stdout.take().expect("piped");
                let line = BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .last()
                    .unwrap_or_default();
                let _ = child.wait();
                serde_json::from_str::<Value>(&line).unwrap_or(Value::Null)
            })
            .collect::<Vec<_>>()
    })
    .await?;
    if results.iter().any(Value::is_null) {
        bail!("a bench worker failed");
    }
    let sum = |key: &str| {
        results
            .iter()
            .map(|r| r[key].as_f64().unwrap_or(0.0))
            .sum::<f64>()
    };
    let open = sum("open");
    let rss_peak = results
        .iter()
        .filter_map(|r| r["server_rss_bytes"].as_u64())
        .max();
    Ok(json!({
        "scenario": "connections",
        "workers": args.workers,
        "connections": args.connections,
        "open": open,
        "failed": sum("failed"),
        "dropped_while_held": sum("dropped_while_held"),
        "held_s": args.duration,
        "connects_per_s": sum("connects_per_s"),
        "server_rss_bytes_per_conn": match (rss_before, rss_peak) {
            (Some(before), Some(after)) if open > 0.0 => Some(((after.saturating_sub(before)) as f64 / open).round()),
            _ => None,
        },
    }))
}

/// Prints a result as indented `key: value` lines.
fn summary(value: &Value, indent: &str, out: &mut impl Write) -> std::io::Result<()> {
    if let Value::Object(map) = value {
        for (key, value) in map {
            match value {
                Value::Object(_) => {
                    writeln!(out, "{indent}{key}:")?;
                    summary(value, &format!("{indent}  "), out)?;
                }
                other => writeln!(out, "{indent}{key}: {other}")?,
            }
        }
    }
    Ok(())
}

//! `connections`: opens N authenticated sockets and holds them, heartbeating, for the
//! duration; reports the connect rate and the server's memory per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::BenchArgs;
use super::common;

/// Sockets share the users' tokens: a token may hold many connections.
const USERS: usize = 50;
/// Heartbeat period (the server's default timeout is 60 s).
const PING_EVERY: Duration = Duration::from_secs(20);

pub(crate) async fn run(server: &str, args: &BenchArgs) -> anyhow::Result<Value> {
    let count = args.connections.max(1);
    let sessions = common::users(server, &common::run_prefix("conn"), USERS.min(count)).await?;
    let rss_before = args.server_pid.and_then(common::rss_bytes);
    let cpu_before = args.server_pid.and_then(common::cpu_time);
    let failed = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let sockets: Vec<common::Socket> = futures::stream::iter(0..count)
        .map(|index| {
            let token = sessions[index % sessions.len()].token.clone();
            let source = args.source_address(index);
            let failed = failed.clone();
            async move {
                match common::connect(server, &token, source).await {
                    Ok(socket) => Some(socket),
                    Err(error) => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                            tracing::warn!(%error, "connect failed");
                        }
                        None
                    }
                }
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .filter_map(|socket| async move { socket })
        .collect()
        .await;
    let connect_time = started.elapsed();
    let open = sockets.len();
    // Let the server settle (allocator, task wakeups) before reading its memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = args.server_pid.and_then(common::rss_bytes);
    let cpu_after_connect = args.server_pid.and_then(common::cpu_time);

    let progress = common::Progress::start(
        format!("holding {open} connections"),
        args.duration,
        args.json,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.duration);
    // Read the server's memory again just before the sockets close: by then the allocator
    // has had time to hand back what the handshakes used, so this is what an idle
    // connection costs for good.
    let server_pid = args.server_pid;
    let rss_held = tokio::spawn(async move {
        tokio::time::sleep_until(deadline - Duration::from_millis(500)).await;
        server_pid.and_then(common::rss_bytes)
    });
    let mut holders = Vec::with_capacity(open);
    for (index, socket) in sockets.into_iter().enumerate() {
        let dropped = dropped.clone();
        holders.push(tokio::spawn(async move {
            let (mut sink, mut stream) = socket.split();
            // Spread the pings over the period so they do not arrive in one burst.
            let offset =
                Duration::from_millis((index as u64 * 7919) % PING_EVERY.as_millis() as u64);
            let mut next_ping = tokio::time::Instant::now() + offset;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    () = tokio::time::sleep_until(next_ping) => {
                        let ping = json!({"type": "ping", "id": 1}).to_string();
                        if sink.send(WsMessage::Text(ping.into())).await.is_err() {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        next_ping += PING_EVERY;
                    }
                    message = stream.next() => match message {
                        Some(Ok(WsMessage::Close(_)) | Err(_)) | None => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Some(Ok(_)) => {}
                    },
                }
            }
            let _ = sink.close().await;
        }));
    }
    for holder in holders {
        holder.await?;
    }
    progress.finish();
    let rss_held = rss_held.await?;
    let per_conn = |after: Option<u64>| match (rss_before, after) {
        (Some(before), Some(after)) if open > 0 => Some(after.saturating_sub(before) / open as u64),
        _ => None,
    };
    let connect_cpu = match (cpu_before, cpu_after_connect) {
        (Some(before), Some(after)) if open > 0 => {
            Some(after.saturating_sub(before).as_secs_f64() * 1e6 / open as f64)
        }
        _ => None,
    };
    Ok(json!({
        "scenario": "connections",
        "connections": count,
        "open": open,
        "failed": failed.load(Ordering::Relaxed),
        "dropped_while_held": dropped.load(Ordering::Relaxed),
        "held_s": args.duration,
        "connects_per_s": (open as f64 / connect_time.as_secs_f64().max(1e-9)).round(),
        "server_rss_bytes_per_conn": per_conn(rss_held),
        "server_rss_bytes_per_conn_after_connect": per_conn(rss_after),
        "server_cpu_us_per_connect": connect_cpu.map(f64::round),
        "server_rss_bytes": rss_held,
    }))
}

//! `group`: one group of M members, all connected; S of them send at a total rate R.
//! Reports deliveries per second and the time from a send to its last member: when the
//! frame reached the last member's socket (the kernel's receive timestamp), and when the
//! bench had read it.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use pigeon_client::Rpc;
use pigeon_proto::{ClientFrame, ServerFrame, ThreadId};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::common::{self, Sink};
use super::listeners::{Listen, Listeners};
use super::{BenchArgs, Rate};

/// Per message: deliveries so far, and the latest delivery (µs after the send): when it
/// reached the member's socket, and when the bench read it.
struct Tally {
    deliveries: AtomicU64,
    last_us: AtomicU64,
    last_read_us: AtomicU64,
}

/// What a member needs of an event: its type and a message's body, borrowed from the
/// frame. A full typed parse of every frame (ids, strings) made the bench's receivers,
/// which share the cores with the server, a large part of the measured fan-out time.
#[derive(serde::Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    body: Option<Cow<'a, str>>,
}

/// A member's connection: a sender's WebSocket, or a listener's raw socket with what was
/// read from it past the handshake.
enum Joined {
    /// Boxed: most members listen, and a WebSocket is five times a raw socket's size.
    Sending(Box<common::Socket>),
    Listening(tokio::net::TcpStream, Vec<u8>),
}

/// What every member's reader shares.
#[derive(Clone)]
struct Counting {
    tallies: Arc<Vec<Tally>>,
    duplicates: Arc<AtomicU64>,
    start: Instant,
}

impl Listen for Counting {
    type Seen = HashSet<usize>;

    /// Counts one text frame: a message's body is `n:sent_at_us:padding`.
    fn frame(&self, text: &str, arrived: Instant, read: Instant, seen: &mut HashSet<usize>) {
        let Ok(event) = serde_json::from_str::<Incoming<'_>>(text) else {
            return;
        };
        let (true, Some(body)) = (event.kind == "message", event.body) else {
            return;
        };
        let mut parts = body.split(':');
        let (Some(Ok(n)), Some(Ok(at))) = (
            parts.next().map(str::parse::<usize>),
            parts.next().map(str::parse::<u64>),
        ) else {
            return;
        };
        if !seen.insert(n) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(tally) = self.tallies.get(n) {
            let (arrived, read) = (
                common::micros_at(self.start, arrived),
                common::micros_at(self.start, read),
            );
            tally.deliveries.fetch_add(1, Ordering::Relaxed);
            tally
                .last_us
                .fetch_max(arrived.saturating_sub(at), Ordering::Relaxed);
            tally
                .last_read_us
                .fetch_max(read.saturating_sub(at), Ordering::Relaxed);
        }
    }
}

impl Counting {
    /// The reading half of a sender's socket (its sends keep it alive).
    async fn read(self, mut stream: common::Stream) {
        let mut seen = HashSet::new();
        while let Some(incoming) = stream.next().await {
            match incoming {
                Ok(WsMessage::Text(text)) => {
                    let now = Instant::now();
                    self.frame(&text, now, now, &mut seen);
                }
                Ok(WsMessage::Close(_)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

pub(crate) async fn run(server: &str, args: &BenchArgs) -> anyhow::Result<Value> {
    let members = args.members.max(2);
    let senders = args.senders.clamp(1, members);
    let sessions = common::users(server, &common::run_prefix("group"), members).await?;
    let owner = Rpc::new(server, &sessions[0].token);
    let names: Vec<String> = sessions.iter().map(|s| s.username.clone()).collect();
    let created = owner
        .call(&ClientFrame::CreateGroup {
            id: pigeon_client::placeholder(),
            title: "bench".into(),
            members: names[1..names.len().min(1000)].to_vec(),
            topic: None,
            avatar: None,
            share_history: false,
        })
        .await?;
    let ServerFrame::Group { group, .. } = created else {
        anyhow::bail!("group not created")
    };
    let thread_id = group.thread_id;
    for chunk in names.get(1000..).unwrap_or_default().chunks(1000) {
        owner
            .call(&ClientFrame::AddMembers {
                id: pigeon_client::placeholder(),
                thread_id,
                members: chunk.to_vec(),
            })
            .await?;
    }

    // Every member connected; bounded concurrency so the accept queue keeps up. Senders
    // keep a WebSocket; members that only listen are read raw (see `listeners`).
    let sockets: Vec<Joined> = futures::stream::iter(sessions.iter().enumerate())
        .map(|(index, session)| async move {
            let source = args.source_address(index);
            anyhow::Ok(if index < senders {
                Joined::Sending(Box::new(
                    common::connect(server, &session.token, source).await?,
                ))
            } else {
                let (stream, read) = common::connect_raw(server, &session.token, source).await?;
                Joined::Listening(stream, read)
            })
        })
        .buffered(128)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;

    let expected_messages = match args.rate {
        Rate::PerSecond(rate) => (rate * args.duration as f64 * 1.5) as usize + 100,
        Rate::Max => 200_000,
    };
    let tallies: Arc<Vec<Tally>> = Arc::new(
        (0..expected_messages)
            .map(|_| Tally {
                deliveries: AtomicU64::new(0),
                last_us: AtomicU64::new(0),
                last_read_us: AtomicU64::new(0),
            })
            .collect(),
    );
    let sent_at: Arc<Vec<AtomicU64>> =
        Arc::new((0..expected_messages).map(|_| AtomicU64::new(0)).collect());
    let counter = Arc::new(AtomicU64::new(0));
    // Deliveries a member already had: counted apart, so a duplicate never hides a loss.
    let duplicates = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let run_for = Duration::from_secs(args.duration);
    let deadline = tokio::time::Instant::now() + run_for;
    let cpu_before = args.server_pid.and_then(common::cpu_time);

    let counting = Counting {
        tallies: tallies.clone(),
        duplicates: duplicates.clone(),
        start,
    };
    let mut sinks = Vec::new();
    let mut readers = Vec::new();
    let mut listening = Vec::new();
    for socket in sockets {
        match socket {
            Joined::Sending(socket) => {
                let (sink, stream) = (*socket).split();
                sinks.push(sink);
                readers.push(tokio::spawn(counting.clone().read(stream)));
            }
            Joined::Listening(stream, read) => listening.push((stream.into_std()?, read)),
        }
    }
    let listeners = Listeners::start(
        listening,
        &counting,
        args.listeners
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from)),
        args.listeners_nice,
    )?;
    let progress = common::Progress::start("group".into(), args.duration, args.json);
    let interval = match args.rate {
        Rate::PerSecond(rate) => Some(Duration::from_secs_f64(senders as f64 / rate.max(0.001))),
        Rate::Max => None,
    };
    let mut sender_tasks = Vec::new();
    for sink in sinks.drain(..senders) {
        let (counter, sent_at, tallies) = (counter.clone(), sent_at.clone(), tallies.clone());
        sender_tasks.push(tokio::spawn(sender(
            sink,
            thread_id,
            interval,
            deadline,
            start,
            counter,
            sent_at,
            tallies.len(),
            args.body,
        )));
    }
    for task in sender_tasks {
        task.await?;
    }
    let sent = counter.load(Ordering::Relaxed) as usize;
    let per_message = (members - 1) as u64;
    // Drain: until every message reached every member, or nothing moved for 3 s.
    let mut last_total = 0;
    let mut last_progress = Instant::now();
    let mut still = tokio::time::Instant::now();
    loop {
        let total: u64 = tallies[..sent.min(tallies.len())]
            .iter()
            .map(|t| t.deliveries.load(Ordering::Relaxed))
            .sum();
        if total >= sent as u64 * per_message {
            last_progress = Instant::now();
            break;
        }
        if total != last_total {
            last_total = total;
            still = tokio::time::Instant::now();
            last_progress = Instant::now();
        } else if still.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = common::cpu_since(args.server_pid, cpu_before);
    // Throughput counts the time until the last delivery (the drain too), so a server
    // that falls behind shows a lower rate, not the offered one.
    let elapsed = last_progress
        .duration_since(start)
        .as_secs_f64()
        .max(run_for.as_secs_f64());
    progress.finish();
    for reader in readers {
        reader.abort();
    }
    let broken = listeners.broken.load(Ordering::Relaxed);
    listeners.stop();
    drop(sinks);

    let (mut fanout, mut fanout_read) = (common::histogram(), common::histogram());
    let mut delivered = 0u64;
    for tally in &tallies[..sent.min(tallies.len())] {
        let deliveries = tally.deliveries.load(Ordering::Relaxed);
        delivered += deliveries;
        if deliveries == per_message {
            let _ = fanout.record(tally.last_us.load(Ordering::Relaxed).max(1));
            let _ = fanout_read.record(tally.last_read_us.load(Ordering::Relaxed).max(1));
        }
    }
    let expected = sent as u64 * per_message;
    Ok(json!({
        "scenario": "group",
        "members": members,
        "senders": senders,
        "listeners_nice": args.listeners_nice,
        "rate": args.rate.to_string(),
        "duration_s": args.duration,
        "messages": sent,
        "deliveries": delivered,
        "deliveries_per_s": (delivered as f64 / elapsed).round(),
        "elapsed_s": (elapsed * 10.0).round() / 10.0,
        "lost": expected.saturating_sub(delivered),
        "duplicated": duplicates.load(Ordering::Relaxed),
        "sockets_lost": broken,
        "fanout_ms": {"p50": common::ms(&fanout, 0.5), "p99": common::ms(&fanout, 0.99), "max": fanout.max() as f64 / 1000.0},
        "fanout_read_ms": {"p50": common::ms(&fanout_read, 0.5), "p99": common::ms(&fanout_read, 0.99), "max": fanout_read.max() as f64 / 1000.0},
        "server_cpu_ms_per_1000": common::per_thousand(cpu, delivered),
    }))
}

/// One sender: a message every `interval` (or as fast as acks return) until the deadline.
#[allow(clippy::too_many_arguments)]
async fn sender(
    mut sink: Sink,
    thread_id: ThreadId,
    interval: Option<Duration>,
    deadline: tokio::time::Instant,
    start: Instant,
    counter: Arc<AtomicU64>,
    sent_at: Arc<Vec<AtomicU64>>,
    capacity: usize,
    body_size: usize,
) {
    let mut next = tokio::time::Instant::now();
    let mut id = 0i64;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep_until(next).await;
        let n = counter.fetch_add(1, Ordering::Relaxed) as usize;
        if n >= capacity {
            counter.fetch_sub(1, Ordering::Relaxed);
            break;
        }
        let at = common::micros_since(start);
        sent_at[n].store(at, Ordering::Relaxed);
        id += 1;
        let body = common::padded(&format!("{n}:{at}:"), body_size);
        let sent = common::send_text(&mut sink, id, thread_id, body);
        if sent.await.is_err() {
            break;
        }
        next = match interval {
            Some(interval) => next + interval,
            // Unpaced: the server's per-connection order of requests paces it.
            None => tokio::time::Instant::now() + Duration::from_micros(200),
        };
    }
}

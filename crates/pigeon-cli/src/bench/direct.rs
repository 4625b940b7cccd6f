//! `direct`: users in pairs send 1:1 messages at a total rate; every delivery is checked
//! for loss, duplication and order, and timed from the send.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use pigeon_client::{Rpc, Target};
use pigeon_proto::{ServerFrame, ThreadId};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::sleep_until;

use super::common::{self, Sink, Stream};
use super::{BenchArgs, Rate};

/// What one connection saw.
struct Stats {
    index: usize,
    /// When this connection last got an ack or a delivery.
    last_event: Instant,
    sent: u64,
    acked: HashSet<u64>,
    errors: u64,
    ack_latency: Histogram<u64>,
    /// Sender index → message numbers received from it.
    received: HashMap<usize, HashSet<u64>>,
    duplicated: u64,
    out_of_order: u64,
    latency: Histogram<u64>,
    /// How late each paced send left against its schedule: the bench's own lag.
    send_lag: Histogram<u64>,
}

/// When a paced connection sends: at `next`, then every `every`, each time woken by the
/// bench's pacer.
struct Schedule {
    wake: Arc<Notify>,
    next: Instant,
    every: Duration,
}

pub(crate) async fn run(server: &str, args: &BenchArgs) -> anyhow::Result<Value> {
    let users = args.users.max(2) & !1;
    let sessions = common::users(server, &common::run_prefix("direct"), users).await?;
    // Open each pair's thread before timing anything.
    let mut threads = Vec::with_capacity(users / 2);
    for pair in sessions.chunks(2) {
        let sent = Rpc::new(server, &pair[0].token)
            .send_text(Target::User(pair[1].username.clone()), "warm-up")
            .await?;
        threads.push(sent.thread_id);
    }
    let mut sockets = Vec::with_capacity(users);
    for (index, session) in sessions.iter().enumerate() {
        let source = args.source_address(index);
        sockets.push(common::connect(server, &session.token, source).await?);
    }

    let start = Instant::now();
    let run_for = Duration::from_secs(args.duration);
    let deadline = tokio::time::Instant::now() + run_for;
    let cpu_before = args.server_pid.and_then(common::cpu_time);
    let progress = common::Progress::start("direct".into(), args.duration, args.json);
    // Paced runs send one message per slot of 1/R seconds, the users taking the slots in
    // turn: the total rate is even, not a burst from every user at once.
    let slot = match args.rate {
        Rate::Max => None,
        Rate::PerSecond(rate) => Some(Duration::from_nanos(
            (1e9 / rate.max(0.001)).round().max(1.0) as u64,
        )),
    };
    let wakers: Vec<Arc<Notify>> = (0..users).map(|_| Arc::new(Notify::new())).collect();
    let pacer = slot.map(|slot| tokio::spawn(pace(wakers.clone(), start, slot, deadline)));
    let mut tasks = Vec::with_capacity(users);
    for (index, socket) in sockets.into_iter().enumerate() {
        let thread_id = threads[index / 2];
        let (sink, stream) = socket.split();
        let body_size = args.body;
        let schedule = slot.map(|slot| Schedule {
            wake: wakers[index].clone(),
            next: start + slot * index as u32,
            every: slot * users as u32,
        });
        tasks.push(tokio::spawn(connection(
            index, sink, stream, thread_id, schedule, deadline, start, body_size,
        )));
    }
    let mut all = Vec::with_capacity(users);
    for task in tasks {
        all.push(task.await?);
    }
    if let Some(pacer) = pacer {
        pacer.await??;
    }
    progress.finish();
    let cpu = common::cpu_since(args.server_pid, cpu_before);

    let mut latency = common::histogram();
    let mut ack_latency = common::histogram();
    let mut send_lag = common::histogram();
    let (
        mut sent,
        mut acked,
        mut delivered,
        mut duplicated,
        mut out_of_order,
        mut lost,
        mut errors,
    ) = (0, 0, 0, 0, 0, 0, 0);
    for stats in &all {
        latency.add(&stats.latency).ok();
        ack_latency.add(&stats.ack_latency).ok();
        send_lag.add(&stats.send_lag).ok();
        sent += stats.sent;
        acked += stats.acked.len() as u64;
        errors += stats.errors;
        duplicated += stats.duplicated;
        out_of_order += stats.out_of_order;
        delivered += stats.received.values().map(|s| s.len() as u64).sum::<u64>();
        // Everything this connection's partner acknowledged must be here.
        let partner = &all[stats.index ^ 1];
        let got = stats.received.get(&partner.index);
        lost += partner
            .acked
            .iter()
            .filter(|n| got.is_none_or(|g| !g.contains(n)))
            .count() as u64;
    }
    // Throughput over the time until the last ack or delivery: a server that falls behind
    // shows a lower rate than the offered one.
    let last = all.iter().map(|s| s.last_event).max().unwrap_or(start);
    let seconds = last
        .duration_since(start)
        .as_secs_f64()
        .max(run_for.as_secs_f64());
    Ok(json!({
        "scenario": "direct",
        "users": users,
        "rate": args.rate.to_string(),
        "duration_s": args.duration,
        "body_bytes": args.body,
        "sent": sent,
        "acked": acked,
        "errors": errors,
        "delivered": delivered,
        "lost": lost,
        "duplicated": duplicated,
        "out_of_order": out_of_order,
        "throughput_per_s": {"acked": (acked as f64 / seconds).round(), "delivered": (delivered as f64 / seconds).round()},
        "elapsed_s": (seconds * 10.0).round() / 10.0,
        "latency_ms": {
            "p50": common::ms(&latency, 0.5), "p99": common::ms(&latency, 0.99),
            "p999": common::ms(&latency, 0.999), "max": latency.max() as f64 / 1000.0,
        },
        "ack_latency_ms": {"p50": common::ms(&ack_latency, 0.5), "p99": common::ms(&ack_latency, 0.99)},
        // Paced runs only: how late the bench's own sends left, which latency includes.
        "send_lag_ms": slot.map(|_| json!({"p50": common::ms(&send_lag, 0.5), "p99": common::ms(&send_lag, 0.99)})),
        "server_cpu_ms_per_1000": common::per_thousand(cpu, acked),
    }))
}

/// Wakes each paced connection when its next slot comes: one kernel timer for the whole
/// bench, where one tokio timer per connection sent a millisecond late (see
/// [`common::Ticker`]). It fires every 250 µs: every 100 µs cost the bench 40% more CPU,
/// which the server shares on a small machine.
async fn pace(
    wakers: Vec<Arc<Notify>>,
    start: Instant,
    slot: Duration,
    deadline: tokio::time::Instant,
) -> std::io::Result<()> {
    const TICK: Duration = Duration::from_micros(250);
    let mut ticker = common::Ticker::every(TICK)?;
    let slot_ns = u64::try_from(slot.as_nanos()).unwrap_or(u64::MAX);
    let deadline = deadline.into_std();
    let mut next = 0u64;
    loop {
        let now = Instant::now();
        while start + Duration::from_nanos(slot_ns.saturating_mul(next)) <= now {
            wakers[(next % wakers.len() as u64) as usize].notify_one();
            next += 1;
        }
        if now >= deadline {
            // Each connection waits for its wake-up alone until then: let it see the end.
            for waker in &wakers {
                waker.notify_one();
            }
            return Ok(());
        }
        ticker.tick().await?;
    }
}

/// Resolves when a paced connection is woken, at once for an unpaced one.
async fn due(schedule: Option<&Schedule>) {
    if let Some(schedule) = schedule {
        schedule.wake.notified().await;
    }
}

/// One user's socket: sends on schedule (or as fast as a window of 64 allows) until the
/// deadline, then drains until everything is acknowledged and the line goes quiet.
#[allow(clippy::too_many_arguments)]
async fn connection(
    index: usize,
    mut sink: Sink,
    mut stream: Stream,
    thread_id: ThreadId,
    mut schedule: Option<Schedule>,
    deadline: tokio::time::Instant,
    start: Instant,
    body_size: usize,
) -> Stats {
    const WINDOW: usize = 64;
    // Long enough that a server stall does not pass for a loss.
    const QUIET: Duration = Duration::from_secs(5);
    let mut stats = Stats {
        index,
        last_event: start,
        sent: 0,
        acked: HashSet::new(),
        errors: 0,
        ack_latency: common::histogram(),
        received: HashMap::new(),
        duplicated: 0,
        out_of_order: 0,
        latency: common::histogram(),
        send_lag: common::histogram(),
    };
    let mut in_flight: HashMap<i64, (u64, u64)> = HashMap::new();
    let mut highest: HashMap<usize, u64> = HashMap::new();
    let mut next_id = 0i64;
    let mut quiet_until = deadline + QUIET;
    let hard_stop = deadline + Duration::from_secs(20);
    'run: loop {
        let now = tokio::time::Instant::now();
        let sending = now < deadline;
        if !sending && (in_flight.is_empty() && now >= quiet_until || now >= hard_stop) {
            break;
        }
        let can_send = sending && (schedule.is_some() || in_flight.len() < WINDOW);
        tokio::select! {
            () = due(schedule.as_ref()), if can_send => {
                let now = Instant::now();
                let now_us = common::micros_at(start, now);
                // Paced: every slot that has come, each timed from its scheduled moment, so
                // a sender that falls behind catches up and shows its lag in the latency
                // (no coordinated omission). Unpaced: one message.
                loop {
                    let sent_at = match schedule.as_mut() {
                        Some(paced) if paced.next <= now => {
                            let at = common::micros_at(start, paced.next);
                            paced.next += paced.every;
                            let _ = stats.send_lag.record(now_us.saturating_sub(at).max(1));
                            at
                        }
                        Some(_) => break,
                        None => now_us,
                    };
                    let n = stats.sent;
                    next_id += 1;
                    let body = common::padded(&format!("{index}:{n}:{sent_at}:"), body_size);
                    let sent = common::send_text(&mut sink, next_id, thread_id, body);
                    if sent.await.is_err() {
                        break 'run;
                    }
                    in_flight.insert(next_id, (n, sent_at));
                    stats.sent += 1;
                    if schedule.is_none() {
                        break;
                    }
                }
            }
            frame = common::next_frame(&mut stream) => {
                let Some(frame) = frame else { break };
                let now_us = common::micros_since(start);
                match frame {
                    ServerFrame::Sent { id, .. } => {
                        if let Some((n, sent_at)) = in_flight.remove(&as_int(&id)) {
                            stats.last_event = Instant::now();
                            stats.acked.insert(n);
                            let _ = stats.ack_latency.record(now_us.saturating_sub(sent_at).max(1));
                        }
                    }
                    ServerFrame::Error { id, .. } => {
                        stats.errors += 1;
                        if let Some(id) = id {
                            in_flight.remove(&as_int(&id));
                        }
                    }
                    ServerFrame::Message(message) => {
                        let mut parts = message.body.split(':');
                        let (Some(Ok(sender)), Some(Ok(n)), Some(Ok(sent_at))) = (
                            parts.next().map(str::parse::<usize>),
                            parts.next().map(str::parse::<u64>),
                            parts.next().map(str::parse::<u64>),
                        ) else {
                            continue;
                        };
                        let seen = stats.received.entry(sender).or_default();
                        if !seen.insert(n) {
                            stats.duplicated += 1;
                            continue;
                        }
                        let top = highest.entry(sender).or_insert(0);
                        if n + 1 < *top {
                            stats.out_of_order += 1;
                        }
                        *top = (*top).max(n + 1);
                        let _ = stats.latency.record(now_us.saturating_sub(sent_at).max(1));
                        stats.last_event = Instant::now();
                        if !sending {
                            quiet_until = tokio::time::Instant::now() + QUIET;
                        }
                    }
                    _ => {}
                }
            }
            () = sleep_until(quiet_until.min(hard_stop)), if !sending => {}
        }
    }
    stats
}

fn as_int(id: &pigeon_proto::ReqId) -> i64 {
    match id {
        pigeon_proto::ReqId::Int(n) => *n,
        pigeon_proto::ReqId::Str(_) => -1,
    }
}

//! `sync`: a user with a backlog of K messages over T threads reconnects and syncs;
//! reports the time to a complete sync and page latencies.

use std::time::Instant;

use futures::StreamExt;
use pigeon_client::{Rpc, Target};
use pigeon_proto::{ClientFrame, ServerFrame, ThreadId};
use serde_json::{Value, json};

use super::BenchArgs;
use super::common;

pub(crate) async fn run(server: &str, args: &BenchArgs) -> anyhow::Result<Value> {
    let threads = args.threads.max(1);
    let backlog = args.backlog.max(threads);
    let sessions = common::users(server, &common::run_prefix("sync"), threads + 1).await?;
    let (reader, peers) = sessions.split_first().expect("at least two users");

    // Peers write the backlog while the reader is away, pipelined on one socket each.
    let per_thread = backlog / threads;
    futures::stream::iter(peers.iter().enumerate())
        .map(|(index, peer)| {
            let reader_name = reader.username.clone();
            async move {
                let rpc = Rpc::new(server, &peer.token);
                rpc.send_text(Target::User(reader_name.clone()), "first").await?;
                let socket = common::connect(server, &peer.token, args.source_address(index)).await?;
                let (mut sink, mut stream) = socket.split();
                for n in 1..per_thread {
                    let frame = json!({"type": "send", "id": n, "to": reader_name, "client_msg_id": pigeon_client::new_client_msg_id(),
                                       "body": common::padded(&format!("{n}:"), args.body)});
                    common::send_json(&mut sink, &frame).await?;
                }
                let mut acked = 1;
                while acked < per_thread {
                    match common::next_frame(&mut stream).await {
                        Some(ServerFrame::Sent { .. }) => acked += 1,
                        Some(ServerFrame::Error { code, message, .. }) => anyhow::bail!("{code:?}: {message}"),
                        Some(_) => {}
                        None => anyhow::bail!("socket closed while writing the backlog"),
                    }
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()?;

    // The reader comes back with nothing and syncs everything, page by page.
    let rpc = Rpc::new(server, &reader.token);
    let mut pages = common::histogram();
    let mut have = std::collections::HashMap::<ThreadId, u64>::new();
    let mut messages = 0usize;
    let started = Instant::now();
    loop {
        let frame = ClientFrame::Sync {
            id: pigeon_client::placeholder(),
            have: have.clone(),
            limit: Some(500),
            events_after: None,
            threads_from: None,
            threads_before: None,
        };
        let page_started = Instant::now();
        let ServerFrame::Sync {
            messages: page,
            more,
            ..
        } = rpc.call(&frame).await?
        else {
            anyhow::bail!("unexpected answer to sync")
        };
        let _ = pages.record(
            u64::try_from(page_started.elapsed().as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        messages += page.len();
        for message in page {
            have.insert(message.thread_id, message.seq);
        }
        if !more {
            break;
        }
    }
    let sync_time = started.elapsed();

    // History reads: the newest 50 of each thread, then a page further back.
    let mut history = common::histogram();
    for thread_id in have.keys().copied().collect::<Vec<_>>() {
        for before in [None, Some(per_thread as u64 / 2)] {
            let frame = ClientFrame::History {
                id: pigeon_client::placeholder(),
                thread_id,
                before,
                after: None,
                limit: Some(50),
            };
            let page_started = Instant::now();
            rpc.call(&frame).await?;
            let _ = history.record(
                u64::try_from(page_started.elapsed().as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
        }
    }
    Ok(json!({
        "scenario": "sync",
        "threads": threads,
        "backlog": backlog,
        "synced_messages": messages,
        "lost": (per_thread * threads).saturating_sub(messages),
        "sync_ms": (sync_time.as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
        "sync_page_ms": {"p50": common::ms(&pages, 0.5), "p99": common::ms(&pages, 0.99), "pages": pages.len()},
        "history_page_ms": {"p50": common::ms(&history, 0.5), "p99": common::ms(&history, 0.99), "pages": history.len()},
    }))
}

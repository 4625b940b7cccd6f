//! 1:1 chat across several devices: delivery, order, dedupe, receipts, unread, devices.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Device, Server, Ws, send, sync_all};

/// Collects the message events a device sees until it holds `total` messages of the thread
/// (counting its own sends, whose acks it already has).
async fn collect(ws: &mut Ws, own: &[u64], total: usize) -> Vec<u64> {
    let mut seen: Vec<u64> = Vec::new();
    while seen.len() + own.len() < total {
        let event = ws.event_of("message").await;
        seen.push(event["seq"].as_u64().unwrap());
    }
    seen
}

#[tokio::test]
async fn two_users_with_two_devices_each_see_every_message_once_in_order() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let alice2 = server.login("alice").await;
    let bob = server.user("bob").await;
    let bob2 = server.login("bob").await;
    let mut sockets = [
        alice.connect(&server).await,
        alice2.connect(&server).await,
        bob.connect(&server).await,
        bob2.connect(&server).await,
    ];

    // Open the thread, then let every device send 25 messages concurrently.
    let first = send(&mut sockets[0], "bob", "a1-0", "hello bob").await;
    let thread_id = first["thread_id"].as_str().unwrap().to_owned();
    let per_device = 25;
    let mut own: Vec<Vec<u64>> = vec![vec![1], vec![], vec![], vec![]];
    let mut pending: Vec<Vec<i64>> = vec![Vec::new(); 4];
    for n in 0..per_device {
        for (device, ws) in sockets.iter_mut().enumerate() {
            let id = ws
                .send_request(json!({
                    "type": "send", "thread_id": thread_id,
                    "client_msg_id": format!("d{device}-{n}"), "body": format!("message {n} from device {device}"),
                }))
                .await;
            pending[device].push(id);
        }
    }
    for (device, ws) in sockets.iter_mut().enumerate() {
        for id in &pending[device] {
            let answer = ws.answer(*id).await;
            assert_eq!(answer["type"], "sent", "{answer}");
            assert_eq!(answer["thread_id"], thread_id.as_str());
            own[device].push(answer["seq"].as_u64().unwrap());
        }
    }

    let total = 1 + 4 * per_device;
    let all: Vec<u64> = (1..=total as u64).collect();
    for (device, ws) in sockets.iter_mut().enumerate() {
        let seen = collect(ws, &own[device], total).await;
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "device {device} got events out of order or twice: {seen:?}"
        );
        let mut union: Vec<u64> = seen.iter().chain(&own[device]).copied().collect();
        union.sort_unstable();
        assert_eq!(
            union, all,
            "device {device} is missing messages or got its own back"
        );
        ws.assert_quiet(std::time::Duration::from_millis(200)).await;
    }

    // History agrees with what was delivered, and message ids are unique.
    let history = sockets[2]
        .request(json!({"type": "history", "thread_id": thread_id, "limit": 200}))
        .await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), total);
    let ids: BTreeMap<&str, u64> = messages
        .iter()
        .map(|m| {
            (
                m["message_id"].as_str().unwrap(),
                m["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ids.len(), total);

    // The metrics saw it all.
    assert_eq!(
        server.metric("pigeon_messages_stored_total").await,
        total as f64
    );
    assert_eq!(server.metric("pigeon_connections_open").await, 4.0);
    assert!(server.metric("pigeon_frames_in_total").await >= total as f64);
    assert!(server.metric("pigeon_store_commit_seconds_count").await >= 1.0);
}

#[tokio::test]
async fn a_resent_client_msg_id_yields_one_message_and_identical_acks() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut bob_ws = bob.connect(&server).await;
    let mut acks = Vec::new();
    let mut ws = alice.connect(&server).await;
    for _ in 0..3 {
        acks.push(send(&mut ws, "bob", "only-once", "hi").await);
    }
    ws.close().await;
    let mut ws = alice.connect(&server).await;
    for _ in 0..2 {
        acks.push(send(&mut ws, &bob.user_id, "only-once", "hi").await);
    }
    let strip = |mut ack: Value| {
        ack.as_object_mut().unwrap().remove("id");
        ack
    };
    let first = strip(acks[0].clone());
    for ack in acks {
        assert_eq!(strip(ack), first);
    }
    let thread_id = first["thread_id"].clone();
    let history = ws
        .request(json!({"type": "history", "thread_id": thread_id}))
        .await;
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        1,
        "{history}"
    );
    let event = bob_ws.event_of("message").await;
    assert_eq!(event["message_id"], first["message_id"]);
    // Alice's reconnect may bring presence events; never a second message.
    let later = bob_ws
        .drain_events(std::time::Duration::from_millis(300))
        .await;
    assert!(later.iter().all(|e| e["type"] != "message"), "{later:?}");
}

#[tokio::test]
async fn one_direct_thread_per_pair_whoever_writes_first() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut a = alice.connect(&server).await;
    let mut b = bob.connect(&server).await;
    let from_alice = send(&mut a, "bob", "a", "hi").await;
    let from_bob = send(&mut b, "alice", "b", "hey").await;
    assert_eq!(from_alice["thread_id"], from_bob["thread_id"]);
    assert_eq!(from_bob["seq"], 2);
}

#[tokio::test]
async fn receipts_unread_and_the_conversation_list() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let bob_phone = server.login("bob").await;
    let carol = server.user("carol").await;
    let mut a = alice.connect(&server).await;
    let mut b = bob.connect(&server).await;
    let mut b_phone = bob_phone.connect(&server).await;
    let mut c = carol.connect(&server).await;

    let mut thread_with_bob = String::new();
    for n in 0..3 {
        let ack = send(&mut a, "bob", &format!("ab{n}"), &format!("to bob {n}")).await;
        thread_with_bob = ack["thread_id"].as_str().unwrap().to_owned();
    }
    // Times are in milliseconds: carol's message must come in a later one to sort first
    // (a commit now takes well under a millisecond).
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    send(&mut c, "bob", "cb0", "carol here").await;

    let list = b.request(json!({"type": "threads"})).await;
    let threads = list["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 2);
    assert_eq!(
        threads[0]["peer"]["username"], "carol",
        "most recent first: {list}"
    );
    assert_eq!(threads[0]["last_message"]["body"], "carol here");
    assert_eq!(threads[1]["unread"], 3);
    assert_eq!(threads[1]["muted"], false);
    assert_eq!(list["total_unread"], 4);

    // Bob reads two of Alice's messages on his laptop.
    let ok = b
        .request(json!({"type": "mark", "thread_id": thread_with_bob, "kind": "read", "seq": 2}))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let receipt = a.event_of("receipt").await;
    assert_eq!(
        receipt,
        json!({"type": "receipt", "thread_id": thread_with_bob, "user_id": bob.user_id, "kind": "read", "seq": 2})
    );
    let marker = b_phone.event_of("user_event").await;
    assert_eq!(
        marker["event"],
        json!({"kind": "read", "thread_id": thread_with_bob, "seq": 2}),
        "bob's phone gets his new read marker"
    );
    let list = b_phone.request(json!({"type": "threads"})).await;
    assert_eq!(list["total_unread"], 2);

    // Markers never move back, and a repeated mark sends nothing.
    b.request(json!({"type": "mark", "thread_id": thread_with_bob, "kind": "read", "seq": 1}))
        .await;
    b.request(json!({"type": "mark", "thread_id": thread_with_bob, "kind": "delivered", "seq": 2}))
        .await;
    a.assert_quiet(std::time::Duration::from_millis(300)).await;

    b.request(json!({"type": "mark", "thread_id": thread_with_bob, "kind": "delivered", "seq": 3}))
        .await;
    let receipt = a.event_of("receipt").await;
    assert_eq!(
        (receipt["kind"].as_str(), receipt["seq"].as_u64()),
        (Some("delivered"), Some(3))
    );

    let alice_view = a.request(json!({"type": "threads"})).await;
    let entry = &alice_view["threads"][0];
    assert_eq!(
        entry["unread"], 0,
        "sending moves the sender's own read marker"
    );
    assert_eq!(entry["peer_read_seq"], 2);
    assert_eq!(entry["peer_delivered_seq"], 3);

    // Replying moves Bob's read marker to his own message.
    send(&mut b, "alice", "ba0", "read you").await;
    let list = b.request(json!({"type": "threads"})).await;
    assert_eq!(list["threads"][0]["unread"], 0);
    assert_eq!(list["total_unread"], 1, "only carol's message is unread");
}

#[tokio::test]
async fn devices_can_be_listed_revoked_and_logged_out() {
    let server = Server::start(&[]);
    let laptop = server.user("alice").await;
    let phone = server.login("alice").await;
    let mut laptop_ws = laptop.connect(&server).await;
    let mut phone_ws = phone.connect(&server).await;

    let list = laptop_ws.request(json!({"type": "devices"})).await;
    let devices = list["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    assert!(
        devices
            .iter()
            .any(|d| d["device_id"] == laptop.device_id.as_str() && d["current"] == true)
    );

    let answer = laptop_ws
        .request(json!({"type": "revoke_device", "device_id": phone.device_id}))
        .await;
    assert_eq!(answer["type"], "ok", "{answer}");
    assert_eq!(phone_ws.close_code().await, Some(4001));
    let status = reqwest::Client::new()
        .get(server.url("/v1/devices"))
        .bearer_auth(&phone.token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401, "a revoked token no longer works");

    let answer = laptop_ws
        .request(json!({"type": "revoke_device", "device_id": phone.device_id}))
        .await;
    assert_eq!(answer["code"], "unknown_device");

    let http = reqwest::Client::new();
    let status = http
        .post(server.url("/v1/logout"))
        .bearer_auth(&laptop.token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 204);
    assert_eq!(
        laptop_ws.close_code().await,
        Some(4001),
        "logout closes the device's own sockets"
    );
    let status = http
        .get(server.url("/v1/devices"))
        .bearer_auth(&laptop.token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn sigterm_closes_sockets_with_going_away_and_exits_cleanly() {
    let mut server = Server::start(&[]);
    let alice = server.user("alice").await;
    let mut ws = alice.connect(&server).await;
    ws.ping().await;
    let code = tokio::spawn(async move { ws.close_code().await });
    assert!(
        tokio::task::spawn_blocking(move || server.terminate())
            .await
            .unwrap(),
        "exit status"
    );
    assert_eq!(code.await.unwrap(), Some(1001));
}

/// What [`stall_bob`] leaves: the server, bob, alice's socket, bob's stalled socket and
/// how many messages alice sent (`m0`, `m1`, …).
struct Stalled {
    server: Server,
    bob: Device,
    sender: Ws,
    stalled: Ws,
    sent: usize,
}

/// A server (with `extra` flags) holding at most 8 queued events per socket, alice
/// connected, and bob on a socket with a tiny receive window that is not read. Alice
/// sends 15 KiB messages to bob until the server gives up on his queue (how much the
/// kernel buffers first depends on its TCP settings; bounded).
async fn stall_bob(extra: &[&str]) -> Stalled {
    let mut args = vec![
        "--send-queue",
        "8",
        "--rate-limit",
        "10000",
        "--rate-burst",
        "10000",
    ];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut sender = alice.connect(&server).await;
    let stalled = bob.connect_small_window(&server).await;
    let body = "x".repeat(15 * 1024);
    let mut sent = 0;
    while server.metric("pigeon_slow_consumer_closes_total").await < 1.0 {
        assert!(sent < 5_000, "bob's socket never backed up");
        for _ in 0..50 {
            // The sender is never held up by a slow receiver.
            send(&mut sender, &bob.user_id, &format!("m{sent}"), &body).await;
            sent += 1;
        }
    }
    Stalled {
        server,
        bob,
        sender,
        stalled,
        sent,
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_1013_and_its_sync_has_everything() {
    let Stalled {
        server,
        bob,
        mut stalled,
        sent: total,
        ..
    } = stall_bob(&[]).await;
    // Bob reads again: first what was queued, then the close.
    assert_eq!(
        stalled.close_code().await,
        Some(1013),
        "a socket that fell too far behind is closed with 1013 (try again later)"
    );
    // What he got live is exactly the first messages, in order: nothing skipped.
    let live: Vec<String> = stalled
        .events
        .iter()
        .filter(|event| event["type"] == "message")
        .map(|event| event["client_msg_id"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (0..live.len()).map(|n| format!("m{n}")).collect();
    assert_eq!(live, expected);
    assert!(live.len() < total, "the test did not back up bob's socket");

    // Nothing was dropped: the reconnected client syncs all of it, in order.
    let mut again = bob.connect(&server).await;
    let synced = sync_all(&mut again, 100).await;
    assert_eq!(synced.len(), total);
    for (n, message) in synced.iter().enumerate() {
        assert_eq!(message["client_msg_id"], format!("m{n}"), "{message}");
    }
}

#[tokio::test]
async fn a_client_that_never_reads_again_is_let_go_after_the_heartbeat_timeout() {
    let Stalled {
        server,
        mut sender,
        stalled,
        ..
    } = stall_bob(&["--heartbeat-timeout", "2"]).await;
    // Bob's socket is never read again: its session must not hold on to it (and to his
    // presence) forever. Alice keeps pinging, so only his connection goes.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while server.metric("pigeon_connections_open").await > 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled connection was never let go"
        );
        sender.ping().await;
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    drop(stalled);
}

/// A client that sends without waiting for answers: the sends it has already sent are
/// taken together, and everything is still answered, stored and delivered in order.
#[tokio::test]
async fn sends_written_back_to_back_are_answered_and_stored_in_order() {
    let server = Server::start(&["--rate-limit", "100000", "--rate-burst", "100000"]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut bob_ws = bob.connect(&server).await;
    let mut a = alice.connect(&server).await;
    let thread = send(&mut a, "bob", "first", "hello").await["thread_id"].clone();

    // 150 frames in one go: sends into the thread, with a ping, a resend, an empty body
    // and a send by username among them.
    let mut frames = Vec::new();
    for n in 0..150 {
        frames.push(match n {
            40 => json!({"type": "ping", "id": n}),
            60 => json!({"type": "send", "id": n, "thread_id": thread, "client_msg_id": "m-10", "body": "again"}),
            80 => json!({"type": "send", "id": n, "thread_id": thread, "client_msg_id": "empty", "body": " "}),
            100 => json!({"type": "send", "id": n, "to": "bob", "client_msg_id": "by-name", "body": "by name"}),
            _ => json!({"type": "send", "id": n, "thread_id": thread, "client_msg_id": format!("m-{n}"), "body": format!("n{n}")}),
        });
    }
    a.send_together(
        frames
            .iter()
            .map(|f| Message::Text(f.to_string().into()))
            .collect(),
    )
    .await;
    let mut answers = Vec::new();
    while answers.len() < frames.len() {
        let frame = a.next_frame().await.expect("an answer");
        if frame.get("id").is_some_and(|id| !id.is_null()) {
            answers.push(frame);
        }
    }
    let ids: Vec<u64> = answers.iter().map(|f| f["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (0..150).collect::<Vec<u64>>(), "answered in order");
    assert_eq!(answers[40]["type"], "pong");
    assert_eq!(answers[80]["code"], "invalid_field");
    assert_eq!(
        answers[60]["seq"], answers[10]["seq"],
        "a resend gets the first answer"
    );
    let seqs: Vec<u64> = answers
        .iter()
        .enumerate()
        .filter(|(n, _)| ![40, 60, 80].contains(n))
        .map(|(_, f)| f["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (2..=148).collect::<Vec<u64>>(),
        "stored in the order sent"
    );

    // Bob gets them once each, in order.
    let mut got = Vec::new();
    while got.len() < 148 {
        let event = bob_ws.event_of("message").await;
        got.push(event["seq"].as_u64().unwrap());
    }
    assert_eq!(got, (1..=148).collect::<Vec<u64>>());
}

/// A client that pipelines sends and then closes still gets every answer, before the
/// server's close frame (nothing may follow a close).
#[tokio::test]
async fn a_close_right_after_pipelined_sends_comes_after_their_answers() {
    let server = Server::start(&["--rate-limit", "100000", "--rate-burst", "100000"]);
    let alice = server.user("alice").await;
    server.user("bob").await;
    let mut a = alice.connect(&server).await;
    let thread = send(&mut a, "bob", "first", "hello").await["thread_id"].clone();
    let mut messages: Vec<Message> = (0..20)
        .map(|n| {
            let frame = json!({"type": "send", "id": n, "thread_id": thread, "client_msg_id": format!("c-{n}"), "body": "x"});
            Message::Text(frame.to_string().into())
        })
        .collect();
    messages.push(Message::Close(None));
    a.send_together(messages).await;
    let mut ids = Vec::new();
    while let Some(frame) = a.next_frame().await {
        if frame["type"] == "sent" {
            ids.push(frame["id"].as_u64().unwrap());
        }
    }
    assert_eq!(
        ids,
        (0..20).collect::<Vec<u64>>(),
        "every answer, in order, before the close"
    );
    let mut a = alice.connect(&server).await;
    let history = a
        .request(json!({"type": "history", "thread_id": thread}))
        .await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 21);
}

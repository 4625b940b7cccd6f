//! History paging and sync after being offline or after a gap.

use serde_json::json;

use crate::support::{Server, send, sync_all};

#[tokio::test]
async fn a_recipient_offline_during_100_sends_syncs_all_100_once_in_order() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut a = alice.connect(&server).await;
    for n in 1..=100 {
        send(&mut a, "bob", &format!("m{n}"), &format!("message {n}")).await;
    }

    // Bob has never seen the thread; pages of 30 bring all of it.
    let mut b = bob.connect(&server).await;
    let messages = sync_all(&mut b, 30).await;
    let bodies: Vec<String> = messages
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (1..=100).map(|n| format!("message {n}")).collect();
    assert_eq!(bodies, expected);

    // The first page names the thread, unknown to bob until now.
    let first = b.request(json!({"type": "sync", "limit": 1})).await;
    assert_eq!(first["threads"][0]["peer"]["username"], "alice");
    assert_eq!(first["threads"][0]["unread"], 100);
    assert_eq!(first["more"], true);

    // Holding everything, a sync is empty.
    let thread_id = messages[0]["thread_id"].as_str().unwrap();
    let done = b
        .request(json!({"type": "sync", "have": {thread_id: 100}}))
        .await;
    assert_eq!(done["messages"], json!([]));
    assert_eq!(done["threads"], json!([]));
    assert_eq!(done["more"], false);
}

#[tokio::test]
async fn sync_resumes_from_what_the_client_holds_across_threads() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let carol = server.user("carol").await;
    let mut a = alice.connect(&server).await;
    let mut c = carol.connect(&server).await;
    let with_alice = send(&mut a, "bob", "a1", "one").await["thread_id"]
        .as_str()
        .unwrap()
        .to_owned();
    send(&mut a, "bob", "a2", "two").await;

    let mut b = bob.connect(&server).await;
    let _ = sync_all(&mut b, 100).await;
    b.close().await;

    // While bob is away: more from alice, and a first message from carol.
    send(&mut a, "bob", "a3", "three").await;
    let with_carol = send(&mut c, "bob", "c1", "hi from carol").await["thread_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut b = bob.connect(&server).await;
    let answer = b
        .request(json!({"type": "sync", "have": {with_alice.clone(): 2}}))
        .await;
    let got: Vec<(String, u64)> = answer["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["thread_id"].as_str().unwrap().to_owned(),
                m["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got.len(), 2, "{answer}");
    assert!(got.contains(&(with_alice, 3)));
    assert!(
        got.contains(&(with_carol, 1)),
        "a thread never seen comes whole"
    );
}

#[tokio::test]
async fn history_pages_backwards_and_fills_gaps_forwards() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    server.user("bob").await;
    let mut a = alice.connect(&server).await;
    let mut thread_id = String::new();
    for n in 1..=12 {
        thread_id = send(&mut a, "bob", &format!("h{n}"), &format!("{n}")).await["thread_id"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    let seqs = |page: &serde_json::Value| -> Vec<u64> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    };

    let newest = a
        .request(json!({"type": "history", "thread_id": thread_id, "limit": 5}))
        .await;
    assert_eq!(seqs(&newest), vec![8, 9, 10, 11, 12]);
    assert_eq!(newest["more"], true);
    let older = a
        .request(json!({"type": "history", "thread_id": thread_id, "limit": 5, "before": 8}))
        .await;
    assert_eq!(seqs(&older), vec![3, 4, 5, 6, 7]);
    let oldest = a
        .request(json!({"type": "history", "thread_id": thread_id, "limit": 5, "before": 3}))
        .await;
    assert_eq!(seqs(&oldest), vec![1, 2]);
    assert_eq!(oldest["more"], false);

    // A client that saw seq 4 then seq 9 asks for what lies between.
    let gap = a
        .request(json!({"type": "history", "thread_id": thread_id, "after": 4, "before": 9}))
        .await;
    assert_eq!(seqs(&gap), vec![5, 6, 7, 8]);
    assert_eq!(gap["more"], false);
}

#[tokio::test]
async fn sync_ranges_cover_only_the_threads_whose_ids_fall_in_them() {
    let server = Server::start(&[]);
    let hub = server.user("hub").await;
    let mut h = hub.connect(&server).await;
    let mut threads = Vec::new();
    for peer in ["peer1", "peer2", "peer3", "peer4"] {
        let device = server.user(peer).await;
        let mut ws = device.connect(&server).await;
        let sent = send(&mut ws, "hub", &format!("{peer}-1"), "hello").await;
        threads.push(sent["thread_id"].as_str().unwrap().to_owned());
    }
    // Ids in byte order are ids in text order.
    threads.sort();
    let in_answer = |answer: &serde_json::Value| -> Vec<String> {
        let mut ids: Vec<String> = answer["threads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["thread_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };

    let middle = h
        .request(json!({"type": "sync", "threads_from": threads[1], "threads_before": threads[3]}))
        .await;
    assert_eq!(in_answer(&middle), threads[1..3].to_vec(), "{middle}");
    assert_eq!(middle["messages"].as_array().unwrap().len(), 2);
    let head = h
        .request(json!({"type": "sync", "threads_before": threads[1]}))
        .await;
    assert_eq!(in_answer(&head), threads[..1].to_vec(), "{head}");
    let tail = h
        .request(json!({"type": "sync", "threads_from": threads[3]}))
        .await;
    assert_eq!(in_answer(&tail), threads[3..].to_vec(), "{tail}");

    let backwards = h
        .request(json!({"type": "sync", "threads_from": threads[2], "threads_before": threads[2]}))
        .await;
    assert_eq!(backwards["type"], "error", "{backwards}");
    assert_eq!(backwards["code"], "invalid_field");
}

//! Presence: online while any device is connected, offline on disconnect or heartbeat timeout.

use std::time::Duration;

use serde_json::json;

use crate::support::{Server, send};

#[tokio::test]
async fn presence_follows_connections_and_reaches_thread_peers() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let alice_phone = server.login("alice").await;
    let bob = server.user("bob").await;
    let stranger = server.user("stranger").await;
    let mut a = alice.connect(&server).await;
    send(&mut a, "bob", "p", "hi").await;
    a.close().await;

    let mut b = bob.connect(&server).await;
    let mut s = stranger.connect(&server).await;
    let before = b
        .request(json!({"type": "presence", "user": "alice"}))
        .await;
    assert_eq!(before["online"], false, "{before}");
    assert!(
        before["last_seen"].as_i64().is_some(),
        "last seen is kept: {before}"
    );

    let a = alice.connect(&server).await;
    // Alice's earlier "offline" may still be on its way; her coming online follows it.
    let mut online = b.event_of("presence").await;
    if online["online"] == false {
        online = b.event_of("presence").await;
    }
    assert_eq!(online["user_id"], alice.user_id.as_str());
    assert_eq!(online["online"], true);

    // A second device changes nothing; closing one of two keeps alice online.
    let phone = alice_phone.connect(&server).await;
    phone.close().await;
    let query = b
        .request(json!({"type": "presence", "user": alice.user_id}))
        .await;
    assert_eq!(query["online"], true, "{query}");
    assert_eq!(query["username"], "alice");

    a.close().await;
    // An announcement of alice's first session may arrive late; it reads the state at send
    // time, so it can only repeat "online". The next change must be "offline".
    let mut offline = b.event_of("presence").await;
    for _ in 0..2 {
        if offline["online"] == true {
            offline = b.event_of("presence").await;
        }
    }
    assert_eq!(offline["online"], false, "{offline}");
    assert!(offline["last_seen"].as_i64().is_some());

    // Someone sharing no thread with alice hears nothing of her.
    s.assert_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_the_heartbeat_timeout() {
    let server = Server::start(&["--heartbeat-timeout", "1"]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut a = alice.connect(&server).await;
    assert_eq!(a.welcome["heartbeat_timeout_ms"], 1000);
    send(&mut a, "bob", "p", "hi").await;
    let mut b = bob.connect(&server).await;

    // Bob keeps pinging; alice stays silent.
    let pinger = tokio::spawn(async move {
        let mut offline = None;
        for _ in 0..30 {
            b.ping().await;
            if let Some(event) = b
                .events
                .iter()
                .find(|e| e["type"] == "presence" && e["online"] == false)
            {
                offline = Some(event.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        offline
    });
    assert_eq!(a.close_code().await, Some(4002));
    let offline = pinger.await.unwrap().expect("bob saw alice go offline");
    assert_eq!(offline["user_id"], alice.user_id.as_str());
}

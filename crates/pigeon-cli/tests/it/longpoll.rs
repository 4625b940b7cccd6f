//! Long-poll: the same events, in the same order, as the socket.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Device, Server, send};

async fn poll(server: &Server, device: &Device, cursor: Option<&str>, wait: u64) -> Value {
    let mut url = format!("{}?wait={wait}", server.url("/v1/events"));
    if let Some(cursor) = cursor {
        url.push_str("&cursor=");
        url.push_str(cursor);
    }
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(&device.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn long_poll_delivers_the_socket_events_in_the_same_order() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob_socket = server.user("bob").await;
    let bob_poller = server.login("bob").await;

    let opened = poll(&server, &bob_poller, None, 0).await;
    assert_eq!(opened["reset"], true);
    let mut cursor = opened["cursor"].as_str().unwrap().to_owned();
    let mut b = bob_socket.connect(&server).await;

    let mut a = alice.connect(&server).await;
    let mut thread_id = Value::Null;
    for n in 0..20 {
        thread_id =
            send(&mut a, "bob", &format!("lp{n}"), &format!("long poll {n}")).await["thread_id"]
                .clone();
    }
    a.request(json!({"type": "mark", "thread_id": thread_id, "kind": "read", "seq": 20}))
        .await;
    b.request(json!({"type": "mark", "thread_id": thread_id, "kind": "read", "seq": 20}))
        .await;

    let mut from_socket = Vec::new();
    for _ in 0..20 {
        from_socket.push(b.event_of("message").await);
    }
    let mut from_poll: Vec<Value> = Vec::new();
    while from_poll.iter().filter(|e| e["type"] == "message").count() < 20 {
        let answer = poll(&server, &bob_poller, Some(&cursor), 5).await;
        assert_eq!(answer["reset"], false);
        cursor = answer["cursor"].as_str().unwrap().to_owned();
        from_poll.extend(answer["events"].as_array().unwrap().iter().cloned());
    }
    let polled_messages: Vec<Value> = from_poll
        .iter()
        .filter(|e| e["type"] == "message")
        .cloned()
        .collect();
    assert_eq!(polled_messages, from_socket, "same frames, same order");

    // Bob's read marker, moved on his socket, reaches his polling device as a user event.
    let more = poll(&server, &bob_poller, Some(&cursor), 5).await;
    let markers: Vec<&Value> = from_poll
        .iter()
        .chain(more["events"].as_array().unwrap())
        .filter(|e| e["type"] == "user_event" && e["event"]["kind"] == "read")
        .collect();
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert_eq!(markers[0]["event"]["seq"], 20);

    // Re-polling the same cursor returns the same events again (until acknowledged).
    let old_cursor = cursor.clone();
    let cursor = more["cursor"].as_str().unwrap().to_owned();
    let again = poll(&server, &bob_poller, Some(&old_cursor), 0).await;
    assert_eq!(again["events"], more["events"]);
    let _ = cursor;
}

#[tokio::test]
async fn a_waiting_poll_returns_as_soon_as_an_event_arrives_and_rpc_sends() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let opened = poll(&server, &bob, None, 0).await;
    let cursor = opened["cursor"].as_str().unwrap().to_owned();

    let waiting = {
        let server_url = server.url("/v1/events");
        let token = bob.token.clone();
        let cursor = cursor.clone();
        tokio::spawn(async move {
            let url = format!("{server_url}?wait=30&cursor={cursor}");
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, sent) = alice
        .rpc(&server, json!({"type": "send", "id": "r1", "to": "bob", "client_msg_id": "rpc-1", "body": "over http"}))
        .await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["type"], "sent");
    assert_eq!(sent["id"], "r1");
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("poll returned early")
        .unwrap();
    assert_eq!(answer["events"][0]["body"], "over http");

    // An unknown cursor (e.g. after a server restart) resets the stream.
    let reset = poll(&server, &bob, Some("abc-3"), 0).await;
    assert_eq!(reset["reset"], true);

    // Errors over HTTP carry the same codes and the request id.
    let (status, error) = bob
        .rpc(
            &server,
            json!({"type": "history", "id": 9, "thread_id": uuid::Uuid::now_v7()}),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(error["code"], "unknown_thread");
    assert_eq!(error["id"], 9);
}

//! Bad input: every failure answers a typed error and the connection keeps working;
//! broken frames close the socket with the proper code.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Server, connect_anonymous, send};

fn assert_error(answer: &Value, code: &str) {
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], code, "{answer}");
    assert!(
        answer["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{answer}"
    );
}

#[tokio::test]
async fn every_bad_request_gets_its_code_and_the_socket_stays_usable() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let carol = server.user("carol").await;
    let mut a = alice.connect(&server).await;
    let mut c = carol.connect(&server).await;
    let thread_ab = send(&mut a, "bob", "x", "hi").await["thread_id"].clone();
    let _ = bob;

    let checks: [(Value, &str); 11] = [
        (json!({"type": "teleport"}), "unknown_type"),
        (
            json!({"type": "send", "to": "bob", "body": "no id for dedupe"}),
            "missing_field",
        ),
        (
            json!({"type": "history", "thread_id": thread_ab, "limit": "many"}),
            "invalid_field",
        ),
        (
            json!({"type": "mark", "thread_id": "not-a-uuid", "kind": "read", "seq": 1}),
            "invalid_field",
        ),
        (
            json!({"type": "history", "thread_id": uuid::Uuid::now_v7()}),
            "unknown_thread",
        ),
        (
            json!({"type": "send", "to": "nobody", "client_msg_id": "u", "body": "hi"}),
            "unknown_user",
        ),
        (
            json!({"type": "send", "thread_id": thread_ab, "client_msg_id": "big", "body": "x".repeat(16 * 1024 + 1)}),
            "body_too_large",
        ),
        (
            json!({"type": "send", "to": "alice", "client_msg_id": "self", "body": "me"}),
            "invalid_field",
        ),
        (
            json!({"type": "send", "thread_id": thread_ab, "client_msg_id": "nul", "body": "a\u{0}b"}),
            "invalid_field",
        ),
        (
            json!({"type": "send", "thread_id": thread_ab, "client_msg_id": "n\u{0}l", "body": "hi"}),
            "invalid_field",
        ),
        (json!({"type": "hello", "token": "again"}), "forbidden"),
    ];
    for (frame, code) in checks {
        let answer = a.request(frame).await;
        assert_error(&answer, code);
        a.ping().await;
    }
    for frame in [
        json!({"type": "send", "thread_id": thread_ab, "client_msg_id": "intruder", "body": "let me in"}),
        json!({"type": "history", "thread_id": thread_ab}),
        json!({"type": "mark", "thread_id": thread_ab, "kind": "read", "seq": 1}),
    ] {
        assert_error(&c.request(frame).await, "not_member");
        c.ping().await;
    }

    // A frame without a readable id is answered with id null.
    a.send_text(r#"{"type":"ping"}"#).await;
    let answer = a.next_frame().await.unwrap();
    assert_error(&answer, "missing_field");
    assert_eq!(answer["id"], Value::Null);
    a.ping().await;

    // Nothing half-done is visible: the thread still holds exactly one message.
    let history = a
        .request(json!({"type": "history", "thread_id": thread_ab}))
        .await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn too_many_requests_are_refused_then_allowed_again() {
    let server = Server::start(&["--rate-limit", "2", "--rate-burst", "3"]);
    let alice = server.user("alice").await;
    let mut a = alice.connect(&server).await;
    let mut limited = 0;
    for _ in 0..10 {
        let answer = a.request(json!({"type": "ping"})).await;
        if answer["type"] == "error" {
            assert_error(&answer, "rate_limited");
            limited += 1;
        }
    }
    assert!(
        limited >= 6,
        "only {limited} of 10 rapid requests were limited"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a.ping().await;
}

#[tokio::test]
async fn broken_frames_close_the_socket_with_the_proper_code() {
    let server = Server::start(&["--max-frame-bytes", "4096"]);
    let alice = server.user("alice").await;

    let mut ws = alice.connect(&server).await;
    ws.send_text("this is not json").await;
    assert_eq!(ws.close_code().await, Some(1007));

    let mut ws = alice.connect(&server).await;
    ws.send_text(&format!(
        r#"{{"type":"ping","id":1,"pad":"{}"}}"#,
        "x".repeat(8192)
    ))
    .await;
    assert_eq!(ws.close_code().await, Some(1009));

    let mut ws = alice.connect(&server).await;
    ws.send_message(Message::Binary(vec![1u8, 2, 3].into()))
        .await;
    assert_eq!(ws.close_code().await, Some(1003));

    // The server is fine afterwards.
    let mut ws = alice.connect(&server).await;
    ws.ping().await;
}

#[tokio::test]
async fn bad_or_revoked_tokens_are_refused() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;

    // Header auth: refused before the upgrade, with a typed JSON error.
    let response = reqwest::Client::new()
        .get(server.url("/ws"))
        .bearer_auth("not-a-token")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");

    // First-frame auth, as browsers do it.
    let mut ws = connect_anonymous(&server).await;
    ws.send_json(&json!({"type": "hello", "id": "h", "token": "wrong"}))
        .await;
    let answer = ws.next_frame().await.unwrap();
    assert_error(&answer, "unauthorized");
    assert_eq!(answer["id"], "h");
    assert_eq!(ws.close_code().await, Some(4001));

    let mut ws = connect_anonymous(&server).await;
    ws.send_json(&json!({"type": "hello", "id": 1, "token": alice.token}))
        .await;
    let welcome = ws.next_frame().await.unwrap();
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["id"], 1);
    assert_eq!(welcome["username"], "alice");

    let mut ws = connect_anonymous(&server).await;
    ws.send_json(&json!({"type": "ping", "id": 1})).await;
    assert_eq!(ws.close_code().await, Some(1008), "a request before hello");

    // Revoked.
    let http = reqwest::Client::new();
    http.post(server.url("/v1/logout"))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    let mut ws = connect_anonymous(&server).await;
    ws.send_json(&json!({"type": "hello", "id": 2, "token": alice.token}))
        .await;
    assert_error(&ws.next_frame().await.unwrap(), "unauthorized");
}

#[tokio::test]
async fn accounts_reject_bad_input_with_typed_errors() {
    // Production hashing cost here (19 MiB, 2 iterations), as `pigeon serve` runs by default.
    let server = Server::start(&["--argon2-memory-kib", "19456", "--argon2-iterations", "2"]);
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| http.post(server.url(path)).json(&body).send();
    let cases = [
        (
            "/v1/register",
            json!({"username": "Al", "password": "long enough"}),
            400,
            "invalid_username",
        ),
        (
            "/v1/register",
            json!({"username": "alice", "password": "short"}),
            400,
            "invalid_password",
        ),
        (
            "/v1/register",
            json!({"username": "alice"}),
            400,
            "missing_field",
        ),
        (
            "/v1/register",
            json!({"username": "alice", "password": 12345678}),
            400,
            "invalid_field",
        ),
        (
            "/v1/register",
            json!({"username": "alice", "password": "long enough"}),
            201,
            "",
        ),
        (
            "/v1/register",
            json!({"username": "alice", "password": "long enough"}),
            409,
            "username_taken",
        ),
        (
            "/v1/login",
            json!({"username": "alice", "password": "wrong password"}),
            401,
            "invalid_credentials",
        ),
        (
            "/v1/login",
            json!({"username": "nobody", "password": "wrong password"}),
            401,
            "invalid_credentials",
        ),
    ];
    for (path, body, status, code) in cases {
        let response = post(path, body.clone()).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{path} {body}");
        if !code.is_empty() {
            let answer: Value = response.json().await.unwrap();
            assert_eq!(answer["code"], code, "{path} {body}");
        }
    }
    let oversize = http
        .post(server.url("/v1/register"))
        .body("x".repeat(128 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(oversize.status(), 413);
}

#[tokio::test]
async fn login_attempts_are_rate_limited_per_address() {
    let server = Server::start(&["--auth-rate-limit", "1"]);
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = http
            .post(server.url("/v1/login"))
            .json(&json!({"username": "nobody", "password": "whatever1"}))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[tokio::test]
async fn malformed_websocket_upgrades_are_refused_before_upgrading() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(&[]);
    let cases = [
        ("dGhlIHNhbXBsZSBub25jZQ==", "13", "101"),
        ("short", "13", "400"),
        ("dGhlIHNhbXBsZSBub25jZQ==", "8", "426"),
    ];
    for (key, version, expected) in cases {
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        let status = String::from_utf8_lossy(&head[9..12]).into_owned();
        assert_eq!(status, expected, "key {key}, version {version}");
    }
}

#[tokio::test]
async fn a_close_from_the_client_is_answered_with_a_close() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let mut ws = alice.connect(&server).await;
    ws.send_message(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await;
    // RFC 6455 §5.5.1: the endpoint that receives a close sends one back.
    assert_eq!(ws.close_code().await, Some(1000));
}

//! Contacts, blocks, presence privacy, per-member settings synced across devices, typing.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Server, send};

#[tokio::test]
async fn friend_requests_presence_privacy_and_blocks_end_to_end() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut a = alice.connect(&server).await;
    let mut b = bob.connect(&server).await;

    // Strangers see nothing of each other's presence.
    let answer = b
        .request(json!({"type": "presence", "user": "alice"}))
        .await;
    assert_eq!(answer["code"], "forbidden", "{answer}");

    let found = b
        .request(json!({"type": "search_users", "prefix": "ali"}))
        .await;
    assert_eq!(found["users"][0]["username"], "alice");
    let request = b
        .request(json!({"type": "contact", "user": "alice", "action": "request"}))
        .await;
    assert_eq!(request["contact"]["state"], "requested");
    let incoming = a.event_of("user_event").await;
    assert_eq!(
        incoming["event"]["contact"]["state"], "incoming",
        "{incoming}"
    );
    assert_eq!(incoming["event"]["contact"]["username"], "bob");
    let accepted = a
        .request(json!({"type": "contact", "user": "bob", "action": "accept"}))
        .await;
    assert_eq!(accepted["contact"]["state"], "friend");
    // Bob's devices heard of his own request first, then of the answer.
    let mut told = b.event_of("user_event").await;
    if told["event"]["contact"]["state"] == "requested" {
        told = b.event_of("user_event").await;
    }
    assert_eq!(told["event"]["contact"]["state"], "friend");

    // Friends: presence, last seen, the contact list.
    let list = b.request(json!({"type": "contacts"})).await;
    assert_eq!(list["contacts"][0]["online"], true, "{list}");
    assert!(
        list["contacts"][0].get("last_seen").is_none(),
        "no last-seen while online: {list}"
    );
    a.close().await;
    let offline = b.event_of("presence").await;
    assert_eq!(
        (offline["online"].as_bool(), offline["last_seen"].is_i64()),
        (Some(false), true),
        "{offline}"
    );
    let mut a = alice.connect(&server).await;
    assert_eq!(b.event_of("presence").await["online"], true);

    // Hidden last seen.
    a.request(json!({"type": "set_privacy", "hide_last_seen": true}))
        .await;
    a.close().await;
    let offline = b.event_of("presence").await;
    assert_eq!(offline["online"], false);
    assert!(offline.get("last_seen").is_none(), "{offline}");
    let query = b
        .request(json!({"type": "presence", "user": "alice"}))
        .await;
    assert!(query.get("last_seen").is_none(), "{query}");
    let mut a = alice.connect(&server).await;
    b.event_of("presence").await;
    // A client reads the setting back (to show its switch) from /v1/me.
    let me: Value = reqwest::Client::new()
        .get(server.url("/v1/me"))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["hide_last_seen"], true, "{me}");

    // Alice blocks bob. He learns only what each refused action tells him.
    let blocked = a
        .request(json!({"type": "contact", "user": "bob", "action": "block"}))
        .await;
    assert_eq!(blocked["contact"]["blocked"], true);
    assert_eq!(
        blocked["contact"].get("state"),
        None,
        "blocking ends the friendship"
    );
    for (frame, code) in [
        (
            json!({"type": "send", "to": "alice", "client_msg_id": "b1", "body": "hi"}),
            "blocked",
        ),
        (
            json!({"type": "contact", "user": "alice", "action": "request"}),
            "blocked",
        ),
        (
            json!({"type": "create_group", "title": "trap", "members": ["alice"]}),
            "blocked",
        ),
        (json!({"type": "presence", "user": "alice"}), "forbidden"),
    ] {
        let answer = b.request(frame.clone()).await;
        assert_eq!(answer["code"], code, "{frame}: {answer}");
    }
    let found = b
        .request(json!({"type": "search_users", "prefix": "ali"}))
        .await;
    assert_eq!(
        found["users"],
        json!([]),
        "a blocker is not found by the blocked"
    );
    a.close().await;
    let mut a = alice.connect(&server).await;
    let events = b.drain_events(Duration::from_millis(400)).await;
    assert!(
        events
            .iter()
            .all(|e| e["type"] != "presence" && e["type"] != "user_event"),
        "bob learns nothing: {events:?}"
    );

    // Alice may still write to bob; unblocking lets him answer.
    send(&mut a, "bob", "a1", "I can still write").await;
    a.request(json!({"type": "contact", "user": "bob", "action": "unblock"}))
        .await;
    send(&mut b, "alice", "b2", "thanks").await;
}

#[tokio::test]
async fn muted_threads_leave_the_total_and_settings_sync_to_other_devices() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let alice_phone = server.login("alice").await;
    let mut bob = server.user("bob").await.connect(&server).await;
    let mut carol = server.user("carol").await.connect(&server).await;
    send(&mut bob, "alice", "b1", "one").await;
    send(&mut bob, "alice", "b2", "two").await;
    let from_carol = send(&mut carol, "alice", "c1", "three").await;

    let mut laptop = alice.connect(&server).await;
    let mut phone = alice_phone.connect(&server).await;
    let list = laptop.request(json!({"type": "threads"})).await;
    assert_eq!(list["total_unread"], 3);
    let with_carol = from_carol["thread_id"].clone();

    let settings = laptop
        .request(json!({"type": "thread_settings", "thread_id": with_carol, "muted": true, "pinned": true, "nickname": "Caro"}))
        .await;
    assert_eq!(
        settings["settings"],
        json!({"muted": true, "pinned": true, "archived": false, "nickname": "Caro"})
    );
    let synced = phone.event_of("user_event").await;
    assert_eq!(synced["event"]["kind"], "thread_settings");
    assert_eq!(synced["event"]["settings"]["muted"], true);

    let list = phone.request(json!({"type": "threads"})).await;
    assert_eq!(
        list["total_unread"], 2,
        "the muted thread is left out: {list}"
    );
    let entry = list["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["thread_id"] == with_carol)
        .unwrap()
        .clone();
    assert_eq!(
        (entry["muted"].as_bool(), entry["pinned"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(entry["nickname"], "Caro");
    assert_eq!(
        entry["unread"], 1,
        "muting hides from the total, not from the thread"
    );

    // A device that was away replays the log through sync.
    laptop
        .request(json!({"type": "thread_settings", "thread_id": with_carol, "archived": true}))
        .await;
    let tablet = server.login("alice").await;
    let mut tablet = tablet.connect(&server).await;
    let sync = tablet
        .request(json!({"type": "sync", "events_after": 0}))
        .await;
    let kinds: Vec<&str> = sync["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["thread_settings", "thread_settings"], "{sync}");
    let cursor = sync["event_cursor"].as_u64().unwrap();
    assert_eq!(cursor, 2);
    let again = tablet
        .request(json!({"type": "sync", "events_after": cursor}))
        .await;
    assert_eq!(again["events"], json!([]));
}

#[tokio::test]
async fn typing_is_ephemeral_throttled_and_respects_blocks() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut a = alice.connect(&server).await;
    let mut b = bob.connect(&server).await;
    let thread_id = send(&mut a, "bob", "t0", "hi").await["thread_id"].clone();
    b.event_of("message").await;

    let typing = |active: bool| json!({"type": "typing", "thread_id": thread_id, "active": active});
    assert_eq!(a.request(typing(true)).await["type"], "ok");
    let event = b.event_of("typing").await;
    assert_eq!(event["user_id"], alice.user_id.as_str());
    assert_eq!(event["active"], true);
    assert!(event["expires_ms"].as_u64().unwrap() > 0);
    // A second "typing" right away is answered but not re-sent; "stopped" is.
    assert_eq!(a.request(typing(true)).await["type"], "ok");
    a.request(typing(false)).await;
    let next = b.event_of("typing").await;
    assert_eq!(next["active"], false, "{next}");

    // Typing is never stored.
    let history = b
        .request(json!({"type": "history", "thread_id": thread_id}))
        .await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 1);

    b.request(json!({"type": "contact", "user": "alice", "action": "block"}))
        .await;
    let answer: Value = a.request(typing(true)).await;
    assert_eq!(answer["code"], "blocked");
}

#[tokio::test]
async fn requests_can_be_declined_cancelled_and_friends_removed_or_renamed() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut a = alice.connect(&server).await;
    let mut b = bob.connect(&server).await;
    let act = |user: &str, action: &str| json!({"type": "contact", "user": user, "action": action});

    // Nothing to answer yet.
    assert_eq!(
        a.request(act("bob", "accept")).await["code"],
        "no_pending_request"
    );
    b.request(act("alice", "request")).await;
    assert_eq!(
        b.request(act("alice", "accept")).await["code"],
        "no_pending_request",
        "one cannot accept one's own request"
    );
    let declined = a.request(act("bob", "decline")).await;
    assert_eq!(declined["contact"].get("state"), None, "{declined}");
    assert_eq!(
        b.request(json!({"type": "contacts"})).await["contacts"],
        json!([]),
        "the request is gone for bob too"
    );

    b.request(act("alice", "request")).await;
    let cancelled = b.request(act("alice", "cancel")).await;
    assert_eq!(cancelled["contact"].get("state"), None);
    assert_eq!(
        a.request(json!({"type": "contacts"})).await["contacts"],
        json!([])
    );

    // Two requests crossing make friends.
    b.request(act("alice", "request")).await;
    let crossed = a.request(act("bob", "request")).await;
    assert_eq!(crossed["contact"]["state"], "friend");
    let renamed = a
        .request(json!({"type": "set_alias", "user": "bob", "alias": "Bobby"}))
        .await;
    assert_eq!(renamed["contact"]["alias"], "Bobby");
    let list = a.request(json!({"type": "contacts"})).await;
    assert_eq!(list["contacts"][0]["alias"], "Bobby");
    assert_eq!(list["contacts"][0]["state"], "friend");
    assert_eq!(list["contacts"][0]["online"], true);

    let removed = b.request(act("alice", "remove")).await;
    assert_eq!(removed["contact"].get("state"), None);
    let list = a.request(json!({"type": "contacts"})).await;
    assert_eq!(
        list["contacts"][0].get("state"),
        None,
        "the alias stays, the friendship goes: {list}"
    );
    assert_eq!(
        list["contacts"][0].get("online"),
        None,
        "presence is for friends"
    );

    // Over HTTP the codes carry their statuses.
    b.request(act("alice", "block")).await;
    let mut request = act("bob", "request");
    request["id"] = json!(1);
    let (status, answer) = alice.rpc(&server, request).await;
    assert_eq!((status, answer["code"].as_str()), (403, Some("blocked")));
    let (status, answer) = bob
        .rpc(
            &server,
            json!({"type": "contact", "id": 1, "user": "alice", "action": "accept"}),
        )
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (409, Some("no_pending_request"))
    );
}

//! Groups: the permission matrix, history visibility on every path, the cost of a message
//! to a 10,000-member group, ownership succession, and "do we already have a chat?".

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{Server, Ws, send};

/// Someone's role towards the group under test.
#[derive(Clone, Copy, Debug)]
enum Who {
    Owner,
    Admin,
    Member,
    Outsider,
}

struct Cast {
    owner: Ws,
    admin: Ws,
    member: Ws,
    outsider: Ws,
}

impl Cast {
    fn ws(&mut self, who: Who) -> &mut Ws {
        match who {
            Who::Owner => &mut self.owner,
            Who::Admin => &mut self.admin,
            Who::Member => &mut self.member,
            Who::Outsider => &mut self.outsider,
        }
    }
}

/// A fresh group: owner, admin (promoted), second admin, member, target member.
async fn fresh_group(cast: &mut Cast, n: usize) -> Value {
    let created = cast
        .owner
        .request(json!({"type": "create_group", "title": format!("g{n}"), "members": ["admin", "admin2", "member", "target"]}))
        .await;
    assert_eq!(created["type"], "group", "{created}");
    let thread_id = created["group"]["thread_id"].clone();
    for admin in ["admin", "admin2"] {
        let promoted = cast
            .owner
            .request(
                json!({"type": "set_role", "thread_id": thread_id, "user": admin, "role": "admin"}),
            )
            .await;
        assert_eq!(promoted["type"], "group", "{promoted}");
    }
    thread_id
}

#[tokio::test]
async fn the_group_permission_matrix() {
    let server = Server::start(&["--rate-limit", "10000", "--rate-burst", "10000"]);
    let mut cast = Cast {
        owner: server.user("owner").await.connect(&server).await,
        admin: server.user("admin").await.connect(&server).await,
        member: server.user("member").await.connect(&server).await,
        outsider: server.user("outsider").await.connect(&server).await,
    };
    for name in ["admin2", "target", "fresh", "stranger"] {
        server.user(name).await;
    }

    use Who::{Admin, Member, Outsider, Owner};
    let everyone = [Owner, Admin, Member, Outsider];
    // (action, who, expected: "ok" or an error code)
    type Action = fn(&Value) -> Value;
    let matrix: Vec<(&str, Action, [&str; 4])> = vec![
        (
            "send",
            |t| json!({"type": "send", "thread_id": t, "client_msg_id": uuid::Uuid::now_v7().to_string(), "body": "hi"}),
            ["ok", "ok", "ok", "not_member"],
        ),
        (
            "add",
            |t| json!({"type": "add_members", "thread_id": t, "members": ["fresh"]}),
            ["ok", "ok", "forbidden", "not_member"],
        ),
        (
            "remove member",
            |t| json!({"type": "remove_member", "thread_id": t, "user": "target"}),
            ["ok", "ok", "forbidden", "not_member"],
        ),
        (
            "remove admin",
            |t| json!({"type": "remove_member", "thread_id": t, "user": "admin2"}),
            ["ok", "forbidden", "forbidden", "not_member"],
        ),
        (
            "rename",
            |t| json!({"type": "update_group", "thread_id": t, "title": "renamed", "topic": "t"}),
            ["ok", "ok", "forbidden", "not_member"],
        ),
        (
            "promote",
            |t| json!({"type": "set_role", "thread_id": t, "user": "target", "role": "admin"}),
            ["ok", "forbidden", "forbidden", "not_member"],
        ),
        (
            "demote",
            |t| json!({"type": "set_role", "thread_id": t, "user": "admin2", "role": "member"}),
            ["ok", "forbidden", "forbidden", "not_member"],
        ),
        (
            "transfer",
            |t| json!({"type": "transfer_ownership", "thread_id": t, "user": "target"}),
            ["ok", "forbidden", "forbidden", "not_member"],
        ),
        (
            "leave",
            |t| json!({"type": "leave_group", "thread_id": t}),
            ["ok", "ok", "ok", "not_member"],
        ),
        (
            "members",
            |t| json!({"type": "group_members", "thread_id": t}),
            ["ok", "ok", "ok", "not_member"],
        ),
        (
            "info",
            |t| json!({"type": "group_info", "thread_id": t}),
            ["ok", "ok", "ok", "not_member"],
        ),
        (
            "history",
            |t| json!({"type": "history", "thread_id": t}),
            ["ok", "ok", "ok", "not_member"],
        ),
        (
            "mute",
            |t| json!({"type": "thread_settings", "thread_id": t, "muted": true}),
            ["ok", "ok", "ok", "not_member"],
        ),
        (
            "typing",
            |t| json!({"type": "typing", "thread_id": t}),
            ["ok", "ok", "ok", "not_member"],
        ),
    ];
    let mut n = 0;
    for (name, action, expected) in &matrix {
        for (who, want) in everyone.iter().zip(expected) {
            n += 1;
            let thread_id = fresh_group(&mut cast, n).await;
            let answer = cast.ws(*who).request(action(&thread_id)).await;
            if *want == "ok" {
                assert_ne!(answer["type"], "error", "{name} by {who:?}: {answer}");
            } else {
                assert_eq!(answer["code"], *want, "{name} by {who:?}: {answer}");
            }
        }
    }

    // A user who blocked the admin cannot be added by them; the owner still can.
    let stranger = server.login("stranger").await;
    let mut s = stranger.connect(&server).await;
    let blocked = s
        .request(json!({"type": "contact", "user": "admin", "action": "block"}))
        .await;
    assert_eq!(blocked["contact"]["blocked"], true, "{blocked}");
    let thread_id = fresh_group(&mut cast, 0).await;
    let answer = cast
        .admin
        .request(json!({"type": "add_members", "thread_id": thread_id, "members": ["stranger"]}))
        .await;
    assert_eq!(answer["code"], "blocked");
    let answer = cast
        .owner
        .request(json!({"type": "add_members", "thread_id": thread_id, "members": ["stranger"]}))
        .await;
    assert_eq!(answer["type"], "group", "{answer}");
    let answer = cast
        .admin
        .request(json!({"type": "create_group", "title": "x", "members": ["stranger"]}))
        .await;
    assert_eq!(answer["code"], "blocked");
}

#[tokio::test]
async fn ownership_passes_on_and_membership_changes_are_in_the_timeline() {
    let server = Server::start(&[]);
    let mut owner = server.user("owner").await.connect(&server).await;
    let mut old_member = server.user("old").await.connect(&server).await;
    let mut admin = server.user("admin").await.connect(&server).await;
    let created = owner
        .request(json!({"type": "create_group", "title": "Team", "members": ["old", "admin"]}))
        .await;
    let thread_id = created["group"]["thread_id"].clone();
    // One's own changes are never unread; the others' "created" is.
    let mine = owner.request(json!({"type": "threads"})).await;
    assert_eq!(mine["threads"][0]["unread"], 0, "{mine}");
    let theirs = admin.request(json!({"type": "threads"})).await;
    assert_eq!(theirs["threads"][0]["unread"], 1, "{theirs}");
    owner
        .request(
            json!({"type": "set_role", "thread_id": thread_id, "user": "admin", "role": "admin"}),
        )
        .await;

    let left = owner
        .request(json!({"type": "leave_group", "thread_id": thread_id}))
        .await;
    assert_eq!(left["type"], "group", "{left}");
    let event = admin.event_of("message").await;
    let mut event = event;
    while event["system"]["event"] != "member_left" {
        event = admin.event_of("message").await;
    }
    assert_eq!(
        event["system"]["new_owner"], admin.welcome["user_id"],
        "the admin outranks the older member"
    );
    let list = admin
        .request(json!({"type": "group_members", "thread_id": thread_id}))
        .await;
    let roles: Vec<(&str, &str)> = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["username"].as_str().unwrap(), m["role"].as_str().unwrap()))
        .collect();
    assert!(
        roles.contains(&("admin", "owner")) && roles.contains(&("old", "member")),
        "{roles:?}"
    );

    // Every device sees the same history: the system messages, with seqs.
    let history = old_member
        .request(json!({"type": "history", "thread_id": thread_id}))
        .await;
    let events: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["system"]["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["created", "role_changed", "member_left"]);

    for ws in [&mut admin, &mut old_member] {
        ws.request(json!({"type": "leave_group", "thread_id": thread_id}))
            .await;
    }
    let answer = admin.request(json!({"type": "send", "thread_id": thread_id, "client_msg_id": "late", "body": "hello?"})).await;
    assert_eq!(answer["code"], "not_member");
}

#[tokio::test]
async fn new_members_see_nothing_from_before_they_joined_on_any_path() {
    let server = Server::start(&[]);
    let mut owner = server.user("owner").await.connect(&server).await;
    let late = server.user("late").await;
    let late_poller = server.login("late").await;
    let created = owner
        .request(json!({"type": "create_group", "title": "Private", "members": []}))
        .await;
    let thread_id = created["group"]["thread_id"].clone();
    for n in 0..3 {
        owner.request(json!({"type": "send", "thread_id": thread_id, "client_msg_id": format!("old{n}"), "body": format!("secret {n}")})).await;
    }
    // The late member's long-poll stream is open before they join.
    let opened = poll(&server, &late_poller.token, None).await;
    let mut late_ws = late.connect(&server).await;
    let added = owner
        .request(json!({"type": "add_members", "thread_id": thread_id, "members": ["late"]}))
        .await;
    assert_eq!(added["group"]["member_count"], 2);
    owner.request(json!({"type": "send", "thread_id": thread_id, "client_msg_id": "new", "body": "welcome"})).await;

    let bodies = |messages: &Value| -> Vec<String> {
        messages
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_owned())
            .collect()
    };
    let history = late_ws
        .request(json!({"type": "history", "thread_id": thread_id, "limit": 100}))
        .await;
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        2,
        "{history}"
    );
    assert_eq!(history["messages"][0]["system"]["event"], "members_added");
    let before = late_ws
        .request(json!({"type": "history", "thread_id": thread_id, "before": 5}))
        .await;
    assert_eq!(
        before["messages"],
        json!([]),
        "paging back stops at the join"
    );
    let after = late_ws
        .request(json!({"type": "history", "thread_id": thread_id, "after": 0}))
        .await;
    assert!(
        !bodies(&after["messages"])
            .iter()
            .any(|b| b.starts_with("secret"))
    );

    let sync = late_ws.request(json!({"type": "sync"})).await;
    assert!(
        !bodies(&sync["messages"])
            .iter()
            .any(|b| b.starts_with("secret")),
        "{sync}"
    );
    let summary = &sync["threads"][0];
    assert_eq!(
        summary["unread"], 2,
        "only what they can see counts: {summary}"
    );
    // Seq 1 is "created", 2–4 the secrets: the member sees from 5 ("added") on.
    assert_eq!(summary["joined_seq"], 4);

    let polled = poll(
        &server,
        &late_poller.token,
        Some(opened["cursor"].as_str().unwrap()),
    )
    .await;
    let polled_bodies: Vec<&str> = polled["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["body"].as_str())
        .collect();
    assert!(
        !polled_bodies.iter().any(|b| b.starts_with("secret")),
        "{polled}"
    );

    // Receipts cannot reach behind the join either.
    let mark = late_ws
        .request(json!({"type": "mark", "thread_id": thread_id, "kind": "read", "seq": 2}))
        .await;
    assert_eq!(mark["type"], "ok");
    let list = late_ws.request(json!({"type": "threads"})).await;
    assert_eq!(list["threads"][0]["read_seq"], 4, "{list}");

    // A group that shares its history shows it to new members.
    let open = owner
        .request(
            json!({"type": "create_group", "title": "Open", "members": [], "share_history": true}),
        )
        .await;
    let open_id = open["group"]["thread_id"].clone();
    owner
        .request(
            json!({"type": "send", "thread_id": open_id, "client_msg_id": "o1", "body": "shared"}),
        )
        .await;
    owner
        .request(json!({"type": "add_members", "thread_id": open_id, "members": ["late"]}))
        .await;
    let history = late_ws
        .request(json!({"type": "history", "thread_id": open_id}))
        .await;
    assert!(bodies(&history["messages"]).contains(&"shared".to_owned()));
}

async fn poll(server: &Server, token: &str, cursor: Option<&str>) -> Value {
    let mut url = format!("{}?wait=1", server.url("/v1/events"));
    if let Some(cursor) = cursor {
        url = format!("{url}&cursor={cursor}");
    }
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_message_to_10000_members_writes_one_row_and_reaches_each_listener_once_in_order() {
    let server = Server::start(&[
        "--auth-rate-limit",
        "1000000",
        "--rate-limit",
        "1000",
        "--rate-burst",
        "1000",
    ]);
    let owner = server.user("owner").await;
    let http = reqwest::Client::new();
    let url = server.url("/v1/register");
    // Three members listen on sockets; the fan-out threads write to them.
    let mut listeners = Vec::new();
    for n in 0..3 {
        listeners.push(server.user(&format!("listener{n}")).await);
    }
    let names: Vec<String> = (0..9_996).map(|n| format!("member{n:05}")).collect();
    let others: Vec<String> = futures::stream::iter(names)
        .map(|name| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let response = http
                    .post(url)
                    .json(&json!({"username": name, "password": "long enough"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201);
                response.json::<Value>().await.unwrap()["user_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let ids: Vec<String> = listeners
        .iter()
        .map(|device| device.user_id.clone())
        .chain(others)
        .collect();

    let mut ws = owner.connect(&server).await;
    let created = ws
        .request(json!({"type": "create_group", "title": "Everyone", "members": ids[..999]}))
        .await;
    let thread_id = created["group"]["thread_id"].clone();
    for chunk in ids[999..].chunks(1000) {
        let added = ws
            .request(json!({"type": "add_members", "thread_id": thread_id, "members": chunk}))
            .await;
        assert_eq!(added["type"], "group", "{added}");
    }
    let info = ws
        .request(json!({"type": "group_info", "thread_id": thread_id}))
        .await;
    assert_eq!(info["group"]["member_count"], 10_000);
    let over = ws.request(json!({"type": "create_group", "title": "too big", "members": ids.iter().take(1001).collect::<Vec<_>>()})).await;
    assert_eq!(over["code"], "limit_exceeded", "1,000 users per request");

    let mut sockets = Vec::new();
    for device in &listeners {
        sockets.push(device.connect(&server).await);
    }
    let rows_before = server.metric("pigeon_store_rows_written_total").await;
    let stored_before = server.metric("pigeon_messages_stored_total").await;
    let messages = 20.0;
    for n in 0..20 {
        send_to(&mut ws, &thread_id, n).await;
    }
    // Every listener gets every message once, in seq order.
    for socket in &mut sockets {
        let mut seqs = Vec::new();
        for _ in 0..20 {
            let event = socket.event_of("message").await;
            assert_eq!(event["body"], "to everyone", "{event}");
            seqs.push(event["seq"].as_u64().unwrap());
        }
        let first = seqs[0];
        assert_eq!(seqs, (first..first + 20).collect::<Vec<_>>());
        socket.assert_quiet(Duration::from_millis(200)).await;
    }
    let rows = server.metric("pigeon_store_rows_written_total").await - rows_before;
    let stored = server.metric("pigeon_messages_stored_total").await - stored_before;
    assert_eq!(stored, messages);
    // One message row, the thread head and the sender's read marker: nothing per member.
    assert!(
        rows <= 3.0 * messages,
        "{rows} rows written for {messages} messages to 10,000 members"
    );

    let list = ws
        .request(json!({"type": "group_members", "thread_id": thread_id, "limit": 1000}))
        .await;
    assert_eq!(list["members"].as_array().unwrap().len(), 1000);
    assert_eq!(list["more"], true);
    assert!(
        list["members"][0].get("read_seq").is_none(),
        "a group too large for receipts does not show markers either: {}",
        list["members"][0]
    );
}

#[tokio::test]
async fn the_member_list_of_a_small_group_carries_each_members_markers() {
    let server = Server::start(&[]);
    let mut alice = server.user("alice").await.connect(&server).await;
    let mut bob = server.user("bob").await.connect(&server).await;
    let mut carol = server.user("carol").await.connect(&server).await;
    let group = alice
        .request(json!({"type": "create_group", "title": "Trip", "members": ["bob", "carol"]}))
        .await;
    let thread_id = group["group"]["thread_id"].clone();
    let first = send_text(&mut alice, &thread_id, "a1").await;
    let second = send_text(&mut alice, &thread_id, "a2").await;
    for (ws, kind, seq) in [(&mut bob, "read", second), (&mut carol, "delivered", first)] {
        let answer = ws
            .request(json!({"type": "mark", "thread_id": thread_id, "kind": kind, "seq": seq}))
            .await;
        assert_ne!(answer["type"], "error", "{answer}");
    }

    // What a client needs to show "read by all" after a reload, without the live receipts.
    let list = alice
        .request(json!({"type": "group_members", "thread_id": thread_id}))
        .await;
    let markers: Vec<(&str, u64, u64)> = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["username"].as_str().unwrap(),
                m["read_seq"].as_u64().unwrap(),
                m["delivered_seq"].as_u64().unwrap(),
            )
        })
        .collect();
    // Members named at creation joined before the group's first message (`created`).
    for expected in [
        ("alice", second, second),
        ("bob", second, second),
        ("carol", 0, first),
    ] {
        assert!(markers.contains(&expected), "{expected:?} in {markers:?}");
    }
}

async fn send_text(ws: &mut Ws, thread_id: &Value, client_msg_id: &str) -> u64 {
    let answer = ws
        .request(json!({"type": "send", "thread_id": thread_id, "client_msg_id": client_msg_id, "body": "hi"}))
        .await;
    assert_eq!(answer["type"], "sent", "{answer}");
    answer["seq"].as_u64().unwrap()
}

async fn send_to(ws: &mut Ws, thread_id: &Value, n: usize) {
    let answer = ws.request(json!({"type": "send", "thread_id": thread_id, "client_msg_id": format!("big{n}"), "body": "to everyone"})).await;
    assert_eq!(answer["type"], "sent", "{answer}");
}

#[tokio::test]
async fn existing_chats_are_found_by_their_members() {
    let server = Server::start(&[]);
    let mut alice = server.user("alice").await.connect(&server).await;
    server.user("bob").await;
    server.user("carol").await;
    let first = alice
        .request(json!({"type": "create_group", "title": "abc", "members": ["bob", "carol"]}))
        .await;
    alice
        .request(json!({"type": "create_group", "title": "ab", "members": ["bob"]}))
        .await;
    let found = alice
        .request(json!({"type": "find_groups", "members": ["carol", "bob"]}))
        .await;
    let groups = found["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{found}");
    assert_eq!(groups[0]["thread_id"], first["group"]["thread_id"]);
    let none = alice
        .request(json!({"type": "find_groups", "members": ["carol"]}))
        .await;
    assert_eq!(none["groups"], json!([]));

    // Direct threads stay one per pair.
    let one = send(&mut alice, "bob", "d1", "hi").await;
    let two = send(&mut alice, "bob", "d2", "hi again").await;
    assert_eq!(one["thread_id"], two["thread_id"]);
}

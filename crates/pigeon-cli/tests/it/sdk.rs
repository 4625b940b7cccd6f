//! The SDK against the real server: resends, reconnects, sync and order across crashes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::Duration;

use pigeon_client::{Client, ClientConfig, Event, Events, Target, Transport};
use tokio::sync::Mutex;

use crate::support::{PASSWORD, Server, send_texts};

/// Collects message events until `count` have arrived; returns (seq, body) in arrival order.
async fn collect(mut events: Events, count: usize) -> Vec<(u64, String)> {
    collect_where(&mut events, count, |message| {
        Some((message.seq, message.body))
    })
    .await
}

/// The first `count` message events that `keep` keeps, in arrival order. A client that
/// keeps reconnecting without getting them fails here within a minute.
async fn collect_where<T>(
    events: &mut Events,
    count: usize,
    keep: impl Fn(pigeon_proto::Message) -> Option<T>,
) -> Vec<T> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < count {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(Event::Message(message))) => seen.extend(keep(message)),
            Ok(Some(Event::Fatal(error))) => panic!("client stopped: {error}"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("client ended after {} messages", seen.len()),
            Err(_) => panic!("only {} of {count} messages within 60 s", seen.len()),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_keep_every_message_across_two_server_crashes() {
    let server = Server::start(&["--rate-limit", "100000", "--rate-burst", "100000"]);
    let base = server.base_url();
    server.user("alice").await;
    server.user("bob").await;
    let cache_dir = tempfile::tempdir().unwrap();
    let mut clients = Vec::new();
    for name in ["alice", "bob"] {
        let session = pigeon_client::login(&base, name, PASSWORD, "sdk")
            .await
            .unwrap();
        let mut config = ClientConfig::new(&base, &session.token);
        config.cache = Some(cache_dir.path().join(format!("{name}.db")));
        config.reconnect_max = Duration::from_millis(500);
        clients.push(Client::connect(config).unwrap());
    }
    let (bob, bob_events) = clients.pop().unwrap();
    let (alice, alice_events) = clients.pop().unwrap();
    let per_client = 1000;
    let total = 2 * per_client;
    let alice_seen = tokio::spawn(collect(alice_events, total));
    let bob_seen = tokio::spawn(collect(bob_events, total));

    let acked = Arc::new(AtomicUsize::new(0));
    let sender = |client: Client, to: &'static str, from: &'static str| {
        send_texts(client, to, from, per_client, 64, acked.clone())
    };
    let from_alice = sender(alice.clone(), "bob", "alice");
    let from_bob = sender(bob.clone(), "alice", "bob");

    // Kill the server hard twice in the middle of the burst; restart it on the same port.
    let server = Arc::new(Mutex::new(server));
    for threshold in [400, 1200] {
        while acked.load(AtomicOrdering::Relaxed) < threshold {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut guard = server.lock().await;
        guard.kill_hard();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let restarted = guard.restart_same_port();
        *guard = restarted;
    }

    let mut seqs: Vec<u64> = tokio::time::timeout(Duration::from_secs(120), async {
        let mut all = from_alice.await.unwrap();
        all.extend(from_bob.await.unwrap());
        all
    })
    .await
    .expect("every send acknowledged");
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=total as u64).collect::<Vec<_>>(),
        "every send stored once, seqs gap-free"
    );

    let expected: BTreeSet<String> = (0..per_client)
        .flat_map(|n| [format!("alice {n}"), format!("bob {n}")])
        .collect();
    for (who, seen) in [
        ("alice", alice_seen.await.unwrap()),
        ("bob", bob_seen.await.unwrap()),
    ] {
        let order: Vec<u64> = seen.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(
            order,
            (1..=total as u64).collect::<Vec<_>>(),
            "{who}: once each, in seq order"
        );
        let bodies: BTreeSet<String> = seen.into_iter().map(|(_, body)| body).collect();
        assert_eq!(bodies, expected, "{who} holds every message");
    }
    alice.close().await;
    bob.close().await;

    // The cache holds the whole conversation, readable with no server at all.
    let cache = pigeon_client::Cache::open(&cache_dir.path().join("alice.db")).unwrap();
    let positions = cache.positions().unwrap();
    let (&thread_id, &held) = positions.iter().next().unwrap();
    assert_eq!(held, total as u64);
    let last_page = cache.messages(thread_id, None, 10).unwrap();
    assert_eq!(
        last_page.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1991..=2000).collect::<Vec<u64>>()
    );
    assert!(cache.unsent().unwrap().is_empty(), "nothing left to send");
}

#[tokio::test]
async fn long_poll_clients_get_the_same_messages_as_socket_clients() {
    let server = Server::start(&[]);
    let base = server.base_url();
    server.user("alice").await;
    server.user("bob").await;
    let bob_session = pigeon_client::login(&base, "bob", PASSWORD, "socket")
        .await
        .unwrap();
    let bob_poll_session = pigeon_client::login(&base, "bob", PASSWORD, "poll")
        .await
        .unwrap();
    let (_socket, socket_events) =
        Client::connect(ClientConfig::new(&base, &bob_session.token)).unwrap();
    let mut poll_config = ClientConfig::new(&base, &bob_poll_session.token);
    poll_config.transport = Transport::LongPoll;
    let (poller, mut poll_events) = Client::connect(poll_config).unwrap();
    // Wait until the poller is connected, so "from now" is well defined for both.
    loop {
        if let Some(Event::Connected(kind)) = poll_events.next().await {
            assert_eq!(kind, pigeon_client::TransportKind::LongPoll);
            break;
        }
    }

    let alice = pigeon_client::login(&base, "alice", PASSWORD, "a")
        .await
        .unwrap();
    let (alice, _alice_events) = Client::connect(ClientConfig::new(&base, &alice.token)).unwrap();
    for n in 0..30 {
        alice
            .send_text(Target::User("bob".into()), format!("m{n}"))
            .await
            .unwrap();
    }
    let by_socket = collect(socket_events, 30).await;
    let by_poll = collect(poll_events, 30).await;
    assert_eq!(by_socket, by_poll);
    assert_eq!(by_poll[0], (1, "m0".to_owned()));

    // Requests work over long-poll too.
    let (threads, total_unread) = poller.threads().await.unwrap();
    assert_eq!((threads.len(), total_unread), (1, 30));
    let error = poller
        .send_text(Target::User("nobody".into()), "hi")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(pigeon_proto::ErrorCode::UnknownUser));
}

#[tokio::test]
async fn the_typed_api_covers_groups_contacts_presence_and_typing() {
    let server = Server::start(&[]);
    let base = server.base_url();
    server.user("alice").await;
    server.user("bob").await;
    let connect = |name: &'static str| {
        let base = base.clone();
        async move {
            let session = pigeon_client::login(&base, name, PASSWORD, "sdk")
                .await
                .unwrap();
            let (client, mut events) =
                Client::connect(ClientConfig::new(&base, &session.token)).unwrap();
            while !matches!(events.next().await, Some(Event::Connected(_))) {}
            (client, events)
        }
    };
    let (alice, _alice_events) = connect("alice").await;
    let (bob, mut bob_events) = connect("bob").await;

    let group = alice.create_group("Team", &["bob"]).await.unwrap();
    assert_eq!(group.member_count, 2);
    let contact = alice
        .contact("bob", pigeon_proto::ContactAction::Request)
        .await
        .unwrap();
    assert_eq!(contact.state, Some(pigeon_proto::ContactState::Requested));
    bob.contact("alice", pigeon_proto::ContactAction::Accept)
        .await
        .unwrap();
    let contacts = alice.contacts().await.unwrap();
    assert_eq!(contacts[0].online, Some(true));
    assert_eq!(alice.presence("bob").await.unwrap(), (true, None));
    alice.typing(group.thread_id, true).await.unwrap();
    loop {
        match bob_events.next().await {
            Some(Event::Other(pigeon_proto::ServerFrame::Typing {
                thread_id,
                active: true,
                ..
            })) => {
                assert_eq!(thread_id, group.thread_id);
                break;
            }
            Some(_) => {}
            None => panic!("bob's client ended"),
        }
    }
    let left = bob.leave_group(group.thread_id).await.unwrap();
    assert_eq!(left.member_count, 1);
    let refused = bob
        .add_members(group.thread_id, &["alice"])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(pigeon_proto::ErrorCode::NotMember));
}

#[tokio::test]
async fn a_member_removed_and_added_again_keeps_receiving() {
    let server = Server::start(&[]);
    let base = server.base_url();
    server.user("owner").await;
    server.user("alice").await;
    let owner = pigeon_client::login(&base, "owner", PASSWORD, "o")
        .await
        .unwrap();
    let owner = pigeon_client::Rpc::new(&base, &owner.token);
    let alice = pigeon_client::login(&base, "alice", PASSWORD, "a")
        .await
        .unwrap();
    let (_alice, mut events) = Client::connect(ClientConfig::new(&base, &alice.token)).unwrap();
    while !matches!(events.next().await, Some(Event::Connected(_))) {}

    let created = owner
        .call(&pigeon_proto::ClientFrame::CreateGroup {
            id: pigeon_client::placeholder(),
            title: "g".into(),
            members: vec!["alice".into()],
            topic: None,
            avatar: None,
            share_history: false,
        })
        .await
        .unwrap();
    let pigeon_proto::ServerFrame::Group { group, .. } = created else {
        panic!()
    };
    let thread = Target::Thread(group.thread_id);
    owner.send_text(thread.clone(), "before").await.unwrap();
    let remove = pigeon_proto::ClientFrame::RemoveMember {
        id: pigeon_client::placeholder(),
        thread_id: group.thread_id,
        user: "alice".into(),
    };
    owner.call(&remove).await.unwrap();
    for n in 0..3 {
        owner
            .send_text(thread.clone(), &format!("while away {n}"))
            .await
            .unwrap();
    }
    let add = pigeon_proto::ClientFrame::AddMembers {
        id: pigeon_client::placeholder(),
        thread_id: group.thread_id,
        members: vec!["alice".into()],
    };
    owner.call(&add).await.unwrap();
    owner.send_text(thread, "welcome back").await.unwrap();

    // Alice sees the group's timeline up to her removal, then from her return; never the gap.
    let mut seen = Vec::new();
    while !seen.contains(&"welcome back".to_owned()) {
        match tokio::time::timeout(Duration::from_secs(15), events.next())
            .await
            .expect("messages keep coming")
        {
            Some(Event::Message(message)) if message.system.is_none() => seen.push(message.body),
            Some(_) => {}
            None => panic!("client ended"),
        }
    }
    assert_eq!(seen, ["before", "welcome back"]);
}

/// Text messages until `count` have arrived, as (thread, body).
async fn collect_texts(events: &mut Events, count: usize) -> Vec<(pigeon_proto::ThreadId, String)> {
    collect_where(events, count, |message| {
        (message.kind == pigeon_proto::MessageKind::Text)
            .then_some((message.thread_id, message.body))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_more_threads_than_one_frame_can_list_syncs_them_all() {
    // 4 KiB frames: one `sync` can list about 48 threads in `have`; the user holds 120.
    const GROUPS: usize = 120;
    let server = Server::start(&[
        "--max-frame-bytes",
        "4096",
        "--rate-limit",
        "100000",
        "--rate-burst",
        "100000",
    ]);
    let base = server.base_url();
    server.user("hub").await;
    server.user("pal").await;
    let connect = |name: &'static str, cache: Option<std::path::PathBuf>| {
        let base = base.clone();
        async move {
            let session = pigeon_client::login(&base, name, PASSWORD, "sdk")
                .await
                .unwrap();
            let mut config = ClientConfig::new(&base, &session.token);
            config.cache = cache;
            Client::connect(config).unwrap()
        }
    };
    let (pal, _pal_events) = connect("pal", None).await;
    let mut groups = Vec::new();
    for n in 0..GROUPS {
        let group = pal.create_group(&format!("g{n}"), &["hub"]).await.unwrap();
        pal.send_text(Target::Thread(group.thread_id), format!("first {n}"))
            .await
            .unwrap();
        groups.push(group.thread_id);
    }

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("hub.db");
    let (hub, mut hub_events) = connect("hub", Some(cache.clone())).await;
    let first = collect_texts(&mut hub_events, GROUPS).await;
    let expected: BTreeSet<_> = (0..GROUPS)
        .map(|n| (groups[n], format!("first {n}")))
        .collect();
    assert_eq!(first.iter().cloned().collect::<BTreeSet<_>>(), expected);
    hub.close().await;

    for (n, thread_id) in groups.iter().enumerate() {
        pal.send_text(Target::Thread(*thread_id), format!("second {n}"))
            .await
            .unwrap();
    }
    // Listing every thread in one `have` is more than a frame may carry.
    let hub_device = server.login("hub").await;
    let mut raw = hub_device.connect(&server).await;
    let have: std::collections::HashMap<_, u64> = groups.iter().map(|id| (*id, 2)).collect();
    raw.send_json(&serde_json::json!({"type": "sync", "id": 1, "have": have}))
        .await;
    assert_eq!(raw.close_code().await, Some(1009));

    // The client comes back holding all 120 threads and syncs them range by range.
    let (_hub, mut hub_events) = connect("hub", Some(cache)).await;
    let second = collect_texts(&mut hub_events, GROUPS).await;
    let expected: BTreeSet<_> = (0..GROUPS)
        .map(|n| (groups[n], format!("second {n}")))
        .collect();
    assert_eq!(second.len(), GROUPS, "each once");
    assert_eq!(second.into_iter().collect::<BTreeSet<_>>(), expected);
    drop(hub_events);
    _hub.close().await;

    // Over long-poll the limit is on HTTP bodies, learned from `GET /v1/me`.
    for (n, thread_id) in groups.iter().enumerate() {
        pal.send_text(Target::Thread(*thread_id), format!("third {n}"))
            .await
            .unwrap();
    }
    let session = pigeon_client::login(&base, "hub", PASSWORD, "sdk")
        .await
        .unwrap();
    let mut config = ClientConfig::new(&base, &session.token);
    config.cache = Some(cache_dir.path().join("hub.db"));
    config.transport = Transport::LongPoll;
    let (_hub, mut hub_events) = Client::connect(config).unwrap();
    let third = collect_texts(&mut hub_events, GROUPS).await;
    let expected: BTreeSet<_> = (0..GROUPS)
        .map(|n| (groups[n], format!("third {n}")))
        .collect();
    assert_eq!(third.into_iter().collect::<BTreeSet<_>>(), expected);
}

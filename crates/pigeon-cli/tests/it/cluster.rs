//! Cluster mode: several `pigeon serve` nodes on one PostgreSQL database and NATS.
//!
//! Each test gets a fresh database (`pigeon_store::testing`). NATS is the machine's
//! (`PIGEON_TEST_NATS_URL`, default `nats://127.0.0.1:4222`), except where a test restarts
//! NATS: that one runs a `nats-server` of its own. An empty `PIGEON_TEST_POSTGRES_URL` or
//! `PIGEON_TEST_NATS_URL` skips these tests, saying so; otherwise a missing service fails
//! them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pigeon_client::{Client, ClientConfig, Event, Events, Target};
use pigeon_proto::{MessageKind, ThreadId};
use pigeon_store::testing::TestDatabase;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use crate::support::{PASSWORD, Server, WAIT, send, send_texts};

const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";

/// The NATS URL for tests, or `None` (said once) when switched off.
fn nats_url() -> Option<String> {
    match std::env::var("PIGEON_TEST_NATS_URL") {
        Ok(url) if url.is_empty() => {
            eprintln!("skipping a cluster test: PIGEON_TEST_NATS_URL is empty");
            None
        }
        Ok(url) => Some(url),
        Err(_) => Some(DEFAULT_NATS.to_owned()),
    }
}

/// Nodes sharing one fresh database and one NATS.
struct Cluster {
    nodes: Vec<Server>,
    // Dropped after the nodes (fields drop in order), so no node holds a connection.
    _database: TestDatabase,
}

impl Cluster {
    async fn start(count: usize) -> Option<Self> {
        let nats = nats_url()?;
        Self::start_with(count, &nats).await
    }

    async fn start_with(count: usize, nats: &str) -> Option<Self> {
        Self::start_with_args(count, nats, &[]).await
    }

    async fn start_with_args(count: usize, nats: &str, extra: &[&str]) -> Option<Self> {
        let database = TestDatabase::create().await?;
        let args: Vec<String> = [
            "--database",
            &database.url(),
            "--bus",
            nats,
            "--rate-limit",
            "100000",
            "--rate-burst",
            "100000",
        ]
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect();
        let mut nodes = Vec::new();
        for _ in 0..count {
            nodes.push(Self::node(&args));
        }
        Some(Self {
            nodes,
            _database: database,
        })
    }

    fn node(args: &[String]) -> Server {
        Server::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Logs `name` in on `node` and connects an SDK client there.
    async fn client(&self, node: usize, name: &str) -> (Client, Events) {
        client_at(&self.nodes[node].base_url(), name).await
    }
}

async fn client_at(base: &str, name: &str) -> (Client, Events) {
    let session = pigeon_client::login(base, name, PASSWORD, "cluster")
        .await
        .unwrap();
    let mut config = ClientConfig::new(base, &session.token);
    config.reconnect_max = Duration::from_millis(500);
    Client::connect(config).unwrap()
}

/// Messages received, per thread in arrival order, as (seq, body).
type Received = BTreeMap<ThreadId, Vec<(u64, String)>>;

/// Collects text messages until `count` have arrived, per thread in arrival order; system
/// messages are checked for order too but not counted.
async fn collect(mut events: Events, count: usize) -> Received {
    let mut threads: BTreeMap<ThreadId, Vec<(u64, String)>> = BTreeMap::new();
    let mut texts = 0;
    while texts < count {
        match tokio::time::timeout(Duration::from_secs(60), events.next()).await {
            Ok(Some(Event::Message(message))) => {
                if message.kind == MessageKind::Text {
                    texts += 1;
                }
                threads
                    .entry(message.thread_id)
                    .or_default()
                    .push((message.seq, message.body));
            }
            Ok(Some(Event::Fatal(error))) => panic!("client stopped: {error}"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("client ended after {texts} messages"),
            Err(_) => panic!("no message for 60 s after {texts} of {count}"),
        }
    }
    threads
}

/// Asserts a thread's messages came once each, in seq order from 1.
fn assert_once_in_order(who: &str, messages: &[(u64, String)]) {
    let seqs: Vec<u64> = messages.iter().map(|(seq, _)| *seq).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "{who}: every message once, in seq order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_every_message_once_in_order() {
    let Some(cluster) = Cluster::start(3).await else {
        return;
    };
    cluster.nodes[0].user("alice").await;
    cluster.nodes[1].user("bob").await;
    cluster.nodes[2].user("carol").await;
    // alice has a device on node 0 and another on node 2; bob is on 1; carol on 2.
    let (alice, alice_events) = cluster.client(0, "alice").await;
    let (_alice_tab, alice_tab_events) = cluster.client(2, "alice").await;
    let (bob, bob_events) = cluster.client(1, "bob").await;
    let (carol, carol_events) = cluster.client(2, "carol").await;
    let group = alice
        .create_group("three nodes", &["bob", "carol"])
        .await
        .unwrap();

    let direct = 60;
    let per_member = 40;
    // alice's and bob's devices see both threads; carol only the group.
    let both = 2 * direct + 3 * per_member;
    let seen = [
        ("alice", tokio::spawn(collect(alice_events, both))),
        ("alice's tab", tokio::spawn(collect(alice_tab_events, both))),
        ("bob", tokio::spawn(collect(bob_events, both))),
        ("carol", tokio::spawn(collect(carol_events, 3 * per_member))),
    ];

    let mut sends = Vec::new();
    for (client, name, peer) in [(&alice, "alice", "bob"), (&bob, "bob", "alice")] {
        for n in 0..direct {
            let client = client.clone();
            sends.push(tokio::spawn(async move {
                client
                    .send_text(Target::User(peer.into()), format!("{name} {n}"))
                    .await
                    .unwrap()
                    .seq
            }));
        }
    }
    let mut group_sends = Vec::new();
    for (client, name) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        for n in 0..per_member {
            let client = client.clone();
            group_sends.push(tokio::spawn(async move {
                client
                    .send_text(
                        Target::Thread(group.thread_id),
                        format!("{name} in group {n}"),
                    )
                    .await
                    .unwrap()
                    .seq
            }));
        }
    }
    let mut direct_seqs = Vec::new();
    for send in sends {
        direct_seqs.push(send.await.unwrap());
    }
    direct_seqs.sort_unstable();
    assert_eq!(
        direct_seqs,
        (1..=2 * direct as u64).collect::<Vec<_>>(),
        "senders on two nodes: gap-free, unique seqs"
    );
    let mut group_seqs = Vec::new();
    for send in group_sends {
        group_seqs.push(send.await.unwrap());
    }
    group_seqs.sort_unstable();
    group_seqs.dedup();
    assert_eq!(group_seqs.len(), 3 * per_member, "group seqs are unique");
    assert_eq!(
        group_seqs.last().unwrap() - group_seqs.first().unwrap() + 1,
        3 * per_member as u64,
        "group seqs from three nodes have no gap"
    );

    for (who, collected) in seen {
        let threads = collected.await.unwrap();
        for messages in threads.values() {
            assert_once_in_order(who, messages);
        }
        let group_texts = threads[&group.thread_id]
            .iter()
            .filter(|(_, body)| body.contains(" in group "))
            .count();
        assert_eq!(group_texts, 3 * per_member, "{who}: every group message");
    }
    for node in &cluster.nodes {
        assert!(
            node.metric("pigeon_bus_received_total").await > 0.0,
            "events crossed nodes over NATS"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_on_three_nodes_share_one_gap_free_sequence() {
    let Some(cluster) = Cluster::start(3).await else {
        return;
    };
    let names = ["ann", "ben", "cat"];
    for (node, name) in names.iter().enumerate() {
        cluster.nodes[node].user(name).await;
    }
    let mut clients = Vec::new();
    for (node, name) in names.iter().enumerate() {
        clients.push(cluster.client(node, name).await.0);
    }
    let group = clients[0]
        .create_group("race", &["ben", "cat"])
        .await
        .unwrap();
    let per_node = 100;
    let mut sends = Vec::new();
    for client in &clients {
        for n in 0..per_node {
            let client = client.clone();
            sends.push(tokio::spawn(async move {
                client
                    .send_text(Target::Thread(group.thread_id), format!("{n}"))
                    .await
                    .unwrap()
                    .seq
            }));
        }
    }
    let mut seqs = BTreeSet::new();
    for send in sends {
        assert!(seqs.insert(send.await.unwrap()), "a seq was given twice");
    }
    let first = *seqs.first().unwrap();
    assert_eq!(
        seqs.into_iter().collect::<Vec<_>>(),
        (first..first + 3 * per_node as u64).collect::<Vec<_>>(),
        "one gap-free sequence across three nodes"
    );
}

/// Messages sent each way between two clients at once, as fast as acks come back, while
/// both clients collect what they receive.
struct Burst {
    per_client: usize,
    acked: Arc<AtomicUsize>,
    sends: Vec<tokio::task::JoinHandle<Vec<u64>>>,
    seen: Vec<(&'static str, tokio::task::JoinHandle<Received>)>,
}

impl Burst {
    fn start(
        a: (&Client, Events, &'static str),
        b: (&Client, Events, &'static str),
        per_client: usize,
    ) -> Self {
        let total = 2 * per_client;
        let acked = Arc::new(AtomicUsize::new(0));
        let (a_client, a_events, a_name) = a;
        let (b_client, b_events, b_name) = b;
        let seen = vec![
            (a_name, tokio::spawn(collect(a_events, total))),
            (b_name, tokio::spawn(collect(b_events, total))),
        ];
        let sends = [(a_client, a_name, b_name), (b_client, b_name, a_name)]
            .into_iter()
            .map(|(client, from, to)| {
                send_texts(client.clone(), to, from, per_client, 32, acked.clone())
            })
            .collect();
        Self {
            per_client,
            acked,
            sends,
            seen,
        }
    }

    /// Waits until a third of the sends are acked.
    async fn a_third_acked(&self) {
        while self.acked.load(Ordering::Relaxed) < 2 * self.per_client / 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Asserts the burst is still going (so what just happened hit it mid-way).
    fn assert_unfinished(&self, what: &str) {
        assert!(
            self.acked.load(Ordering::Relaxed) < 2 * self.per_client,
            "{what} during the burst"
        );
    }

    /// Every send stored once with seqs 1..=total; both clients hold every message, once,
    /// in order.
    async fn assert_nothing_lost(self) {
        let total = 2 * self.per_client;
        let mut seqs = tokio::time::timeout(Duration::from_secs(120), async {
            let mut all = Vec::new();
            for send in self.sends {
                all.extend(send.await.unwrap());
            }
            all
        })
        .await
        .expect("every send acknowledged");
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=total as u64).collect::<Vec<_>>(),
            "every send stored once"
        );
        for (who, seen) in self.seen {
            let threads = seen.await.unwrap();
            assert_eq!(threads.len(), 1);
            let messages = threads.into_values().next().unwrap();
            assert_once_in_order(who, &messages);
            assert_eq!(messages.len(), total, "{who} holds every message");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_a_burst_loses_and_duplicates_nothing() {
    let Some(cluster) = Cluster::start(3).await else {
        return;
    };
    cluster.nodes[0].user("alice").await;
    cluster.nodes[0].user("bob").await;
    // Clients reach the nodes through a balancer, as in production: alice lands on node 0,
    // bob on node 1; when node 0 dies, alice reconnects to whichever node is alive.
    let balancer = Relay::start(cluster.nodes.iter().map(|n| n.addr).collect()).await;
    let base = format!("http://{}", balancer.addr);
    let (alice, alice_events) = client_at(&base, "alice").await;
    let (bob, bob_events) = client_at(&base, "bob").await;
    let burst = Burst::start(
        (&alice, alice_events, "alice"),
        (&bob, bob_events, "bob"),
        300,
    );

    burst.a_third_acked().await;
    let mut cluster = cluster;
    cluster.nodes[0].kill_hard();
    burst.assert_unfinished("killed");

    burst.assert_nothing_lost().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_during_a_burst_loses_nothing() {
    if nats_url().is_none() {
        return;
    }
    let mut nats = PrivateNats::start();
    let Some(cluster) = Cluster::start_with(2, &nats.url()).await else {
        return;
    };
    cluster.nodes[0].user("alice").await;
    cluster.nodes[1].user("bob").await;
    let (alice, alice_events) = cluster.client(0, "alice").await;
    let (bob, bob_events) = cluster.client(1, "bob").await;
    let burst = Burst::start(
        (&alice, alice_events, "alice"),
        (&bob, bob_events, "bob"),
        300,
    );

    burst.a_third_acked().await;
    nats.kill();
    burst.assert_unfinished("NATS stopped");
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart();

    burst.assert_nothing_lost().await;
    // Both nodes are back on the bus without a restart.
    for node in &cluster.nodes {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let health: serde_json::Value = reqwest::get(node.url("/healthz"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if health["bus"] == "ok" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node did not reconnect to NATS"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_nodes_and_a_dead_node_takes_its_users_offline() {
    let Some(nats) = nats_url() else { return };
    let Some(mut cluster) =
        Cluster::start_with_args(2, &nats, &["--heartbeat-timeout", "1.5"]).await
    else {
        return;
    };
    let alice = cluster.nodes[0].user("alice").await;
    let bob = cluster.nodes[1].user("bob").await;
    let mut a = alice.connect(&cluster.nodes[0]).await;
    let mut b = bob.connect(&cluster.nodes[1]).await;
    send(&mut a, "bob", "p", "hi").await;
    let presence = json!({"type": "presence", "user": "alice"});

    // alice is connected to node 0 only; bob asks node 1.
    let query = b.request(presence.clone()).await;
    assert_eq!(query["online"], true, "{query}");

    // A second device on node 1, then the first closes: still online, across nodes.
    let alice_tab = cluster.nodes[1].login("alice").await;
    let tab = alice_tab.connect(&cluster.nodes[1]).await;
    a.close().await;
    let query = b.request(presence.clone()).await;
    assert_eq!(
        query["online"], true,
        "online while any node holds a device: {query}"
    );

    // The node holding her last device dies without a word: offline within the timeout.
    // Node 1 holds it, so move bob to node 0 first.
    drop(tab);
    let alice_again = alice.connect(&cluster.nodes[1]).await;
    let mut b0 = bob.connect(&cluster.nodes[0]).await;
    let query = b0.request(presence.clone()).await;
    assert_eq!(query["online"], true, "{query}");
    cluster.nodes[1].kill_hard();
    drop(alice_again);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let query = b0.request(presence.clone()).await;
        if query["online"] == false {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still online long after her node died: {query}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_receipts_and_group_changes_cross_nodes() {
    let Some(cluster) = Cluster::start(2).await else {
        return;
    };
    let alice = cluster.nodes[0].user("alice").await;
    let bob = cluster.nodes[1].user("bob").await;
    let mut a = alice.connect(&cluster.nodes[0]).await;
    let mut b = bob.connect(&cluster.nodes[1]).await;

    let sent = send(&mut a, "bob", "m1", "hello across nodes").await;
    let thread_id = sent["thread_id"].clone();
    let message = b.event_of("message").await;
    assert_eq!(message["body"], "hello across nodes");

    b.request(json!({"type": "mark", "thread_id": thread_id, "kind": "read", "seq": 1}))
        .await;
    let receipt = a.event_of("receipt").await;
    assert_eq!(receipt["user_id"], bob.user_id.as_str(), "{receipt}");
    assert_eq!(receipt["kind"], "read");

    b.request(json!({"type": "typing", "thread_id": thread_id, "active": true}))
        .await;
    let typing = a.event_of("typing").await;
    assert_eq!(typing["user_id"], bob.user_id.as_str(), "{typing}");

    let created = a
        .request(json!({"type": "create_group", "title": "across", "members": ["bob"]}))
        .await;
    assert_eq!(created["type"], "group", "{created}");
    let system = b.event_of("message").await;
    assert_eq!(system["kind"], "system", "{system}");
    assert_eq!(system["thread_id"], created["group"]["thread_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_reconnects_keep_receiving_from_other_nodes() {
    let Some(cluster) = Cluster::start(2).await else {
        return;
    };
    let alice = cluster.nodes[0].user("alice").await;
    let bob = cluster.nodes[1].user("bob").await;
    let mut a = alice.connect(&cluster.nodes[0]).await;
    // Close and reopen at once, again and again: each close may still be finishing when
    // the next connection opens.
    let mut b = bob.connect(&cluster.nodes[1]).await;
    for _ in 0..5 {
        let next = bob.connect(&cluster.nodes[1]).await;
        b.close().await;
        b = next;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    send(&mut a, "bob", "after", "still subscribed").await;
    let message = b.event_of("message").await;
    assert_eq!(message["body"], "still subscribed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_going_away_fails_sends_retryably_and_the_node_recovers() {
    let Some(nats) = nats_url() else { return };
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    // The node reaches PostgreSQL through a relay the test can cut.
    let url = database.url();
    let (host_port, rest) = host_port_of(&url);
    let relay = Relay::start(vec![host_port.parse().expect("PostgreSQL at host:port")]).await;
    let through_relay = format!("{}{}{}", &url[..rest.0], relay.addr, &url[rest.1..]);
    let node = Server::start(&["--database", &through_relay, "--bus", &nats]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = alice.connect(&node).await;
    let mut b = bob.connect(&node).await;
    send(&mut a, "bob", "before", "before the outage").await;
    b.event_of("message").await;

    relay.cut();
    let refused = a
        .request(json!({"type": "send", "to": "bob", "client_msg_id": "during", "body": "during"}))
        .await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(
        refused["code"], "unavailable",
        "a clear, retryable error: {refused}"
    );
    let health = reqwest::get(node.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 503);

    relay.restore().await;
    // The client retries with the same client_msg_id until the node is back.
    let deadline = tokio::time::Instant::now() + WAIT;
    let acked = loop {
        let answer = a
            .request(
                json!({"type": "send", "to": "bob", "client_msg_id": "during", "body": "during"}),
            )
            .await;
        if answer["type"] == "sent" {
            break answer;
        }
        assert_eq!(answer["code"], "unavailable", "{answer}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node did not recover"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        acked["seq"], 2,
        "nothing was stored by the refused attempt: {acked}"
    );
    let message = b.event_of("message").await;
    assert_eq!(message["body"], "during");
    b.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(
        reqwest::get(node.url("/healthz")).await.unwrap().status(),
        200
    );
    drop(node);
}

/// The `host:port` of a URL, and the byte range it spans.
fn host_port_of(url: &str) -> (&str, (usize, usize)) {
    let start = url
        .find('@')
        .map_or_else(|| url.find("://").unwrap() + 3, |at| at + 1);
    let end = url[start..].find('/').map_or(url.len(), |at| start + at);
    (&url[start..end], (start, end))
}

#[tokio::test]
async fn healthz_reports_the_store_and_the_bus() {
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let health: serde_json::Value = reqwest::get(cluster.nodes[0].url("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        health,
        json!({"status": "ok", "store": "ok", "bus": "ok", "connections": 0})
    );
}

/// A `nats-server` of the test's own, restartable on the same port.
struct PrivateNats {
    child: Child,
    port: u16,
}

impl PrivateNats {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            child: Self::spawn(port),
            port,
        }
    }

    fn spawn(port: u16) -> Child {
        let binary = [
            "nats-server",
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
        ]
        .into_iter()
        .find(|path| {
            Command::new(path)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok()
        })
        .expect("nats-server is installed (scripts/test installs it)");
        let child = Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.child = Self::spawn(self.port);
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP relay, like HAProxy in production: each new connection goes to the next target
/// that accepts it. It can be cut (every relayed connection dropped, nothing accepted)
/// and restored on the same address, to make a service unreachable and back.
struct Relay {
    addr: SocketAddr,
    targets: Arc<Vec<SocketAddr>>,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(targets: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Self {
            addr: listener.local_addr().unwrap(),
            targets: Arc::new(targets),
            tasks: Arc::default(),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&self, listener: TcpListener) {
        let targets = self.targets.clone();
        let tasks = self.tasks.clone();
        let next = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let targets = targets.clone();
                let start = next.fetch_add(1, Ordering::Relaxed);
                let relayed = tokio::spawn(async move {
                    for offset in 0..targets.len() {
                        let target = targets[(start + offset) % targets.len()];
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
                tasks.lock().unwrap().push(relayed.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Drops every relayed connection and stops accepting.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Accepts again on the same address.
    async fn restore(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(error) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "rebind {}: {error}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        self.serve(listener);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

/// A message to more than 64 members crosses nodes as one fan-out publication, which
/// every node hears and delivers to the members it holds (and only to them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_group_message_reaches_members_on_every_node() {
    let Some(cluster) = Cluster::start(3).await else {
        return;
    };
    let owner = cluster.nodes[0].user("owner").await;
    let mut names = Vec::new();
    let mut devices = Vec::new();
    for n in 0..80 {
        let name = format!("member{n}");
        devices.push(cluster.nodes[n % 3].user(&name).await);
        names.push(name);
    }
    cluster.nodes[0].user("outsider").await;
    let mut o = owner.connect(&cluster.nodes[0]).await;
    let created = o
        .request(json!({"type": "create_group", "title": "big", "members": names}))
        .await;
    assert_eq!(created["type"], "group", "{created}");
    let thread_id = created["group"]["thread_id"].clone();
    // One member on each node, and a non-member on the second.
    let mut on_one = devices[1].connect(&cluster.nodes[1]).await;
    let mut on_two = devices[2].connect(&cluster.nodes[2]).await;
    let outsider = cluster.nodes[1].login("outsider").await;
    let mut out = outsider.connect(&cluster.nodes[1]).await;

    let published = cluster.nodes[0].metric("pigeon_bus_published_total").await;
    let sent = o
        .request(json!({"type": "send", "thread_id": thread_id, "client_msg_id": "big-1", "body": "to all 81"}))
        .await;
    assert_eq!(sent["type"], "sent", "{sent}");
    for ws in [&mut on_one, &mut on_two] {
        loop {
            let message = ws.event_of("message").await;
            if message["kind"] == "text" {
                assert_eq!(message["body"], "to all 81");
                assert_eq!(message["seq"], sent["seq"]);
                break;
            }
        }
    }
    let heard = out.drain_events(Duration::from_millis(300)).await;
    assert!(heard.iter().all(|e| e["type"] != "message"), "{heard:?}");
    // One publication for 81 recipients (one per user would be 81).
    let after = cluster.nodes[0].metric("pigeon_bus_published_total").await;
    assert_eq!(after - published, 1.0);
}

//! The store suite and cluster tests against a real PostgreSQL, each test on a database of
//! its own that is dropped afterwards.
//!
//! `PIGEON_TEST_POSTGRES_URL` names the server (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); set it to the empty string to skip these
//! tests. When it is unset and nothing answers there, the tests fail.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use pigeon_proto::{DeviceId, MarkKind, MessageKind, ThreadId, UserId};

use super::*;
use crate::testing::TestDatabase;

async fn fresh() -> Option<(Arc<dyn Store>, TestDatabase)> {
    let database = TestDatabase::create().await?;
    let store = PostgresStore::connect(&database.config())
        .await
        .expect("open postgres store");
    Some((Arc::new(store), database))
}

crate::suite::store_suite!(match fresh().await {
    Some(opened) => opened,
    None => return,
});

fn text(thread_id: ThreadId, sender_id: UserId, client_msg_id: &str) -> NewMessage {
    NewMessage {
        thread_id,
        sender_id,
        sender_device_id: DeviceId::new(),
        client_msg_id: client_msg_id.to_owned(),
        kind: MessageKind::Text,
        body: format!("body of {client_msg_id}"),
    }
}

/// Three stores on one database stand for three server nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_gap_free_seq_order_and_one_dedupe() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    // Nodes starting together migrate once, one after the other.
    let config = database.config();
    let nodes: Vec<Arc<PostgresStore>> = join_all((0..3).map(|_| PostgresStore::connect(&config)))
        .await
        .into_iter()
        .map(|node| Arc::new(node.expect("node connects")))
        .collect();
    let alice = nodes[0].create_user("alice", "h").await.unwrap().id;
    let bob = nodes[1].create_user("bob", "h").await.unwrap().id;
    let thread = nodes[2]
        .get_or_create_direct_thread(alice, bob)
        .await
        .unwrap();

    let hooks = Arc::new(Mutex::new(Vec::new()));
    let sends = (0..300).map(|n| {
        let node = n % 3;
        let hooks = hooks.clone();
        let sender = if n % 2 == 0 { alice } else { bob };
        nodes[node].append_message(
            text(thread, sender, &format!("n{n}")),
            Box::new(move |appended| {
                hooks
                    .lock()
                    .unwrap()
                    .push((node, appended.message.seq, appended.duplicate));
            }),
        )
    });
    let mut seqs: Vec<u64> = join_all(sends)
        .await
        .into_iter()
        .map(|result| result.expect("send").message.seq)
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=300).collect::<Vec<u64>>(), "unique and gap-free");

    let hooks = hooks.lock().unwrap().clone();
    assert_eq!(hooks.len(), 300, "every hook ran once");
    let mut hooked: Vec<u64> = hooks.iter().map(|(_, seq, _)| *seq).collect();
    hooked.sort_unstable();
    assert_eq!(hooked, seqs);
    for node in 0..3 {
        let order: Vec<u64> = hooks
            .iter()
            .filter(|(at, _, _)| *at == node)
            .map(|(_, seq, _)| *seq)
            .collect();
        assert!(
            order.windows(2).all(|pair| pair[0] < pair[1]),
            "node {node} ran its hooks in seq order: {order:?}"
        );
    }

    // The same resend reaches every node at once: one message, the rest duplicates of it.
    let resends =
        (0..9).map(|n| nodes[n % 3].append_message(text(thread, alice, "same"), Box::new(|_| {})));
    let resends: Vec<Appended> = join_all(resends)
        .await
        .into_iter()
        .map(|result| result.expect("resend"))
        .collect();
    assert_eq!(resends.iter().filter(|a| !a.duplicate).count(), 1);
    assert!(resends.iter().all(|a| a.message == resends[0].message));
    assert_eq!(resends[0].message.seq, 301);
    let membership = nodes[0].get_membership(thread, bob).await.unwrap();
    assert_eq!(membership.last_seq, 301);

    for node in &nodes {
        node.close().await;
    }
}

/// A resend may name another thread, or race its original on another node: either way it
/// answers with the message stored first, and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_keys_span_threads_and_nodes() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    let one = PostgresStore::connect(&database.config()).await.unwrap();
    let two = PostgresStore::connect(&database.config()).await.unwrap();
    let alice = one.create_user("alice", "h").await.unwrap().id;
    let bob = one.create_user("bob", "h").await.unwrap().id;
    let carol = one.create_user("carol", "h").await.unwrap().id;
    let with_bob = one.get_or_create_direct_thread(alice, bob).await.unwrap();
    let with_carol = two.get_or_create_direct_thread(alice, carol).await.unwrap();
    let (first, second) = tokio::join!(
        one.append_message(text(with_bob, alice, "k"), Box::new(|_| {})),
        two.append_message(text(with_carol, alice, "k"), Box::new(|_| {})),
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first.message, second.message);
    assert!(first.duplicate != second.duplicate, "one stored, one found");
    let stored_in = first.message.thread_id;
    let other = if stored_in == with_bob {
        with_carol
    } else {
        with_bob
    };
    assert_eq!(one.get_membership(other, alice).await.unwrap().last_seq, 0);
    let page = two
        .list_messages(
            stored_in,
            SeqRange {
                after: 0,
                before: u64::MAX,
            },
            PageFrom::Oldest,
            10,
        )
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    one.close().await;
    two.close().await;
}

/// A send the database itself refuses (here a body with U+0000, which the chat service
/// rejects before it gets this far) fails alone: the sends batched with it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_the_database_refuses_does_not_fail_its_batch() {
    let Some((store, _database)) = fresh().await else {
        return;
    };
    let alice = store.create_user("alice", "h").await.unwrap().id;
    let bob = store.create_user("bob", "h").await.unwrap().id;
    let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
    let mut sends: Vec<NewMessage> = (0..10)
        .map(|n| text(thread, alice, &format!("ok-{n}")))
        .collect();
    let mut bad = text(thread, bob, "bad");
    bad.body = "nul \0 inside".into();
    sends.insert(4, bad);
    let outcomes = join_all(
        sends
            .into_iter()
            .map(|msg| store.append_message(msg, Box::new(|_| {}))),
    )
    .await;
    let mut seqs = Vec::new();
    for (n, outcome) in outcomes.into_iter().enumerate() {
        if n == 4 {
            assert!(outcome.is_err(), "{outcome:?}");
        } else {
            seqs.push(outcome.unwrap().message.seq);
        }
    }
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<u64>>(),
        "stored in order, without gaps"
    );
    store.close().await;
}

/// Cutting every connection and refusing new ones makes requests fail as retryable;
/// once the database takes connections again the same store serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_as_unavailable_while_the_database_is_gone_then_recover() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresStore::connect(&database.config()).await.unwrap();
    let alice = store.create_user("alice", "h").await.unwrap().id;
    let admin = database.admin().await;
    let name = database.name();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';"
        ))
        .await
        .unwrap();

    let mut saw_unavailable = false;
    for _ in 0..50 {
        match store.get_user(alice).await {
            Err(StoreError::Unavailable(_)) => {
                saw_unavailable = true;
                break;
            }
            // The connection task may not have seen its socket close yet.
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(other) => panic!("expected Unavailable, got {other:?}"),
        }
    }
    assert!(saw_unavailable, "requests fail while the database is gone");
    assert!(matches!(
        store.set_last_seen(alice, 1).await,
        Err(StoreError::Unavailable(_))
    ));

    admin
        .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    let mut recovered = None;
    for _ in 0..5 {
        match store.get_user(alice).await {
            Ok(user) => {
                recovered = user;
                break;
            }
            Err(StoreError::Unavailable(_)) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("expected Unavailable, got {other:?}"),
        }
    }
    assert_eq!(
        recovered.map(|user| user.username).as_deref(),
        Some("alice")
    );
    store.set_last_seen(alice, 2).await.unwrap();
    store.close().await;
    assert!(matches!(
        store.get_user(alice).await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn connecting_to_nothing_is_unavailable() {
    let config = PostgresConfig {
        acquire_timeout: Duration::from_secs(2),
        ..PostgresConfig::new("postgres://postgres@127.0.0.1:1/postgres")
    };
    assert!(matches!(
        PostgresStore::connect(&config).await,
        Err(StoreError::Unavailable(_))
    ));
    let config = PostgresConfig::new("not a url ://");
    assert!(matches!(
        PostgresStore::connect(&config).await,
        Err(StoreError::Internal(_))
    ));
}

/// Large groups' member lists come from each node's cache; a membership change made on
/// another node must show in the very next send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_member_lists_follow_changes_made_on_other_nodes() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    let one = PostgresStore::connect(&database.config()).await.unwrap();
    let two = PostgresStore::connect(&database.config()).await.unwrap();
    let mut users = Vec::new();
    for n in 0..members::INLINE_MEMBERS + 6 {
        users.push(one.create_user(&format!("u{n}"), "h").await.unwrap().id);
    }
    let (owner, late) = (users[0], users[users.len() - 1]);
    let limits = GroupLimits {
        max_members: 1000,
        max_groups_per_user: 10,
    };
    let actor = Actor {
        user_id: owner,
        device_id: DeviceId::new(),
    };
    let group = NewGroup {
        title: "big".into(),
        topic: None,
        avatar: None,
        share_history: false,
        members: users[1..users.len() - 1].to_vec(),
    };
    let thread = one
        .create_group(actor, group, limits, Box::new(|_| {}))
        .await
        .unwrap()
        .group
        .thread_id;
    let message = |n: u32| text(thread, owner, &format!("big{n}"));
    let send = async |store: &PostgresStore, n: u32| {
        store.append_message(message(n), Box::new(|_| {})).await
    };
    let first = send(&one, 0).await.unwrap();
    assert_eq!(first.members.len(), users.len() - 1);
    assert!(!first.members.contains(&late));
    // Served from node one's cache now; node two adds a member behind its back.
    assert_eq!(send(&one, 1).await.unwrap().members, first.members);
    two.change_group(
        actor,
        thread,
        GroupChange::AddMembers(vec![late]),
        limits,
        Box::new(|_| {}),
    )
    .await
    .unwrap();
    let after_add = send(&one, 2).await.unwrap();
    assert!(after_add.members.contains(&late), "node one saw the add");
    assert_eq!(one.get_members(thread).await.unwrap(), after_add.members);
    two.change_group(
        actor,
        thread,
        GroupChange::RemoveMember(late),
        limits,
        Box::new(|_| {}),
    )
    .await
    .unwrap();
    let marker = one
        .set_marker(thread, owner, MarkKind::Read, 1)
        .await
        .unwrap();
    assert!(!marker.members.contains(&late), "node one saw the removal");
    assert!(!send(&one, 3).await.unwrap().members.contains(&late));
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn sessions_end_when_idle_inside_a_transaction() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresStore::connect(&database.config()).await.unwrap();
    let client = store.shared.client().await.unwrap();
    let row = client
        .query_one("SHOW idle_in_transaction_session_timeout", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "30s");
    drop(client);
    store.close().await;
}

#[tokio::test]
async fn a_user_given_several_events_at_once_gets_consecutive_seqs() {
    use pigeon_proto::UserEvent;

    let Some(database) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresStore::connect(&database.config())
        .await
        .expect("open postgres store");
    let alice = store.create_user("alice", "h").await.unwrap().id;
    let bob = store.create_user("bob", "h").await.unwrap().id;
    let privacy = |hide_last_seen| UserEvent::Privacy { hide_last_seen };
    let events = vec![
        (alice, privacy(true)),
        (bob, privacy(true)),
        (alice, privacy(false)),
    ];
    let records = store
        .shared
        .transaction(&events, |tx, events| {
            Box::pin(user_events::append_user_events(tx, events.to_vec()))
        })
        .await
        .expect("appended");
    let seqs: Vec<(UserId, u64)> = records
        .iter()
        .map(|(user, record)| (*user, record.seq))
        .collect();
    assert_eq!(seqs, vec![(alice, 1), (bob, 1), (alice, 2)]);

    let page = user_events::list_user_events(&store.shared, alice, 0, 10)
        .await
        .expect("listed");
    assert_eq!(page.last_seq, 2);
    let kept: Vec<(u64, UserEvent)> = page
        .events
        .into_iter()
        .map(|record| (record.seq, record.event))
        .collect();
    assert_eq!(kept, vec![(1, privacy(true)), (2, privacy(false))]);

    // Two events at once whose first seq is a pruning point (1,100) prune the log too,
    // though the last one (1,101) is not.
    let client = store.shared.client().await.expect("client");
    client
        .execute(
            "UPDATE users SET last_event_seq = 1099 WHERE id = $1",
            &[alice.as_uuid()],
        )
        .await
        .expect("moved the log's head");
    let events = vec![(alice, privacy(true)), (alice, privacy(false))];
    store
        .shared
        .transaction(&events, |tx, events| {
            Box::pin(user_events::append_user_events(tx, events.to_vec()))
        })
        .await
        .expect("appended");
    let page = user_events::list_user_events(&store.shared, alice, 0, 10)
        .await
        .expect("listed");
    let seqs: Vec<u64> = page.events.iter().map(|record| record.seq).collect();
    assert_eq!(seqs, vec![1100, 1101], "seqs 1 and 2 were pruned");
    assert!(page.reset);
}

//! The behaviour every [`Store`] backend must have, run against each backend by
//! `store_suite!` (quickwit's metastore suite, in small).

use std::sync::{Arc, Mutex};

use futures::future::join_all;
use pigeon_proto::{DeviceId, MarkKind, MessageKind, ThreadId, UserId};

use crate::{
    Actor, GroupChange, GroupLimits, NewGroup, NewMessage, PageFrom, SeqRange, SettingsPatch,
    Store, StoreError,
};
use pigeon_proto::{ContactAction, ContactState, Role, SystemEvent, UserEvent};

/// Generates one `#[tokio::test]` per suite function, each on a fresh store from `$open`,
/// an expression giving `(Arc<dyn Store>, guard)`; the guard lives as long as the test.
macro_rules! store_suite {
    ($open:expr) => {
        $crate::suite::store_suite!(@tests $open;
            users_are_unique_by_username,
            devices_are_found_by_token_and_deleted_only_by_their_owner,
            one_direct_thread_per_pair,
            seqs_are_gap_free_under_concurrent_senders,
            resends_are_deduplicated,
            sends_queued_together_each_get_their_own_answer,
            one_call_of_many_sends_keeps_its_order,
            commit_hooks_run_in_seq_order,
            only_members_may_append_or_mark,
            markers_only_move_forward,
            pages_come_from_either_end_of_a_range,
            thread_list_is_most_recent_first_with_unread,
            groups_record_changes_as_system_messages,
            blocks_stop_direct_messages_and_group_adds,
            user_events_replay_settings_changes,
            group_changes_and_sends_share_one_seq_order,
            user_event_seqs_are_gap_free_under_concurrent_writers,
            crossed_friend_requests_make_friends,
            concurrent_group_adds_respect_the_per_user_limit,
        );
    };
    (@tests $open:expr; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $open;
                $crate::suite::$name(store.as_ref()).await;
                store.close().await;
            }
        )+
    };
}

async fn user(store: &dyn Store, name: &str) -> UserId {
    store
        .create_user(name, "$argon2id$fake")
        .await
        .expect("create user")
        .id
}

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

async fn append(store: &dyn Store, msg: NewMessage) -> Result<crate::Appended, StoreError> {
    store.append_message(msg, Box::new(|_| {})).await
}

pub(crate) async fn users_are_unique_by_username(store: &dyn Store) {
    let alice = user(store, "alice").await;
    assert!(matches!(
        store.create_user("alice", "x").await,
        Err(StoreError::Conflict)
    ));
    let by_name = store.get_user_by_username("alice").await.unwrap().unwrap();
    assert_eq!(by_name.id, alice);
    assert_eq!(
        store.get_user(alice).await.unwrap().unwrap().username,
        "alice"
    );
    assert!(store.get_user_by_username("bob").await.unwrap().is_none());
    store.set_last_seen(alice, 42).await.unwrap();
    assert_eq!(
        store.get_user(alice).await.unwrap().unwrap().last_seen_at,
        Some(42)
    );
}

pub(crate) async fn devices_are_found_by_token_and_deleted_only_by_their_owner(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let laptop = store.create_device(alice, "laptop", [1; 32]).await.unwrap();
    let phone = store.create_device(alice, "phone", [2; 32]).await.unwrap();
    assert!(matches!(
        store.create_device(bob, "copy", [1; 32]).await,
        Err(StoreError::Conflict)
    ));

    let (device, owner) = store.get_device_by_token([2; 32]).await.unwrap().unwrap();
    assert_eq!((device.id, owner.id), (phone.id, alice));
    assert!(store.get_device_by_token([3; 32]).await.unwrap().is_none());
    let names: Vec<String> = store
        .list_devices(alice)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["laptop", "phone"]);

    assert!(
        !store.delete_device(bob, laptop.id).await.unwrap(),
        "not bob's device"
    );
    assert!(store.delete_device(alice, laptop.id).await.unwrap());
    assert!(store.get_device_by_token([1; 32]).await.unwrap().is_none());
    store.touch_device(phone.id, 7).await.unwrap();
    assert_eq!(
        store.list_devices(alice).await.unwrap()[0].last_seen_at,
        Some(7)
    );
}

pub(crate) async fn one_direct_thread_per_pair(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let carol = user(store, "carol").await;
    let mut creations = Vec::new();
    for n in 0..10 {
        let (a, b) = if n % 2 == 0 {
            (alice, bob)
        } else {
            (bob, alice)
        };
        creations.push(store.get_or_create_direct_thread(a, b));
    }
    let ids = join_all(creations).await;
    assert!(
        ids.iter()
            .all(|id| id.as_ref().unwrap() == ids[0].as_ref().unwrap())
    );
    let other = store
        .get_or_create_direct_thread(alice, carol)
        .await
        .unwrap();
    assert_ne!(&other, ids[0].as_ref().unwrap());
    let peers = store.list_presence_audience(alice).await.unwrap();
    assert_eq!(peers.len(), 2);
    assert!(peers.contains(&bob) && peers.contains(&carol));
}

pub(crate) async fn seqs_are_gap_free_under_concurrent_senders(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
    let sends = (0..200).map(|n| {
        let sender = if n % 2 == 0 { alice } else { bob };
        append(store, text(thread, sender, &format!("c{n}")))
    });
    let mut seqs: Vec<u64> = join_all(sends)
        .await
        .into_iter()
        .map(|r| r.unwrap().message.seq)
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
    let membership = store.get_membership(thread, alice).await.unwrap();
    assert_eq!(membership.last_seq, 200);
}

/// Sends that wait together share one transaction in both stores: a send that breaks a
/// rule, and a key sent twice at once, must not spoil the others.
pub(crate) async fn sends_queued_together_each_get_their_own_answer(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let carol = user(store, "carol").await;
    let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
    let mut sends: Vec<NewMessage> = (0..20)
        .map(|n| {
            text(
                thread,
                if n % 2 == 0 { alice } else { bob },
                &format!("c{n}"),
            )
        })
        .collect();
    sends.insert(5, text(thread, carol, "not-a-member"));
    sends.insert(9, text(ThreadId::new(), alice, "no-such-thread"));
    for at in [3, 12, 17] {
        sends.insert(at, text(thread, alice, "twice"));
    }
    let outcomes = join_all(sends.iter().cloned().map(|msg| append(store, msg))).await;

    let mut seqs = Vec::new();
    let mut twice = Vec::new();
    for (msg, outcome) in sends.iter().zip(outcomes) {
        match msg.client_msg_id.as_str() {
            "not-a-member" => assert!(matches!(outcome, Err(StoreError::NotMember)), "{outcome:?}"),
            "no-such-thread" => {
                assert!(
                    matches!(outcome, Err(StoreError::ThreadNotFound)),
                    "{outcome:?}"
                )
            }
            key => {
                let appended = outcome.unwrap();
                assert_eq!(appended.message.client_msg_id, key);
                assert_eq!(appended.members.len(), 2);
                if key == "twice" {
                    twice.push(appended);
                } else {
                    assert!(!appended.duplicate);
                    seqs.push(appended.message.seq);
                }
            }
        }
    }
    // The key sent three times was stored once; the other two answers are that message.
    assert_eq!(twice.iter().filter(|a| !a.duplicate).count(), 1);
    assert!(twice.iter().all(|a| a.message == twice[0].message));
    seqs.push(twice[0].message.seq);
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=21).collect::<Vec<u64>>());
    assert_eq!(
        store.get_membership(thread, alice).await.unwrap().last_seq,
        21
    );
}

/// Alice, Bob and Carol, and Alice's direct threads with Bob and with Carol.
async fn alice_bob_carol(store: &dyn Store) -> (UserId, UserId, UserId, ThreadId, ThreadId) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let carol = user(store, "carol").await;
    let with_bob = store.get_or_create_direct_thread(alice, bob).await.unwrap();
    let with_carol = store
        .get_or_create_direct_thread(alice, carol)
        .await
        .unwrap();
    (alice, bob, carol, with_bob, with_carol)
}

/// `append_messages`: the sends one connection had waiting are stored in their order,
/// each with its own outcome, alongside other callers' sends.
pub(crate) async fn one_call_of_many_sends_keeps_its_order(store: &dyn Store) {
    let (alice, bob, carol, with_bob, with_carol) = alice_bob_carol(store).await;
    let bob_and_carol = store.get_or_create_direct_thread(bob, carol).await.unwrap();
    let call = |from: UserId, thread: ThreadId, prefix: &'static str| {
        let msgs = (0..30)
            .map(|n| {
                let thread = if n == 7 { bob_and_carol } else { thread };
                (
                    text(thread, from, &format!("{prefix}{n}")),
                    Box::new(|_: &crate::Appended| {}) as crate::CommitHook,
                )
            })
            .collect();
        store.append_messages(msgs)
    };
    let (mine, theirs) = tokio::join!(call(alice, with_bob, "a"), call(carol, with_carol, "c"));
    for (outcomes, thread) in [(mine, with_bob), (theirs, with_carol)] {
        assert_eq!(outcomes.len(), 30);
        let mut seqs = Vec::new();
        for (n, outcome) in outcomes.into_iter().enumerate() {
            if n == 7 && thread == with_bob {
                assert!(matches!(outcome, Err(StoreError::NotMember)), "{outcome:?}");
                continue;
            }
            if n == 7 {
                // Carol is a member of the thread with bob.
                assert_eq!(outcome.unwrap().message.thread_id, bob_and_carol);
                continue;
            }
            let appended = outcome.unwrap();
            assert_eq!(appended.message.thread_id, thread);
            seqs.push(appended.message.seq);
        }
        assert_eq!(seqs, (1..=29).collect::<Vec<u64>>(), "in the call's order");
    }
}

pub(crate) async fn resends_are_deduplicated(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
    let first = append(store, text(thread, alice, "same")).await.unwrap();
    assert!(!first.duplicate);
    // Concurrent resends in one batch and later ones all return the first message.
    let again = join_all((0..5).map(|_| append(store, text(thread, alice, "same")))).await;
    for resend in again {
        let resend = resend.unwrap();
        assert!(resend.duplicate);
        assert_eq!(resend.message, first.message);
    }
    // The key is per sender: bob may use the same client id.
    let bobs = append(store, text(thread, bob, "same")).await.unwrap();
    assert_eq!(bobs.message.seq, 2);
    let all = store
        .list_messages(
            thread,
            SeqRange {
                after: 0,
                before: u64::MAX,
            },
            PageFrom::Oldest,
            10,
        )
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
}

pub(crate) async fn commit_hooks_run_in_seq_order(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sends = (0..100).map(|n| {
        let seen = seen.clone();
        store.append_message(
            text(thread, alice, &format!("h{n}")),
            Box::new(move |appended| seen.lock().unwrap().push(appended.message.seq)),
        )
    });
    for result in join_all(sends).await {
        result.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        (1..=100).collect::<Vec<u64>>(),
        "hooks ran in commit order, once each"
    );
}

pub(crate) async fn only_members_may_append_or_mark(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let mallory = user(store, "mallory").await;
    let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
    assert!(matches!(
        append(store, text(thread, mallory, "x")).await,
        Err(StoreError::NotMember)
    ));
    assert!(matches!(
        append(store, text(ThreadId::new(), alice, "y")).await,
        Err(StoreError::ThreadNotFound)
    ));
    assert!(matches!(
        store.set_marker(thread, mallory, MarkKind::Read, 1).await,
        Err(StoreError::NotMember)
    ));
    assert!(matches!(
        store.get_membership(thread, mallory).await,
        Err(StoreError::NotMember)
    ));
    assert!(matches!(
        store.get_membership(ThreadId::new(), alice).await,
        Err(StoreError::ThreadNotFound)
    ));
    // A failed job leaves no trace and does not disturb the batch around it.
    let ok = append(store, text(thread, alice, "fine")).await.unwrap();
    assert_eq!(ok.message.seq, 1);
}

pub(crate) async fn markers_only_move_forward(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
    for n in 0..5 {
        append(store, text(thread, alice, &format!("m{n}")))
            .await
            .unwrap();
    }
    let sender = store.get_membership(thread, alice).await.unwrap();
    assert_eq!(
        (sender.read_seq, sender.delivered_seq),
        (5, 5),
        "sending moves the sender's markers"
    );

    let update = store
        .set_marker(thread, bob, MarkKind::Delivered, 3)
        .await
        .unwrap();
    assert!(update.changed && update.seq == 3);
    assert_eq!(update.members.len(), 2);
    let update = store
        .set_marker(thread, bob, MarkKind::Delivered, 2)
        .await
        .unwrap();
    assert!(!update.changed && update.seq == 3, "never backwards");
    let update = store
        .set_marker(thread, bob, MarkKind::Read, 99)
        .await
        .unwrap();
    assert_eq!(update.seq, 5, "clamped to the last seq");
    let bob_view = store.get_membership(thread, bob).await.unwrap();
    assert_eq!(
        (bob_view.read_seq, bob_view.delivered_seq),
        (5, 5),
        "read implies delivered"
    );
}

pub(crate) async fn pages_come_from_either_end_of_a_range(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
    for n in 0..10 {
        append(store, text(thread, alice, &format!("p{n}")))
            .await
            .unwrap();
    }
    let seqs = |messages: Vec<pigeon_proto::Message>| {
        messages.into_iter().map(|m| m.seq).collect::<Vec<_>>()
    };
    let range = SeqRange {
        after: 2,
        before: 9,
    };
    assert_eq!(
        seqs(
            store
                .list_messages(thread, range, PageFrom::Oldest, 3)
                .await
                .unwrap()
        ),
        [3, 4, 5]
    );
    assert_eq!(
        seqs(
            store
                .list_messages(thread, range, PageFrom::Newest, 3)
                .await
                .unwrap()
        ),
        [6, 7, 8]
    );
    let empty = store.list_messages(
        thread,
        SeqRange {
            after: 10,
            before: u64::MAX,
        },
        PageFrom::Oldest,
        5,
    );
    assert!(empty.await.unwrap().is_empty());
}

pub(crate) async fn thread_list_is_most_recent_first_with_unread(store: &dyn Store) {
    let (alice, bob, carol, with_bob, with_carol) = alice_bob_carol(store).await;
    append(store, text(with_bob, bob, "b1")).await.unwrap();
    append(store, text(with_bob, bob, "b2")).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    append(store, text(with_carol, carol, "c1")).await.unwrap();

    let threads = store.list_threads(alice).await.unwrap();
    assert_eq!(threads.len(), 2);
    assert_eq!(threads[0].thread_id, with_carol);
    assert_eq!(threads[0].peer.as_ref().unwrap().username, "carol");
    assert_eq!(
        threads[0].last_message.as_ref().unwrap().client_msg_id,
        "c1"
    );
    assert_eq!((threads[1].unread, threads[1].last_seq), (2, 2));
    assert_eq!(threads[1].peer_read_seq, Some(2), "bob read what he sent");
    assert!(store.list_threads(UserId::new()).await.unwrap().is_empty());
}

pub(crate) use store_suite;

const LIMITS: GroupLimits = GroupLimits {
    max_members: 4,
    max_groups_per_user: 10,
};

fn actor(user_id: UserId) -> Actor {
    Actor {
        user_id,
        device_id: DeviceId::new(),
    }
}

pub(crate) async fn groups_record_changes_as_system_messages(store: &dyn Store) {
    let owner = user(store, "owner").await;
    let admin = user(store, "admin").await;
    let member = user(store, "member").await;
    let late = user(store, "late").await;
    let extra = user(store, "extra").await;
    let group = NewGroup {
        title: "team".into(),
        topic: None,
        avatar: None,
        share_history: false,
        members: vec![admin, member],
    };
    let created = store
        .create_group(actor(owner), group, LIMITS, Box::new(|_| {}))
        .await
        .unwrap();
    let thread = created.group.thread_id;
    assert_eq!(created.group.member_count, 3);
    assert!(matches!(
        created.message.unwrap().system,
        Some(SystemEvent::Created { .. })
    ));
    assert_eq!(
        created.user_events.len(),
        3,
        "every member's devices learn they joined"
    );

    let change = |who, what| store.change_group(actor(who), thread, what, LIMITS, Box::new(|_| {}));
    assert!(matches!(
        change(member, GroupChange::AddMembers(vec![late])).await,
        Err(StoreError::Forbidden(_))
    ));
    assert!(matches!(
        change(admin, GroupChange::SetRole(member, Role::Admin)).await,
        Err(StoreError::Forbidden(_))
    ));
    change(owner, GroupChange::SetRole(admin, Role::Admin))
        .await
        .unwrap();
    append(store, text(thread, member, "before late"))
        .await
        .unwrap();
    let added = change(admin, GroupChange::AddMembers(vec![late]))
        .await
        .unwrap();
    let added_seq = added.message.unwrap().seq;
    assert_eq!(
        store.get_membership(thread, late).await.unwrap().joined_seq,
        added_seq - 1
    );
    store
        .set_marker(thread, owner, MarkKind::Delivered, added_seq)
        .await
        .unwrap();
    let markers: Vec<_> = store
        .list_members(thread, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.user_id, m.read_seq, m.delivered_seq))
        .collect();
    for expected in [
        // A late member's markers start at the join, never below it.
        (late, Some(added_seq - 1), Some(added_seq - 1)),
        // A change moves its actor's markers, as a send does; a receipt moves one.
        (owner, Some(added_seq - 2), Some(added_seq)),
        (admin, Some(added_seq), Some(added_seq)),
        (member, Some(added_seq - 1), Some(added_seq - 1)),
    ] {
        assert!(markers.contains(&expected), "{expected:?} in {markers:?}");
    }
    assert!(
        matches!(
            change(admin, GroupChange::AddMembers(vec![extra])).await,
            Err(StoreError::LimitExceeded(_))
        ),
        "4 members at most"
    );
    assert!(matches!(
        change(admin, GroupChange::RemoveMember(owner)).await,
        Err(StoreError::Forbidden(_))
    ));

    // The owner leaves: the admin (longest-standing admin) becomes owner.
    let left = change(owner, GroupChange::Leave).await.unwrap();
    assert_eq!(
        left.message.unwrap().system,
        Some(SystemEvent::MemberLeft {
            new_owner: Some(admin)
        })
    );
    assert!(
        left.recipients.contains(&owner),
        "the leaver sees their own leave"
    );
    assert_eq!(
        store.get_membership(thread, admin).await.unwrap().role,
        Role::Owner
    );
    for who in [admin, member, late] {
        change(who, GroupChange::Leave).await.unwrap();
    }
    let group = store.get_group(thread).await.unwrap();
    assert!(group.closed && group.member_count == 0);
}

pub(crate) async fn blocks_stop_direct_messages_and_group_adds(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
    let request = store
        .contact_action(alice, bob, ContactAction::Request)
        .await
        .unwrap();
    assert_eq!(request.contact.state, Some(ContactState::Requested));
    assert_eq!(request.user_events.len(), 2, "bob hears of the request");
    let accepted = store
        .contact_action(bob, alice, ContactAction::Accept)
        .await
        .unwrap();
    assert_eq!(accepted.contact.state, Some(ContactState::Friend));

    let blocked = store
        .contact_action(bob, alice, ContactAction::Block)
        .await
        .unwrap();
    assert_eq!(blocked.user_events.len(), 1, "alice is not told");
    assert!(store.is_blocked(bob, alice).await.unwrap());
    assert!(matches!(
        append(store, text(thread, alice, "hi")).await,
        Err(StoreError::Blocked)
    ));
    append(store, text(thread, bob, "bob may still write"))
        .await
        .unwrap();
    assert!(matches!(
        store
            .contact_action(alice, bob, ContactAction::Request)
            .await,
        Err(StoreError::Blocked)
    ));
    let group = NewGroup {
        title: "g".into(),
        topic: None,
        avatar: None,
        share_history: false,
        members: vec![bob],
    };
    assert!(matches!(
        store
            .create_group(actor(alice), group, LIMITS, Box::new(|_| {}))
            .await,
        Err(StoreError::Blocked)
    ));
    assert!(!store.can_see_presence(alice, bob).await.unwrap());
    assert!(
        store.can_see_presence(bob, alice).await.unwrap(),
        "they share a thread"
    );

    store
        .contact_action(bob, alice, ContactAction::Unblock)
        .await
        .unwrap();
    append(store, text(thread, alice, "hi again"))
        .await
        .unwrap();
}

pub(crate) async fn user_events_replay_settings_changes(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
    let patch = SettingsPatch {
        muted: Some(true),
        nickname: Some("B".into()),
        ..SettingsPatch::default()
    };
    let (settings, record) = store
        .set_thread_settings(alice, thread, patch)
        .await
        .unwrap();
    assert!(settings.muted && !settings.pinned);
    assert_eq!(record.seq, 1);
    let patch = SettingsPatch {
        pinned: Some(true),
        nickname: Some(String::new()),
        ..SettingsPatch::default()
    };
    let (settings, _) = store
        .set_thread_settings(alice, thread, patch)
        .await
        .unwrap();
    assert!(settings.muted && settings.pinned && settings.nickname.is_none());

    let page = store.list_user_events(alice, 0, 100).await.unwrap();
    assert_eq!(page.events.len(), 2);
    assert_eq!(page.last_seq, 2);
    assert!(!page.reset);
    assert!(
        matches!(&page.events[1].event, UserEvent::ThreadSettings { settings, .. } if settings.pinned)
    );
    let later = store.list_user_events(alice, 2, 100).await.unwrap();
    assert!(later.events.is_empty());
    let list = store.list_threads(alice).await.unwrap();
    assert!(list[0].muted && list[0].pinned);
}

pub(crate) async fn group_changes_and_sends_share_one_seq_order(store: &dyn Store) {
    let owner = user(store, "owner").await;
    let member = user(store, "member").await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = |seen: &Arc<Mutex<Vec<u64>>>| {
        let seen = seen.clone();
        move |seq: u64| seen.lock().unwrap().push(seq)
    };
    let group = NewGroup {
        title: "t0".into(),
        topic: None,
        avatar: None,
        share_history: true,
        members: vec![member],
    };
    let on_create = record(&seen);
    let created = store
        .create_group(
            actor(owner),
            group,
            LIMITS,
            Box::new(move |changed| on_create(changed.message.as_ref().unwrap().seq)),
        )
        .await
        .unwrap();
    let thread = created.group.thread_id;

    let sends = (0..40).map(|n| {
        let on_commit = record(&seen);
        let sender = if n % 2 == 0 { owner } else { member };
        let store = &*store;
        async move {
            store
                .append_message(
                    text(thread, sender, &format!("g{n}")),
                    Box::new(move |appended| on_commit(appended.message.seq)),
                )
                .await
                .map(|appended| appended.message.seq)
        }
    });
    let renames = (1..=10).map(|n| {
        let on_commit = record(&seen);
        let change = GroupChange::Update {
            title: Some(format!("t{n}")),
            topic: None,
            avatar: None,
            share_history: None,
        };
        let store = &*store;
        async move {
            store
                .change_group(
                    actor(owner),
                    thread,
                    change,
                    LIMITS,
                    Box::new(move |changed| on_commit(changed.message.as_ref().unwrap().seq)),
                )
                .await
                .map(|changed| changed.message.unwrap().seq)
        }
    });
    let (sent, renamed) = futures::join!(join_all(sends), join_all(renames));
    let mut seqs: Vec<u64> = sent
        .into_iter()
        .chain(renamed)
        .map(|seq| seq.unwrap())
        .collect();
    seqs.push(1);
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=51).collect::<Vec<u64>>(),
        "one gap-free seq order"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        (1..=51).collect::<Vec<u64>>(),
        "hooks of messages and group changes ran in seq order, once each"
    );
    assert_eq!(
        store.get_membership(thread, member).await.unwrap().last_seq,
        51
    );
}

pub(crate) async fn user_event_seqs_are_gap_free_under_concurrent_writers(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let thread = store.get_or_create_direct_thread(alice, bob).await.unwrap();
    for n in 0..10 {
        append(store, text(thread, bob, &format!("e{n}")))
            .await
            .unwrap();
    }
    let privacy =
        (0..10).map(|n| async move { store.set_privacy(alice, n % 2 == 0).await.unwrap().seq });
    let settings = (0..10).map(|n| async move {
        let patch = SettingsPatch {
            pinned: Some(n % 2 == 0),
            ..SettingsPatch::default()
        };
        store
            .set_thread_settings(alice, thread, patch)
            .await
            .unwrap()
            .1
            .seq
    });
    let reads = (1..=10).map(|seq| async move {
        let update = store
            .set_marker(thread, alice, MarkKind::Read, seq)
            .await
            .unwrap();
        update.user_event.map(|record| record.seq)
    });
    let (privacy, settings, reads) =
        futures::join!(join_all(privacy), join_all(settings), join_all(reads));
    let mut seqs: Vec<u64> = privacy
        .into_iter()
        .chain(settings)
        .chain(reads.into_iter().flatten())
        .collect();
    seqs.sort_unstable();
    let written = seqs.len() as u64;
    assert_eq!(
        seqs,
        (1..=written).collect::<Vec<u64>>(),
        "unique and gap-free"
    );
    let page = store.list_user_events(alice, 0, 100).await.unwrap();
    assert_eq!(page.last_seq, written);
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=written).collect::<Vec<u64>>()
    );
    assert_eq!(
        store.get_membership(thread, alice).await.unwrap().read_seq,
        10
    );
}

pub(crate) async fn crossed_friend_requests_make_friends(store: &dyn Store) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let (from_alice, from_bob) = futures::join!(
        store.contact_action(alice, bob, ContactAction::Request),
        store.contact_action(bob, alice, ContactAction::Request),
    );
    from_alice.unwrap();
    from_bob.unwrap();
    for (owner, peer) in [(alice, bob), (bob, alice)] {
        let contacts = store.list_contacts(owner).await.unwrap();
        assert_eq!(contacts.len(), 1);
        assert_eq!(contacts[0].user_id, peer);
        assert_eq!(contacts[0].state, Some(ContactState::Friend));
    }
}

pub(crate) async fn concurrent_group_adds_respect_the_per_user_limit(store: &dyn Store) {
    let popular = user(store, "popular").await;
    let mut creators = Vec::new();
    for n in 0..5 {
        creators.push(user(store, &format!("creator{n}")).await);
    }
    let limits = GroupLimits {
        max_members: 4,
        max_groups_per_user: 2,
    };
    let creations = creators.iter().map(|creator| {
        let group = NewGroup {
            title: "g".into(),
            topic: None,
            avatar: None,
            share_history: false,
            members: vec![popular],
        };
        store.create_group(actor(*creator), group, limits, Box::new(|_| {}))
    });
    let results = join_all(creations).await;
    let created = results.iter().filter(|result| result.is_ok()).count();
    assert_eq!(created, 2, "popular joins at most 2 groups");
    assert!(
        results
            .iter()
            .filter_map(|result| result.as_ref().err())
            .all(|error| matches!(error, StoreError::LimitExceeded(_)))
    );
}

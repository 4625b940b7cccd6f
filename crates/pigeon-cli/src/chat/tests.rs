//! The chat screen's logic and rendering, without a terminal or a server.

use pigeon_client::{Event, Sent, Target};
use pigeon_proto::{
    MarkKind, Message, MessageId, MessageKind, ServerFrame, ThreadId, ThreadKind, ThreadSummary,
    UserId, UserRef,
};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::app::{Action, App, SendState};
use super::ui;

fn summary(thread_id: ThreadId, peer: &UserRef, unread: u64) -> ThreadSummary {
    ThreadSummary {
        thread_id,
        kind: ThreadKind::Direct,
        peer: Some(peer.clone()),
        last_seq: unread,
        last_message: None,
        unread,
        muted: false,
        pinned: false,
        archived: false,
        nickname: None,
        group: None,
        role: None,
        joined_seq: 0,
        read_seq: 0,
        delivered_seq: 0,
        peer_read_seq: Some(0),
        peer_delivered_seq: Some(0),
        updated_at: 0,
    }
}

fn message(thread_id: ThreadId, seq: u64, sender: UserId, body: &str) -> Message {
    Message {
        thread_id,
        seq,
        message_id: MessageId::new(),
        sender_id: sender,
        sender_device_id: pigeon_proto::DeviceId::new(),
        client_msg_id: format!("m{seq}"),
        kind: MessageKind::Text,
        body: body.into(),
        system: None,
        created_at: 0,
    }
}

fn render(app: &App, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|frame| ui::draw(frame, app)).unwrap();
    let buffer = terminal.backend().buffer().clone();
    (0..buffer.area.height)
        .map(|y| {
            (0..buffer.area.width)
                .map(|x| buffer[(x, y)].symbol())
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

fn setup() -> (App, ThreadId, ThreadId, UserRef) {
    let me = UserId::new();
    let bob = UserRef {
        user_id: UserId::new(),
        username: "bob".into(),
    };
    let carol = UserRef {
        user_id: UserId::new(),
        username: "carol".into(),
    };
    let (with_bob, with_carol) = (ThreadId::new(), ThreadId::new());
    let mut app = App::new(me, "alice");
    let actions = app.set_threads(vec![
        summary(with_bob, &bob, 2),
        summary(with_carol, &carol, 1),
    ]);
    assert_eq!(
        actions,
        vec![Action::LoadHistory(with_bob)],
        "the selected conversation loads its history"
    );
    let actions = app.set_history(
        with_bob,
        vec![
            message(with_bob, 1, bob.user_id, "hi alice"),
            message(with_bob, 2, bob.user_id, "are you there?"),
        ],
    );
    assert_eq!(
        actions,
        vec![Action::Mark {
            thread_id: with_bob,
            seq: 2
        }],
        "what is on screen is read"
    );
    app.on_client_event(Event::Connected(pigeon_client::TransportKind::WebSocket));
    (app, with_bob, with_carol, bob)
}

#[test]
fn the_main_screen_shows_conversations_unread_and_messages() {
    let (mut app, _, _, bob) = setup();
    app.on_client_event(Event::Other(ServerFrame::Presence {
        id: None,
        user_id: bob.user_id,
        username: "bob".into(),
        online: true,
        last_seen: None,
    }));
    let screen = render(&app, 100, 20);
    assert!(screen.contains("conversations · 1 unread"), "{screen}");
    assert!(screen.contains("● bob"), "presence dot: {screen}");
    assert!(screen.contains("carol (1)"), "{screen}");
    assert!(screen.contains("bob: hi alice"), "{screen}");
    assert!(screen.contains("bob: are you there?"), "{screen}");
    assert!(screen.contains("Enter send"), "{screen}");
}

#[test]
fn my_messages_go_from_pending_to_read() {
    let (mut app, with_bob, _, bob) = setup();
    for c in "on my way".chars() {
        app.on_key(key(KeyCode::Char(c)));
    }
    let actions = app.on_key(key(KeyCode::Enter));
    let [
        Action::Send {
            target,
            client_msg_id,
            body,
        },
    ] = actions.as_slice()
    else {
        panic!("{actions:?}")
    };
    assert_eq!(
        (target, body.as_str()),
        (&Target::Thread(with_bob), "on my way")
    );
    assert!(render(&app, 100, 20).contains("me: on my way  [pending]"));

    app.on_client_event(Event::Sent(Sent {
        client_msg_id: client_msg_id.clone(),
        thread_id: with_bob,
        seq: 3,
        message_id: MessageId::new(),
        server_time: 0,
    }));
    assert!(render(&app, 100, 20).contains("[sent]"));
    let receipt = |kind| {
        Event::Other(ServerFrame::Receipt {
            thread_id: with_bob,
            user_id: bob.user_id,
            kind,
            seq: 3,
        })
    };
    app.on_client_event(receipt(MarkKind::Delivered));
    assert!(render(&app, 100, 20).contains("[delivered]"));
    app.on_client_event(receipt(MarkKind::Read));
    assert!(render(&app, 100, 20).contains("me: on my way  [read]"));
    let line = &app.current().unwrap().lines[2];
    assert_eq!(App::state_of(app.current().unwrap(), line), SendState::Read);
}

#[test]
fn new_messages_reorder_the_list_and_count_unless_on_screen() {
    let (mut app, with_bob, with_carol, _) = setup();
    let carol_id = UserId::new();
    let actions = app.on_client_event(Event::Message(message(with_carol, 2, carol_id, "ping")));
    assert!(actions.is_empty(), "not on screen: no read marker");
    assert_eq!(
        app.conversations[0].thread_id, with_carol,
        "most recent first"
    );
    assert_eq!(app.conversations[0].unread, 2);
    assert_eq!(
        app.current().unwrap().thread_id,
        with_bob,
        "the selection stays"
    );
    let actions = app.on_client_event(Event::Message(message(with_bob, 3, UserId::new(), "here")));
    assert_eq!(
        actions,
        vec![Action::Mark {
            thread_id: with_bob,
            seq: 3
        }]
    );
}

#[test]
fn the_reconnect_banner_and_the_help_overlay() {
    let (mut app, _, _, _) = setup();
    app.on_client_event(Event::Disconnected("connection refused".into()));
    assert!(render(&app, 100, 20).contains("reconnecting… (connection refused)"));
    app.on_key(key(KeyCode::F(1)));
    let screen = render(&app, 100, 20);
    assert!(
        screen.contains("help") && screen.contains("start a conversation with bob"),
        "{screen}"
    );
    app.on_key(key(KeyCode::Esc));
    assert!(!render(&app, 100, 20).contains("start a conversation with bob"));
    app.on_client_event(Event::Connected(pigeon_client::TransportKind::WebSocket));
    assert!(!render(&app, 100, 20).contains("reconnecting"));
}

#[test]
fn a_narrow_screen_shows_the_conversation_only() {
    let (app, _, _, _) = setup();
    let screen = render(&app, 40, 16);
    assert!(screen.contains("bob: hi alice"), "{screen}");
    assert!(!screen.contains("conversations ·"), "{screen}");
}

#[test]
fn a_receipt_that_comes_before_the_list_naming_its_chat_is_kept() {
    let (mut app, _, _, _) = setup();
    let dave = UserRef {
        user_id: UserId::new(),
        username: "dave".into(),
    };
    let with_dave = ThreadId::new();
    // Dave's client marked our first message delivered before our list has the chat.
    app.on_client_event(Event::Other(ServerFrame::Receipt {
        thread_id: with_dave,
        user_id: dave.user_id,
        kind: MarkKind::Delivered,
        seq: 1,
    }));
    // The list, read before dave's marker moved, still says 0.
    let mut listed: Vec<ThreadSummary> = app
        .conversations
        .iter()
        .map(|c| {
            let peer = UserRef {
                user_id: c.peer.unwrap(),
                username: app.name_of(c.peer.unwrap()),
            };
            summary(c.thread_id, &peer, 0)
        })
        .collect();
    listed.push(summary(with_dave, &dave, 0));
    app.set_threads(listed);
    let conversation = app
        .conversations
        .iter()
        .find(|c| c.thread_id == with_dave)
        .expect("listed");
    assert_eq!(
        (conversation.others_delivered, conversation.others_read),
        (1, 0)
    );
}

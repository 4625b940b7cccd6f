//! `pigeon chat`: the terminal client. The state and keys live in [`app`], drawing in
//! [`ui`]; this module connects them to the terminal and the server.

pub(crate) mod app;
pub(crate) mod ui;

use std::time::{Duration, Instant};

use app::{Action, App};
use pigeon_client::{Client, ClientConfig, Rpc, StartFrom};
use pigeon_proto::{ClientFrame, Message, ServerFrame, ThreadId, ThreadSummary};
use ratatui::crossterm::event::{self, Event as TermEvent};
use tokio::sync::mpsc;

use crate::commands::{config_dir, load_session};

/// Results of background requests, fed back to the app.
enum Update {
    Threads(Vec<ThreadSummary>),
    Presence(ServerFrame),
    History(ThreadId, Vec<Message>),
    SendFailed(String, String),
}

/// At most one typing notice per conversation this often (the server throttles too).
const TYPING_EVERY: Duration = Duration::from_secs(3);

pub(crate) async fn run() -> anyhow::Result<()> {
    let saved = load_session()?;
    let rpc = Rpc::new(&saved.server, &saved.session.token);
    let mut config = ClientConfig::new(&saved.server, &saved.session.token);
    config.start = StartFrom::Now;
    // Unsent messages and sync positions survive quitting and restarting the chat.
    config.cache = Some(config_dir()?.join(format!("chat-{}.db", saved.session.username)));
    let cache_path = config.cache.clone().expect("set above");
    let (client, mut events) = Client::connect(config)?;
    let mut app = App::new(saved.session.user_id, &saved.session.username);
    // What was seen last time shows at once, even with the server down.
    let cache = pigeon_client::Cache::open(&cache_path)?;
    let mut actions = app.set_threads(cache.threads()?);
    let cache = std::sync::Arc::new(std::sync::Mutex::new(cache));

    let mut terminal = ratatui::init();
    let (keys_tx, mut keys_rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while let Ok(event) = event::read() {
            if keys_tx.send(event).is_err() {
                break;
            }
        }
    });
    let (updates_tx, mut updates_rx) = mpsc::unbounded_channel();
    let mut last_typing: Option<(ThreadId, Instant)> = None;
    actions.push(Action::Refresh);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let result = loop {
        let mut quit = false;
        for action in actions.drain(..) {
            match action {
                Action::Quit => quit = true,
                Action::Typing(thread_id) => {
                    if last_typing
                        .is_none_or(|(t, at)| t != thread_id || at.elapsed() > TYPING_EVERY)
                    {
                        last_typing = Some((thread_id, Instant::now()));
                        let rpc = rpc.clone();
                        tokio::spawn(async move {
                            let _ = rpc
                                .call(&ClientFrame::Typing {
                                    id: pigeon_client::placeholder(),
                                    thread_id,
                                    active: true,
                                })
                                .await;
                        });
                    }
                }
                other => perform(other, &client, &rpc, &cache, &updates_tx),
            }
        }
        if quit {
            break Ok(());
        }
        if let Err(error) = terminal.draw(|frame| ui::draw(frame, &app)) {
            break Err(error.into());
        }
        tokio::select! {
            key = keys_rx.recv() => match key {
                Some(TermEvent::Key(key)) => actions = app.on_key(key),
                Some(_) => {}
                None => break Ok(()),
            },
            event = events.next() => match event {
                Some(event) => actions = app.on_client_event(event),
                None => break Ok(()),
            },
            Some(update) = updates_rx.recv() => actions = match update {
                Update::Threads(threads) => app.set_threads(threads),
                Update::Presence(frame) => app.on_client_event(pigeon_client::Event::Other(frame)),
                Update::History(thread_id, messages) => app.set_history(thread_id, messages),
                Update::SendFailed(client_msg_id, why) => {
                    app.send_failed(&client_msg_id, why);
                    Vec::new()
                }
            },
            _ = tick.tick() => {}
        }
    };
    ratatui::restore();
    client.close().await;
    result
}

type SharedCache = std::sync::Arc<std::sync::Mutex<pigeon_client::Cache>>;

fn perform(
    action: Action,
    client: &Client,
    rpc: &Rpc,
    cache: &SharedCache,
    updates: &mpsc::UnboundedSender<Update>,
) {
    let (rpc, cache, updates) = (rpc.clone(), cache.clone(), updates.clone());
    if let Action::Send {
        target,
        client_msg_id,
        body,
    } = action
    {
        // Queued here, in the order typed; only the wait for the ack goes to a task.
        let pending = client.queue_send(target, client_msg_id.clone(), body);
        tokio::spawn(async move {
            // Resolves when committed, across reconnects; only a refusal comes back here.
            let result = match pending {
                Ok(pending) => pending.wait().await,
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                let _ = updates.send(Update::SendFailed(client_msg_id, error.to_string()));
            }
        });
        return;
    }
    tokio::spawn(async move {
        match action {
            Action::Mark { thread_id, seq } => {
                let frame = ClientFrame::Mark {
                    id: pigeon_client::placeholder(),
                    thread_id,
                    seq,
                    kind: pigeon_proto::MarkKind::Read,
                };
                let _ = rpc.call(&frame).await;
            }
            Action::LoadHistory(thread_id) => {
                let frame = ClientFrame::History {
                    id: pigeon_client::placeholder(),
                    thread_id,
                    before: None,
                    after: None,
                    limit: Some(100),
                };
                let messages = match rpc.call(&frame).await {
                    Ok(ServerFrame::History { messages, .. }) => messages,
                    // Offline: what the cache holds.
                    _ => cache
                        .lock()
                        .map(|c| c.messages(thread_id, None, 100).unwrap_or_default())
                        .unwrap_or_default(),
                };
                let _ = updates.send(Update::History(thread_id, messages));
            }
            Action::Refresh => {
                let frame = ClientFrame::Threads {
                    id: pigeon_client::placeholder(),
                };
                let Ok(ServerFrame::Threads { threads, .. }) = rpc.call(&frame).await else {
                    return;
                };
                // Presence dots start from the current state; events keep them fresh.
                let peers: Vec<String> = threads
                    .iter()
                    .filter_map(|t| t.peer.as_ref())
                    .map(|p| p.user_id.to_string())
                    .collect();
                if let Ok(cache) = cache.lock() {
                    let _ = cache.save_threads(&threads);
                }
                let _ = updates.send(Update::Threads(threads));
                for user in peers {
                    let frame = ClientFrame::Presence {
                        id: pigeon_client::placeholder(),
                        user,
                    };
                    if let Ok(presence @ ServerFrame::Presence { .. }) = rpc.call(&frame).await {
                        let _ = updates.send(Update::Presence(presence));
                    }
                }
            }
            Action::Send { .. } | Action::Typing(_) | Action::Quit => {}
        }
    });
}

#[cfg(test)]
mod tests;

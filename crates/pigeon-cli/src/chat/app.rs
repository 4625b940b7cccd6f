//! The chat screen's state and how keys and client events change it. No terminal, no
//! network: the runner turns [`Action`]s into requests and feeds results back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pigeon_client::{Event, Sent, Target};
use pigeon_proto::{MarkKind, Message, ServerFrame, ThreadId, ThreadSummary, UserEvent, UserId};
use ratatui::crossterm::event::{
    Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, KeyModifiers,
};
use tui_input::Input;
use tui_input::backend::crossterm::EventHandler;

/// How long a typing indicator shows without a refresh, at most.
const TYPING_SHOWN: Duration = Duration::from_secs(6);

/// Where one of my messages stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendState {
    /// Not acknowledged yet (queued while offline, or in flight).
    Pending,
    /// Committed by the server.
    Sent,
    /// On a device of the other side.
    Delivered,
    /// Seen by the other side.
    Read,
    /// Refused by the server.
    Failed,
}

impl SendState {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Read => "read",
            Self::Failed => "failed",
        }
    }
}

/// One line of a conversation.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    pub(crate) seq: Option<u64>,
    pub(crate) client_msg_id: String,
    pub(crate) sender: UserId,
    pub(crate) text: String,
    pub(crate) failed: bool,
}

/// One conversation as shown.
#[derive(Debug, Clone)]
pub(crate) struct Conversation {
    pub(crate) thread_id: ThreadId,
    pub(crate) title: String,
    pub(crate) peer: Option<UserId>,
    pub(crate) online: Option<bool>,
    pub(crate) unread: u64,
    pub(crate) muted: bool,
    /// Highest seq another member has received / read.
    pub(crate) others_delivered: u64,
    pub(crate) others_read: u64,
    pub(crate) lines: Vec<Line>,
    pub(crate) typing: HashMap<UserId, Instant>,
    pub(crate) loaded: bool,
}

/// What the runner should do for the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    Send {
        target: Target,
        client_msg_id: String,
        body: String,
    },
    Mark {
        thread_id: ThreadId,
        seq: u64,
    },
    LoadHistory(ThreadId),
    Typing(ThreadId),
    Refresh,
    Quit,
}

pub(crate) struct App {
    pub(crate) me: UserId,
    pub(crate) names: HashMap<UserId, String>,
    pub(crate) conversations: Vec<Conversation>,
    pub(crate) selected: usize,
    pub(crate) input: Input,
    pub(crate) help: bool,
    /// Shown across the top while the connection is down.
    pub(crate) banner: Option<String>,
    /// The last problem worth telling, shown above the input.
    pub(crate) status: Option<String>,
    /// Lines scrolled up from the bottom of the conversation.
    pub(crate) scroll: usize,
    /// Receipts (delivered, read) for conversations not listed yet: the peer can mark a
    /// first message delivered before the list that names the new chat comes back.
    early_receipts: HashMap<ThreadId, (u64, u64)>,
}

impl App {
    pub(crate) fn new(me: UserId, my_name: &str) -> Self {
        Self {
            me,
            names: HashMap::from([(me, my_name.to_owned())]),
            conversations: Vec::new(),
            selected: 0,
            input: Input::default(),
            help: false,
            banner: Some("connecting…".into()),
            status: None,
            scroll: 0,
            early_receipts: HashMap::new(),
        }
    }

    pub(crate) fn name_of(&self, user: UserId) -> String {
        if user == self.me {
            return "me".into();
        }
        self.names
            .get(&user)
            .cloned()
            .unwrap_or_else(|| user.to_string()[..8].to_owned())
    }

    pub(crate) fn current(&self) -> Option<&Conversation> {
        self.conversations.get(self.selected)
    }

    pub(crate) fn total_unread(&self) -> u64 {
        self.conversations
            .iter()
            .filter(|c| !c.muted)
            .map(|c| c.unread)
            .sum()
    }

    /// Where one of my lines stands.
    pub(crate) fn state_of(conversation: &Conversation, line: &Line) -> SendState {
        match line.seq {
            _ if line.failed => SendState::Failed,
            None => SendState::Pending,
            Some(seq) if seq <= conversation.others_read => SendState::Read,
            Some(seq) if seq <= conversation.others_delivered => SendState::Delivered,
            Some(_) => SendState::Sent,
        }
    }

    /// Replaces the list with the server's, keeping lines already loaded.
    pub(crate) fn set_threads(&mut self, threads: Vec<ThreadSummary>) -> Vec<Action> {
        let selected = self.current().map(|c| c.thread_id);
        let mut old: HashMap<ThreadId, Conversation> = self
            .conversations
            .drain(..)
            .map(|c| (c.thread_id, c))
            .collect();
        for summary in threads {
            if let Some(peer) = &summary.peer {
                self.names.insert(peer.user_id, peer.username.clone());
            }
            let mut conversation = old
                .remove(&summary.thread_id)
                .unwrap_or_else(|| Conversation {
                    thread_id: summary.thread_id,
                    title: String::new(),
                    peer: None,
                    online: None,
                    unread: 0,
                    muted: false,
                    others_delivered: 0,
                    others_read: 0,
                    lines: Vec::new(),
                    typing: HashMap::new(),
                    loaded: false,
                });
            conversation.title = crate::commands::thread_name(&summary);
            conversation.peer = summary.peer.as_ref().map(|p| p.user_id);
            conversation.unread = summary.unread;
            conversation.muted = summary.muted;
            let (early_delivered, early_read) = self
                .early_receipts
                .remove(&summary.thread_id)
                .unwrap_or_default();
            conversation.others_delivered = conversation
                .others_delivered
                .max(summary.peer_delivered_seq.unwrap_or(0))
                .max(early_delivered);
            conversation.others_read = conversation
                .others_read
                .max(summary.peer_read_seq.unwrap_or(0))
                .max(early_read);
            self.conversations.push(conversation);
        }
        // Conversations the server no longer lists (left, removed) go, unless a message of
        // ours is still on its way there.
        self.conversations.extend(
            old.into_values()
                .filter(|c| c.lines.iter().any(|l| l.seq.is_none() && !l.failed)),
        );
        self.selected = selected
            .and_then(|id| self.conversations.iter().position(|c| c.thread_id == id))
            .unwrap_or(0);
        self.open_selected()
    }

    /// Loads the selected conversation's history once, and marks it read.
    fn open_selected(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(conversation) = self.conversations.get_mut(self.selected) {
            if !conversation.loaded {
                conversation.loaded = true;
                actions.push(Action::LoadHistory(conversation.thread_id));
            }
            actions.extend(read_all(conversation));
        }
        actions
    }

    pub(crate) fn set_history(
        &mut self,
        thread_id: ThreadId,
        messages: Vec<Message>,
    ) -> Vec<Action> {
        for message in messages {
            self.add_message(message);
        }
        match self
            .conversations
            .iter_mut()
            .position(|c| c.thread_id == thread_id)
        {
            Some(index) if index == self.selected => read_all(&mut self.conversations[index])
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Puts a message in its conversation, in seq order, replacing my pending copy.
    fn add_message(&mut self, message: Message) -> Option<usize> {
        let index = self
            .conversations
            .iter()
            .position(|c| c.thread_id == message.thread_id)?;
        let conversation = &mut self.conversations[index];
        if conversation
            .lines
            .iter()
            .any(|l| l.seq == Some(message.seq))
        {
            return Some(index);
        }
        conversation
            .lines
            .retain(|l| !(l.seq.is_none() && l.client_msg_id == message.client_msg_id));
        let text = match &message.system {
            Some(event) => format!("* {}", serde_json::to_string(event).unwrap_or_default()),
            None => message.body,
        };
        let line = Line {
            seq: Some(message.seq),
            client_msg_id: message.client_msg_id,
            sender: message.sender_id,
            text,
            failed: false,
        };
        let at = conversation
            .lines
            .iter()
            .position(|l| l.seq.is_none_or(|s| s > message.seq))
            .unwrap_or(conversation.lines.len());
        conversation.lines.insert(at, line);
        conversation.typing.remove(&message.sender_id);
        Some(index)
    }

    /// Applies a client event; returns what to do about it.
    pub(crate) fn on_client_event(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Connected(_) => {
                self.banner = None;
                vec![Action::Refresh]
            }
            Event::EventsReset => vec![Action::Refresh],
            Event::Disconnected(reason) => {
                self.banner = Some(format!("reconnecting… ({reason})"));
                Vec::new()
            }
            Event::Fatal(error) => {
                self.banner = Some(format!("stopped: {error}"));
                Vec::new()
            }
            Event::Message(message) => {
                let sender = message.sender_id;
                let seq = message.seq;
                let Some(index) = self.add_message(message) else {
                    // A conversation this screen does not know yet.
                    return vec![Action::Refresh];
                };
                // Keep the selection on the same conversation while this one moves up.
                let selected_id = self.current().map(|c| c.thread_id);
                let moved = self.conversations.remove(index);
                self.conversations.insert(0, moved);
                self.selected = selected_id
                    .and_then(|id| self.conversations.iter().position(|c| c.thread_id == id))
                    .unwrap_or(0);
                let on_screen = self.selected == 0;
                let conversation = &mut self.conversations[0];
                if sender != self.me {
                    if on_screen {
                        return vec![Action::Mark {
                            thread_id: conversation.thread_id,
                            seq,
                        }];
                    }
                    conversation.unread += 1;
                }
                Vec::new()
            }
            Event::Sent(sent) => {
                self.sent(&sent);
                Vec::new()
            }
            Event::Other(frame) => {
                self.on_frame(frame);
                Vec::new()
            }
        }
    }

    fn sent(&mut self, sent: &Sent) {
        for conversation in &mut self.conversations {
            for line in conversation
                .lines
                .iter_mut()
                .filter(|l| l.client_msg_id == sent.client_msg_id)
            {
                line.seq = Some(sent.seq);
            }
        }
    }

    /// A send the server refused: the line shows it, and the status line says why.
    pub(crate) fn send_failed(&mut self, client_msg_id: &str, why: String) {
        for conversation in &mut self.conversations {
            for line in conversation
                .lines
                .iter_mut()
                .filter(|l| l.client_msg_id == client_msg_id)
            {
                line.failed = true;
            }
        }
        self.status = Some(why);
    }

    fn on_frame(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Receipt {
                thread_id,
                user_id,
                kind,
                seq,
            } if user_id != self.me => {
                let read = if kind == MarkKind::Read { seq } else { 0 };
                if let Some(conversation) = self
                    .conversations
                    .iter_mut()
                    .find(|c| c.thread_id == thread_id)
                {
                    conversation.others_delivered = conversation.others_delivered.max(seq);
                    conversation.others_read = conversation.others_read.max(read);
                } else {
                    let early = self.early_receipts.entry(thread_id).or_default();
                    *early = (early.0.max(seq), early.1.max(read));
                }
            }
            ServerFrame::Presence {
                user_id,
                username,
                online,
                ..
            } => {
                self.names.insert(user_id, username);
                for conversation in self
                    .conversations
                    .iter_mut()
                    .filter(|c| c.peer == Some(user_id))
                {
                    conversation.online = Some(online);
                }
            }
            ServerFrame::Typing {
                thread_id,
                user_id,
                active,
                ..
            } => {
                if let Some(conversation) = self
                    .conversations
                    .iter_mut()
                    .find(|c| c.thread_id == thread_id)
                {
                    if active {
                        conversation.typing.insert(user_id, Instant::now());
                    } else {
                        conversation.typing.remove(&user_id);
                    }
                }
            }
            ServerFrame::UserEvent(record) => {
                if let UserEvent::Read { thread_id, seq } = record.event {
                    // Read on another of my devices.
                    if let Some(conversation) = self
                        .conversations
                        .iter_mut()
                        .find(|c| c.thread_id == thread_id)
                    {
                        let last = conversation
                            .lines
                            .iter()
                            .filter_map(|l| l.seq)
                            .max()
                            .unwrap_or(0);
                        if seq >= last {
                            conversation.unread = 0;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Who is typing in the selected conversation, now.
    pub(crate) fn typing_names(&self) -> Vec<String> {
        let Some(conversation) = self.current() else {
            return Vec::new();
        };
        conversation
            .typing
            .iter()
            .filter(|(_, at)| at.elapsed() < TYPING_SHOWN)
            .map(|(user, _)| self.name_of(*user))
            .collect()
    }

    /// Applies a key; returns what to do about it.
    pub(crate) fn on_key(&mut self, key: KeyEvent) -> Vec<Action> {
        if key.kind != KeyEventKind::Press {
            return Vec::new();
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        if self.help {
            if matches!(key.code, KeyCode::Esc | KeyCode::F(1) | KeyCode::Char('?')) {
                self.help = false;
            }
            return Vec::new();
        }
        match key.code {
            KeyCode::Char('c' | 'q') if ctrl => vec![Action::Quit],
            KeyCode::F(1) => {
                self.help = true;
                Vec::new()
            }
            KeyCode::Char('?') if self.input.value().is_empty() => {
                self.help = true;
                Vec::new()
            }
            KeyCode::Esc => {
                self.status = None;
                Vec::new()
            }
            KeyCode::Up | KeyCode::Char('p') if key.code == KeyCode::Up || ctrl => self.select(-1),
            KeyCode::Down | KeyCode::Char('n') if key.code == KeyCode::Down || ctrl => {
                self.select(1)
            }
            KeyCode::PageUp => {
                self.scroll += 10;
                Vec::new()
            }
            KeyCode::PageDown => {
                self.scroll = self.scroll.saturating_sub(10);
                Vec::new()
            }
            KeyCode::Enter => self.submit(),
            _ => {
                let before = self.input.value().len();
                self.input.handle_event(&TermEvent::Key(key));
                match self.current() {
                    Some(conversation) if self.input.value().len() > before => {
                        vec![Action::Typing(conversation.thread_id)]
                    }
                    _ => Vec::new(),
                }
            }
        }
    }

    fn select(&mut self, step: isize) -> Vec<Action> {
        if self.conversations.is_empty() {
            return Vec::new();
        }
        let count = self.conversations.len() as isize;
        self.selected = (self.selected as isize + step).rem_euclid(count) as usize;
        self.scroll = 0;
        self.open_selected()
    }

    /// Enter: send the line to the selected conversation, or run `/to <user> <text>`.
    fn submit(&mut self) -> Vec<Action> {
        let text = self.input.value().trim().to_owned();
        if text.is_empty() {
            return Vec::new();
        }
        self.input.reset();
        let client_msg_id = pigeon_client::new_client_msg_id();
        if let Some(rest) = text.strip_prefix("/to ") {
            let Some((user, body)) = rest.trim().split_once(' ') else {
                self.status = Some("usage: /to <username> <message>".into());
                return Vec::new();
            };
            return vec![Action::Send {
                target: Target::User(user.to_owned()),
                client_msg_id,
                body: body.to_owned(),
            }];
        }
        let me = self.me;
        let Some(conversation) = self.conversations.get_mut(self.selected) else {
            self.status =
                Some("no conversation yet: start one with /to <username> <message>".into());
            return Vec::new();
        };
        conversation.lines.push(Line {
            seq: None,
            client_msg_id: client_msg_id.clone(),
            sender: me,
            text: text.clone(),
            failed: false,
        });
        self.scroll = 0;
        vec![Action::Send {
            target: Target::Thread(conversation.thread_id),
            client_msg_id,
            body: text,
        }]
    }
}

/// Marks everything in a conversation read (when it is on screen).
fn read_all(conversation: &mut Conversation) -> Option<Action> {
    if conversation.unread == 0 {
        return None;
    }
    // Until the history is loaded there is nothing on screen to have read.
    let seq = conversation.lines.iter().filter_map(|l| l.seq).max()?;
    conversation.unread = 0;
    Some(Action::Mark {
        thread_id: conversation.thread_id,
        seq,
    })
}

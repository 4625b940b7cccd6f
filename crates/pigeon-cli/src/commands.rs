//! The client subcommands: accounts, sending, tailing, history, groups and contacts.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use pigeon_client::{Client, ClientConfig, Event, Rpc, Session, StartFrom, Target};
use pigeon_proto::{
    ClientFrame, ContactAction, ErrorCode, Message, ServerFrame, ThreadId, ThreadSummary,
};

/// Where the saved session lives: `$PIGEON_CONFIG_DIR`, else `$XDG_CONFIG_HOME/pigeon`,
/// else `~/.config/pigeon`.
pub(crate) fn config_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PIGEON_CONFIG_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(dir).join("pigeon"));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| anyhow!("HOME is not set; set PIGEON_CONFIG_DIR"))?;
    Ok(PathBuf::from(home).join(".config").join("pigeon"))
}

/// A saved login: the server and the device's token.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Saved {
    pub(crate) server: String,
    #[serde(flatten)]
    pub(crate) session: Session,
}

fn session_path() -> anyhow::Result<PathBuf> {
    Ok(config_dir()?.join("session.json"))
}

pub(crate) fn load_session() -> anyhow::Result<Saved> {
    let path = session_path()?;
    let text = std::fs::read_to_string(&path)
        .map_err(|_| anyhow!("not logged in; run `pigeon login <username>`"))?;
    serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
}

/// Writes the session readable by its owner only (0600), in a folder only they can enter.
fn save_session(saved: &Saved) -> anyhow::Result<PathBuf> {
    let path = session_path()?;
    let dir = path.parent().expect("a file in a folder");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = serde_json::to_string_pretty(saved)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(text.as_bytes())?;
    }
    #[cfg(not(unix))]
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Reads a password: a hidden prompt on a terminal, else the first line of stdin.
fn read_password(prompt: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password(prompt).context("reading the password");
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// The subcommands that talk to a server as a user.
#[derive(Subcommand)]
pub(crate) enum UserCommand {
    /// Creates an account (password from a prompt, or the first line of stdin).
    Register {
        /// The username: 3–32 of a-z 0-9 _ . -
        username: String,
        /// The server.
        #[arg(long, env = "PIGEON_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
    },
    /// Logs this machine in; the token is saved in the config folder (mode 0600).
    Login {
        /// The username.
        username: String,
        /// The server.
        #[arg(long, env = "PIGEON_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// A name for this device.
        #[arg(long, default_value = "pigeon-cli")]
        device: String,
    },
    /// Logs this machine out: the token stops working and is deleted.
    Logout,
    /// Sends a message to a user (by username) or a thread (by id); text from stdin if absent.
    Send {
        /// A username, or a thread id.
        to: String,
        /// The text.
        text: Option<String>,
    },
    /// Prints incoming events, one per line, until interrupted.
    Tail {
        /// One JSON frame per line, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Prints a thread's history (a thread id, or a username for your direct thread).
    History {
        /// A thread id or a username.
        thread: String,
        /// How many messages.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Lists your conversations with unread counts.
    Threads,
    /// Group actions.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Contact actions: request, accept, decline, cancel, remove, block, unblock.
    Contact {
        /// What to do.
        #[arg(value_parser = parse_action)]
        action: ContactAction,
        /// The user.
        user: String,
    },
    /// Lists your contact book.
    Contacts,
    /// The terminal chat: conversations, messages, sending states, live updates.
    Chat,
}

/// Group subcommands.
#[derive(Subcommand)]
pub(crate) enum GroupCommand {
    /// Creates a group with these members.
    Create {
        /// Its title.
        title: String,
        /// Its first members.
        members: Vec<String>,
    },
    /// Adds members.
    Add {
        /// The group's thread id.
        thread: ThreadId,
        /// Usernames.
        members: Vec<String>,
    },
    /// Removes a member.
    Remove {
        /// The group's thread id.
        thread: ThreadId,
        /// A username.
        user: String,
    },
    /// Leaves a group.
    Leave {
        /// The group's thread id.
        thread: ThreadId,
    },
    /// Renames a group.
    Rename {
        /// The group's thread id.
        thread: ThreadId,
        /// The new title.
        title: String,
    },
    /// Lists a group's members.
    Members {
        /// The group's thread id.
        thread: ThreadId,
    },
}

fn parse_action(text: &str) -> Result<ContactAction, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| "one of request, accept, decline, cancel, remove, block, unblock".to_owned())
}

/// How a failure ends the process: 3 for authentication, 4 for an unreachable server, 1 otherwise.
pub(crate) fn exit_code(error: &anyhow::Error) -> i32 {
    match error.downcast_ref::<pigeon_client::Error>() {
        Some(pigeon_client::Error::Server {
            code: ErrorCode::InvalidCredentials | ErrorCode::Unauthorized,
            ..
        }) => 3,
        Some(pigeon_client::Error::Disconnected(_)) => 4,
        _ => 1,
    }
}

pub(crate) async fn run(command: UserCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match command {
        UserCommand::Register { username, server } => {
            let password = read_password("password: ")?;
            pigeon_client::register(&server, &username, &password).await?;
            writeln!(
                out,
                "registered {username}; now run `pigeon login {username}`"
            )?;
        }
        UserCommand::Login {
            username,
            server,
            device,
        } => {
            let password = read_password("password: ")?;
            let session = pigeon_client::login(&server, &username, &password, &device).await?;
            let path = save_session(&Saved {
                server: server.trim_end_matches('/').to_owned(),
                session,
            })?;
            writeln!(
                out,
                "logged in as {username}; token saved in {}",
                path.display()
            )?;
        }
        UserCommand::Logout => {
            let saved = load_session()?;
            match pigeon_client::logout(&saved.server, &saved.session.token).await {
                // Revoked here, or already elsewhere: forget the local copy.
                Ok(())
                | Err(pigeon_client::Error::Server {
                    code: ErrorCode::Unauthorized,
                    ..
                }) => {
                    std::fs::remove_file(session_path()?)?;
                }
                // The server did not confirm: keep the token, so logout can be retried.
                Err(error) => return Err(error.into()),
            }
            writeln!(out, "logged out")?;
        }
        UserCommand::Send { to, text } => {
            let saved = load_session()?;
            let text = match text {
                Some(text) => text,
                None => {
                    let mut text = String::new();
                    std::io::stdin().read_to_string(&mut text)?;
                    text.trim_end_matches('\n').to_owned()
                }
            };
            if text.trim().is_empty() {
                bail!("nothing to send");
            }
            let target = match to.parse::<ThreadId>() {
                Ok(thread) => Target::Thread(thread),
                Err(_) => Target::User(to),
            };
            let sent = Rpc::new(&saved.server, &saved.session.token)
                .send_text(target, &text)
                .await?;
            writeln!(out, "sent: thread {} seq {}", sent.thread_id, sent.seq)?;
        }
        UserCommand::Tail { json } => tail(json, out).await?,
        UserCommand::Chat => crate::chat::run().await?,
        UserCommand::History { thread, limit } => {
            let saved = load_session()?;
            let rpc = Rpc::new(&saved.server, &saved.session.token);
            let threads = list_threads(&rpc).await?;
            let thread_id = resolve_thread(&threads, &thread)?;
            let frame = ClientFrame::History {
                id: pigeon_client::placeholder(),
                thread_id,
                before: None,
                after: None,
                limit: Some(limit),
            };
            let ServerFrame::History { messages, .. } = rpc.call(&frame).await? else {
                bail!("unexpected answer")
            };
            let names = Names::new(&saved.session, &threads);
            for message in &messages {
                writeln!(out, "{}", names.line(message))?;
            }
        }
        UserCommand::Threads => {
            let saved = load_session()?;
            let rpc = Rpc::new(&saved.server, &saved.session.token);
            for thread in list_threads(&rpc).await? {
                let name = thread_name(&thread);
                writeln!(
                    out,
                    "{}  {:>4} unread  {name}",
                    thread.thread_id, thread.unread
                )?;
            }
        }
        UserCommand::Group(command) => group(command, out).await?,
        UserCommand::Contact { action, user } => {
            let answer = call(ClientFrame::Contact {
                id: pigeon_client::placeholder(),
                user,
                action,
            })
            .await?;
            if let ServerFrame::Contact { contact, .. } = answer {
                let state = contact.state.map_or("none", |s| s.as_str());
                writeln!(
                    out,
                    "{}: {state}{}",
                    contact.username,
                    if contact.blocked { ", blocked" } else { "" }
                )?;
            }
        }
        UserCommand::Contacts => {
            if let ServerFrame::Contacts { contacts, .. } = call(ClientFrame::Contacts {
                id: pigeon_client::placeholder(),
            })
            .await?
            {
                for contact in contacts {
                    let state = contact.state.map_or("-", |s| s.as_str());
                    let online = match contact.online {
                        Some(true) => " (online)",
                        _ => "",
                    };
                    writeln!(
                        out,
                        "{}  {state}{}{online}",
                        contact.username,
                        if contact.blocked { " blocked" } else { "" }
                    )?;
                }
            }
        }
    }
    Ok(())
}

async fn call(frame: ClientFrame) -> anyhow::Result<ServerFrame> {
    let saved = load_session()?;
    Ok(Rpc::new(&saved.server, &saved.session.token)
        .call(&frame)
        .await?)
}

async fn group(command: GroupCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let id = pigeon_client::placeholder();
    let frame = match command {
        GroupCommand::Create { title, members } => ClientFrame::CreateGroup {
            id,
            title,
            members,
            topic: None,
            avatar: None,
            share_history: false,
        },
        GroupCommand::Add { thread, members } => ClientFrame::AddMembers {
            id,
            thread_id: thread,
            members,
        },
        GroupCommand::Remove { thread, user } => ClientFrame::RemoveMember {
            id,
            thread_id: thread,
            user,
        },
        GroupCommand::Leave { thread } => ClientFrame::LeaveGroup {
            id,
            thread_id: thread,
        },
        GroupCommand::Rename { thread, title } => ClientFrame::UpdateGroup {
            id,
            thread_id: thread,
            title: Some(title),
            topic: None,
            avatar: None,
            share_history: None,
        },
        GroupCommand::Members { thread } => ClientFrame::GroupMembers {
            id,
            thread_id: thread,
            after: None,
            limit: Some(1000),
        },
    };
    match call(frame).await? {
        ServerFrame::Group { group, .. } => {
            writeln!(
                out,
                "{}  {}  {} members",
                group.thread_id, group.title, group.member_count
            )?;
        }
        ServerFrame::Members { members, .. } => {
            for member in members {
                writeln!(out, "{}  {}", member.username, member.role.as_str())?;
            }
        }
        other => writeln!(out, "{}", serde_json::to_string(&other)?)?,
    }
    Ok(())
}

async fn list_threads(rpc: &Rpc) -> anyhow::Result<Vec<ThreadSummary>> {
    match rpc
        .call(&ClientFrame::Threads {
            id: pigeon_client::placeholder(),
        })
        .await?
    {
        ServerFrame::Threads { threads, .. } => Ok(threads),
        _ => bail!("unexpected answer to threads"),
    }
}

fn resolve_thread(threads: &[ThreadSummary], spec: &str) -> anyhow::Result<ThreadId> {
    if let Ok(thread) = spec.parse() {
        return Ok(thread);
    }
    threads
        .iter()
        .find(|t| {
            t.peer.as_ref().is_some_and(|p| p.username == spec)
                || t.group.as_ref().is_some_and(|g| g.title == spec)
        })
        .map(|t| t.thread_id)
        .ok_or_else(|| anyhow!("no conversation with {spec}"))
}

pub(crate) fn thread_name(thread: &ThreadSummary) -> String {
    if let Some(nickname) = &thread.nickname {
        return nickname.clone();
    }
    match (&thread.peer, &thread.group) {
        (Some(peer), _) => peer.username.clone(),
        (None, Some(group)) => format!("#{}", group.title),
        (None, None) => thread.thread_id.to_string(),
    }
}

/// Names for user ids: you, and the peers of your direct threads.
pub(crate) struct Names {
    names: HashMap<pigeon_proto::UserId, String>,
}

impl Names {
    pub(crate) fn new(me: &Session, threads: &[ThreadSummary]) -> Self {
        let mut names: HashMap<_, _> = threads
            .iter()
            .filter_map(|t| t.peer.as_ref())
            .map(|p| (p.user_id, p.username.clone()))
            .collect();
        names.insert(me.user_id, me.username.clone());
        Self { names }
    }

    pub(crate) fn of(&self, user: pigeon_proto::UserId) -> String {
        self.names
            .get(&user)
            .cloned()
            .unwrap_or_else(|| user.to_string()[..8].to_owned())
    }

    /// One human line for a message.
    pub(crate) fn line(&self, message: &Message) -> String {
        match &message.system {
            Some(event) => format!(
                "{:>5}  * {} {}",
                message.seq,
                self.of(message.sender_id),
                serde_json::to_string(event).unwrap_or_default()
            ),
            None => format!(
                "{:>5}  {}: {}",
                message.seq,
                self.of(message.sender_id),
                message.body
            ),
        }
    }
}

async fn tail(json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let saved = load_session()?;
    let rpc = Rpc::new(&saved.server, &saved.session.token);
    let threads = list_threads(&rpc).await.unwrap_or_default();
    let names = Names::new(&saved.session, &threads);
    let mut config = ClientConfig::new(&saved.server, &saved.session.token);
    config.start = StartFrom::Now;
    let (_client, mut events) = Client::connect(config)?;
    while let Some(event) = events.next().await {
        let line = match (&event, json) {
            (Event::Message(message), true) => {
                serde_json::to_string(&ServerFrame::Message(message.clone()))?
            }
            (Event::Other(frame), true) => serde_json::to_string(frame)?,
            (Event::Message(message), false) => {
                format!("{}  {}", short(message.thread_id), names.line(message))
            }
            (Event::Connected(kind), false) => format!("-- connected ({kind:?})"),
            (Event::Disconnected(reason), false) => format!("-- reconnecting: {reason}"),
            (Event::Fatal(error), _) => return Err(error.clone().into()),
            (Event::Other(frame), false) => match frame {
                ServerFrame::Presence {
                    username, online, ..
                } => {
                    format!(
                        "-- {username} is {}",
                        if *online { "online" } else { "offline" }
                    )
                }
                ServerFrame::Receipt {
                    thread_id,
                    user_id,
                    kind,
                    seq,
                } => {
                    format!(
                        "{}  -- {} {kind:?} up to {seq}",
                        short(*thread_id),
                        names.of(*user_id)
                    )
                }
                ServerFrame::Typing {
                    thread_id,
                    user_id,
                    active: true,
                    ..
                } => {
                    format!("{}  -- {} is typing", short(*thread_id), names.of(*user_id))
                }
                _ => continue,
            },
            _ => continue,
        };
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(())
}

fn short(thread: ThreadId) -> String {
    thread.to_string()[..8].to_owned()
}

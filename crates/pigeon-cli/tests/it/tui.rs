//! `pigeon chat` end to end: the real binary in a real terminal (tmux), driven by keys.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{PASSWORD, Server, send};

/// A tmux server of its own, holding one window running a command.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Self {
        let socket = format!("pigeon-test-{}", uuid::Uuid::now_v7().simple());
        let status = Command::new("tmux")
            .args([
                "-L",
                &socket,
                "new-session",
                "-d",
                "-s",
                "chat",
                "-x",
                "110",
                "-y",
                "30",
                command,
            ])
            .status()
            .expect("tmux is installed");
        assert!(status.success());
        Self { socket }
    }

    fn screen(&self) -> String {
        let output = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p", "-t", "chat"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["-L", &self.socket, "send-keys", "-t", "chat"];
        args.extend_from_slice(keys);
        assert!(Command::new("tmux").args(&args).status().unwrap().success());
    }

    /// Waits until the screen shows `text`.
    async fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "screen never showed {text:?}:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

#[tokio::test]
async fn chat_sends_receives_and_survives_a_server_restart() {
    let mut server = Server::start(&[]);
    server.user("alice").await;
    let bob = server.user("bob").await;
    let config = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_pigeon");
    let mut login = Command::new(binary)
        .args(["login", "alice", "--server", &server.base_url()])
        .env("PIGEON_CONFIG_DIR", config.path())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    login
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .unwrap();
    assert!(login.wait().unwrap().success());

    let tmux = Tmux::start(&format!(
        "env PIGEON_CONFIG_DIR={} TERM=xterm-256color {binary} chat",
        config.path().display()
    ));
    tmux.wait_for("No conversations yet").await;

    // A message arrives and its conversation appears.
    let mut b = bob.connect(&server).await;
    send(&mut b, "alice", "b1", "hello alice").await;
    tmux.wait_for("bob: hello alice").await;

    // Typing and Enter send a message; bob gets it.
    tmux.keys(&["hi bob", "Enter"]);
    let event = b.event_of("message").await;
    assert_eq!(event["body"], "hi bob");
    tmux.wait_for("[sent]").await;
    b.request(json!({"type": "mark", "thread_id": event["thread_id"], "kind": "read", "seq": event["seq"]})).await;
    tmux.wait_for("me: hi bob  [read]").await;

    // The server dies: a banner; a message typed meanwhile waits, then goes once it is back.
    server.kill_hard();
    tmux.wait_for("reconnecting").await;
    tmux.keys(&["sent while down", "Enter"]);
    tmux.wait_for("sent while down  [pending]").await;
    let server = server.restart_same_port();
    tmux.wait_for("sent while down  [sent]").await;
    let screen = tmux.screen();
    assert!(!screen.contains("reconnecting"), "{screen}");

    let mut b = bob.connect(&server).await;
    let history = b
        .request(json!({"type": "history", "thread_id": event["thread_id"]}))
        .await;
    let bodies: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(
        bodies,
        ["hello alice", "hi bob", "sent while down"],
        "the queued message went out once"
    );

    tmux.keys(&["C-c"]);
}

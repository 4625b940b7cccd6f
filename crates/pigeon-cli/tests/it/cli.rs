//! The `pigeon` command line as a user runs it: a real process, a real server.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};

use crate::support::{PASSWORD, Server};

/// Runs `pigeon <args>` with its own config folder, feeding `stdin`.
fn pigeon(config: &std::path::Path, server: &Server, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .args(args)
        .env("PIGEON_CONFIG_DIR", config)
        .env("PIGEON_SERVER", server.base_url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pigeon");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn send_then_history_round_trip_and_a_saved_private_token() {
    let server = Server::start(&[]);
    let alice_dir = tempfile::tempdir().unwrap();
    let bob_dir = tempfile::tempdir().unwrap();
    let password = format!("{PASSWORD}\n");
    let run = |dir: &tempfile::TempDir, args: &[&str], stdin: &str| {
        pigeon(dir.path(), &server, args, stdin)
    };

    for (dir, name) in [(&alice_dir, "alice"), (&bob_dir, "bob")] {
        let registered = run(dir, &["register", name], &password);
        assert!(registered.status.success(), "{}", text(&registered.stderr));
        let logged_in = run(dir, &["login", name], &password);
        assert!(logged_in.status.success(), "{}", text(&logged_in.stderr));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(alice_dir.path().join("session.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the token file is private");
    }

    let sent = run(
        &alice_dir,
        &["send", "bob", "hello from the command line"],
        "",
    );
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert!(
        text(&sent.stdout).contains("seq 1"),
        "{}",
        text(&sent.stdout)
    );
    let piped = run(&alice_dir, &["send", "bob"], "and from stdin\n");
    assert!(piped.status.success(), "{}", text(&piped.stderr));

    let history = run(&bob_dir, &["history", "alice"], "");
    assert!(history.status.success(), "{}", text(&history.stderr));
    let lines: Vec<String> = text(&history.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].ends_with("alice: hello from the command line"),
        "{lines:?}"
    );
    assert!(lines[1].ends_with("alice: and from stdin"), "{lines:?}");

    let threads = run(&bob_dir, &["threads"], "");
    assert!(
        text(&threads.stdout).contains("2 unread  alice"),
        "{}",
        text(&threads.stdout)
    );

    let group = run(&alice_dir, &["group", "create", "Team", "bob"], "");
    assert!(
        text(&group.stdout).contains("Team  2 members"),
        "{}",
        text(&group.stdout)
    );
    let request = run(&alice_dir, &["contact", "request", "bob"], "");
    assert_eq!(text(&request.stdout).trim(), "bob: requested");

    let logout = run(&alice_dir, &["logout"], "");
    assert!(logout.status.success());
    assert!(!alice_dir.path().join("session.json").exists());
    let after = run(&alice_dir, &["send", "bob", "hi"], "");
    assert_eq!(after.status.code(), Some(1));
    assert!(
        text(&after.stderr).contains("not logged in"),
        "{}",
        text(&after.stderr)
    );
}

#[tokio::test]
async fn a_wrong_password_says_so_in_one_line_and_exits_3() {
    let server = Server::start(&[]);
    server.user("alice").await;
    let dir = tempfile::tempdir().unwrap();
    let output = pigeon(
        dir.path(),
        &server,
        &["login", "alice"],
        "not the password\n",
    );
    assert_eq!(output.status.code(), Some(3));
    let stderr = text(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(
        stderr.trim(),
        "pigeon: wrong username or password (invalid_credentials)"
    );
    assert!(!dir.path().join("session.json").exists());

    let unreachable = pigeon(
        dir.path(),
        &server,
        &["login", "alice", "--server", "http://127.0.0.1:9"],
        "x\n",
    );
    assert_eq!(
        unreachable.status.code(),
        Some(4),
        "{}",
        text(&unreachable.stderr)
    );
}

#[tokio::test]
async fn tail_prints_incoming_events_as_json_lines() {
    let server = Server::start(&[]);
    server.user("alice").await;
    server.user("bob").await;
    let dir = tempfile::tempdir().unwrap();
    let login = pigeon(
        dir.path(),
        &server,
        &["login", "bob"],
        &format!("{PASSWORD}\n"),
    );
    assert!(login.status.success());
    let mut tail = Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .args(["tail", "--json"])
        .env("PIGEON_CONFIG_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();

    let alice = server.login("alice").await;
    let mut ws = alice.connect(&server).await;
    // Keep sending until tail is connected and prints one (it starts from "now").
    let reader = std::thread::spawn(move || lines.next().unwrap().unwrap());
    let mut n = 0;
    while !reader.is_finished() {
        crate::support::send(&mut ws, "bob", &format!("t{n}"), "tailed").await;
        n += 1;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let line = reader.join().unwrap();
    tail.kill().unwrap();
    tail.wait().unwrap();
    let frame: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(frame["type"], "message");
    assert_eq!(frame["body"], "tailed");
}

#[tokio::test]
async fn serve_reads_a_config_file_and_flags_win_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pigeon.toml");
    std::fs::write(
        &file,
        "# settings for pigeon serve\nmax-body-bytes = 10\nmax_group_members = 2\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let server = Server::start(&["--config", file, "--max-group-members", "3"]);
    let alice = server.user("alice").await;
    for name in ["bob", "bea", "ben"] {
        server.user(name).await;
    }
    let mut a = alice.connect(&server).await;

    // From the file: bodies over 10 bytes are refused.
    let long = a
        .request(serde_json::json!({"type": "send", "to": "bob", "client_msg_id": "c1", "body": "eleven byte"}))
        .await;
    assert_eq!(long["code"], "body_too_large", "{long}");
    // The flag overrides the file's 2: a group of alice and three others is refused,
    // of alice and two others allowed.
    let three = a
        .request(serde_json::json!({"type": "create_group", "title": "t", "members": ["bob", "bea", "ben"]}))
        .await;
    assert_eq!(three["code"], "limit_exceeded", "{three}");
    let two = a
        .request(
            serde_json::json!({"type": "create_group", "title": "t", "members": ["bob", "bea"]}),
        )
        .await;
    assert_eq!(two["type"], "group", "{two}");

    // An unknown key is refused with a clear message, and nothing starts.
    std::fs::write(dir.path().join("bad.toml"), "colour = \"blue\"\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .args(["serve", "--config"])
        .arg(dir.path().join("bad.toml"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("unknown setting `colour`"), "{stderr}");
}

//! The browser client in headless Chromium, driven by Playwright (`tests/browser/`).
//! `scripts/test` installs Chromium and the npm packages first.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::Server;

#[test]
fn people_chat_in_the_browser_across_a_server_restart() {
    let mut server = Server::start(&[]);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    // PIGEON_SCREENSHOTS=<folder> also saves the screenshots shown in the README.
    let screenshots = std::env::var("PIGEON_SCREENSHOTS").unwrap_or_default();
    let mut node = Command::new("node")
        .arg("chat.mjs")
        .arg(server.base_url())
        .args((!screenshots.is_empty()).then_some(&screenshots))
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node (scripts/test installs what the browser test needs)");
    let mut to_node = node.stdin.take().expect("stdin");
    let mut said = Vec::new();
    // The script asks for the server to be stopped and started; everything else it
    // prints is kept for the failure message.
    for line in BufReader::new(node.stdout.take().expect("stdout")).lines() {
        let line = line.expect("read the script's output");
        match line.trim() {
            "STOP" => server.kill_hard(),
            "START" => {
                std::thread::sleep(Duration::from_millis(300));
                server = server.restart_same_port();
            }
            _ => {
                said.push(line);
                continue;
            }
        }
        writeln!(to_node, "ok").expect("answer the script");
    }
    let output = node.wait_with_output().expect("wait for node");
    let stdout = said.join("\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("browser chat: ok"),
        "browser test failed:\n{stdout}\n{stderr}"
    );
}

//! The browser client in headless Chromium, driven by Playwright (`tests/browser/`).
//! `scripts/test` installs Chromium and the npm packages first.

use std::process::Command;

use crate::support::Server;

#[test]
fn two_people_chat_in_the_browser() {
    let server = Server::start(&[]);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    let output = Command::new("node")
        .arg("chat.mjs")
        .arg(server.base_url())
        .current_dir(dir)
        .output()
        .expect("run node (scripts/test installs what the browser test needs)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("browser chat: ok"),
        "browser test failed:\n{stdout}\n{stderr}"
    );
}

//! Durability: everything acked survives SIGKILL.

use std::collections::BTreeSet;

use serde_json::json;

use crate::support::{Server, send};

#[tokio::test]
async fn every_acked_message_survives_a_hard_kill() {
    let mut server = Server::start(&["--rate-limit", "100000", "--rate-burst", "100000"]);
    let bob = server.user("bob").await;
    let mut senders = Vec::new();
    for n in 0..4 {
        let device = server.user(&format!("sender{n}")).await;
        let mut ws = device.connect(&server).await;
        send(&mut ws, "bob", "open", "opening the thread").await;
        senders.push(ws);
    }

    // Four connections pipeline 300 sends each; kill the server once 600 acks are in.
    let mut ids = Vec::new();
    for ws in &mut senders {
        let mut mine = Vec::new();
        for n in 0..300 {
            mine.push(ws.send_request(json!({"type": "send", "to": "bob", "client_msg_id": format!("burst-{n}"), "body": format!("burst {n}")})).await);
        }
        ids.push(mine);
    }
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut index = 0;
    while acked.len() < 600 {
        let ws_index = index % senders.len();
        let request = ids[ws_index][index / senders.len()];
        let answer = senders[ws_index].answer(request).await;
        assert_eq!(answer["type"], "sent", "{answer}");
        acked.insert(answer["message_id"].as_str().unwrap().to_owned());
        index += 1;
    }
    server.kill_hard();
    drop(senders);

    let server = server.restart();
    let bob_again = server.login("bob").await;
    let _ = bob;
    let mut ws = bob_again.connect(&server).await;
    let stored: BTreeSet<String> = crate::support::sync_all(&mut ws, 1000)
        .await
        .into_iter()
        .map(|m| m["message_id"].as_str().unwrap().to_owned())
        .collect();
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acked messages lost after SIGKILL",
        lost.len()
    );
}

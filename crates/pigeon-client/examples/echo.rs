//! Logs in and answers every message with its echo. Run the server, register a user, then:
//!
//! ```sh
//! cargo run -p pigeon-client --example echo -- http://127.0.0.1:8080 alice alice-secret
//! ```

use pigeon_client::{Client, ClientConfig, Event, Target};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(server), Some(username), Some(password)) = (args.next(), args.next(), args.next())
    else {
        eprintln!("usage: echo <server-url> <username> <password>");
        std::process::exit(2);
    };
    let session = pigeon_client::login(&server, &username, &password, "echo-bot").await?;
    let mut config = ClientConfig::new(&server, &session.token);
    // Only what arrives from now on; no replay of old history.
    config.start = pigeon_client::StartFrom::Now;
    let (client, mut events) = Client::connect(config)?;
    while let Some(event) = events.next().await {
        match event {
            Event::Message(message) if message.sender_id != session.user_id => {
                let reply = format!("echo: {}", message.body);
                client
                    .send_text(Target::Thread(message.thread_id), reply)
                    .await?;
            }
            Event::Connected(transport) => eprintln!("connected over {transport:?}"),
            Event::Disconnected(reason) => eprintln!("reconnecting: {reason}"),
            Event::Fatal(error) => return Err(error.into()),
            _ => {}
        }
    }
    Ok(())
}

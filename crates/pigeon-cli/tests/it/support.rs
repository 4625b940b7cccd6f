//! The real server as a child process on an ephemeral port, and a small protocol client.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single wait in a test may take before the test fails.
pub(crate) const WAIT: Duration = Duration::from_secs(15);

pub(crate) const PASSWORD: &str = "correct horse";

/// Settings every test server gets unless the test sets them: a generous login rate, and
/// cheap password hashing (the production cost is covered by the accounts test).
fn test_defaults(args: &[String]) -> Vec<&'static str> {
    let defaults = [
        ("--auth-rate-limit", "1000"),
        ("--argon2-memory-kib", "64"),
        ("--argon2-iterations", "1"),
    ];
    defaults
        .iter()
        .filter(|(flag, _)| !args.iter().any(|a| a == flag))
        .flat_map(|(flag, value)| [*flag, *value])
        .collect()
}

/// A `pigeon serve` process with its own data folder.
pub(crate) struct Server {
    child: Child,
    pub(crate) addr: SocketAddr,
    data_dir: Arc<TempDir>,
    args: Vec<String>,
}

impl Server {
    /// Starts a server with the test defaults plus `args`.
    pub(crate) fn start(args: &[&str]) -> Self {
        let data_dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        Self::start_in(data_dir, args.iter().map(|s| (*s).to_owned()).collect())
    }

    fn start_in(data_dir: Arc<TempDir>, args: Vec<String>) -> Self {
        Self::start_at(data_dir, args, "127.0.0.1:0")
    }

    fn start_at(data_dir: Arc<TempDir>, args: Vec<String>, listen: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pigeon"))
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(test_defaults(&args))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pigeon serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let log_writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("listening on http://") {
                    let rest = &line[at + "listening on http://".len()..];
                    let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                    let _ = addr_tx.send(addr);
                }
                log_writer.lock().unwrap().push(line);
            }
        });
        let addr = match addr_rx.recv_timeout(WAIT) {
            Ok(addr) => addr.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start:\n{}", log.lock().unwrap().join("\n"));
            }
        };
        Self {
            child,
            addr,
            data_dir,
            args,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL: no shutdown code runs.
    pub(crate) fn kill_hard(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited with success.
    pub(crate) fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.success();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "server did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a new server on the same data folder with the same arguments.
    pub(crate) fn restart(&self) -> Server {
        Server::start_in(self.data_dir.clone(), self.args.clone())
    }

    /// Starts a new server on the same data folder and the same port (clients reconnect).
    pub(crate) fn restart_same_port(&self) -> Server {
        let listen = self.addr.to_string();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            // The port is free again once the killed process is reaped; retry briefly.
            if std::net::TcpListener::bind(&listen).is_ok() || std::time::Instant::now() > deadline
            {
                return Server::start_at(self.data_dir.clone(), self.args.clone(), &listen);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Registers a user and logs one device in.
    pub(crate) async fn user(&self, name: &str) -> Device {
        let http = reqwest::Client::new();
        let response = http
            .post(self.url("/v1/register"))
            .json(&json!({"username": name, "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            201,
            "register {name}: {}",
            response.text().await.unwrap()
        );
        self.login(name).await
    }

    /// Logs a new device of an existing user in.
    pub(crate) async fn login(&self, name: &str) -> Device {
        let http = reqwest::Client::new();
        let response = http
            .post(self.url("/v1/login"))
            .json(&json!({"username": name, "password": PASSWORD, "device_name": "test"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        Device {
            token: body["token"].as_str().unwrap().to_owned(),
            user_id: body["user_id"].as_str().unwrap().to_owned(),
            device_id: body["device_id"].as_str().unwrap().to_owned(),
        }
    }

    /// Scrapes `/metrics` and returns the value of one sample.
    pub(crate) async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A logged-in device.
#[derive(Clone, Debug)]
pub(crate) struct Device {
    pub(crate) token: String,
    pub(crate) user_id: String,
    pub(crate) device_id: String,
}

impl Device {
    /// Opens a socket authenticated by header and waits for `welcome`.
    pub(crate) async fn connect(&self, server: &Server) -> Ws {
        let mut request = server.ws_url().into_client_request().unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.token).parse().unwrap(),
        );
        let (stream, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("connect");
        Ws::welcomed(stream).await
    }

    /// Like [`Device::connect`], over a socket with a tiny receive buffer, so that a client
    /// that stops reading soon backs up the server's writes.
    pub(crate) async fn connect_small_window(&self, server: &Server) -> Ws {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let tcp = socket.connect(server.addr).await.expect("connect");
        let mut request = server.ws_url().into_client_request().unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.token).parse().unwrap(),
        );
        let (stream, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp))
            .await
            .expect("upgrade");
        Ws::welcomed(stream).await
    }

    /// Makes one HTTP request with this device's token to `/v1/rpc`.
    pub(crate) async fn rpc(&self, server: &Server, frame: Value) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(server.url("/v1/rpc"))
            .bearer_auth(&self.token)
            .json(&frame)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }
}

/// A raw, unauthenticated socket.
pub(crate) async fn connect_anonymous(server: &Server) -> Ws {
    let (stream, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("connect");
    Ws {
        stream,
        events: VecDeque::new(),
        answers: HashMap::new(),
        next_id: 0,
        welcome: Value::Null,
    }
}

/// A protocol client: requests get their answers; events are kept in arrival order.
pub(crate) struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub(crate) events: VecDeque<Value>,
    answers: HashMap<i64, Value>,
    next_id: i64,
    pub(crate) welcome: Value,
}

impl Ws {
    /// Wraps a freshly upgraded socket and waits for `welcome`.
    async fn welcomed(stream: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Self {
        let mut ws = Ws {
            stream,
            events: VecDeque::new(),
            answers: HashMap::new(),
            next_id: 0,
            welcome: Value::Null,
        };
        let welcome = ws.next_frame().await.expect("welcome");
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        ws.welcome = welcome;
        ws
    }

    /// Sends a request (its `id` is set here) and returns the answer with that id.
    pub(crate) async fn request(&mut self, mut frame: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        frame["id"] = json!(id);
        self.send_json(&frame).await;
        self.answer(id).await
    }

    /// Waits for the answer to request `id`, keeping events that arrive meanwhile.
    pub(crate) async fn answer(&mut self, id: i64) -> Value {
        if let Some(answer) = self.answers.remove(&id) {
            return answer;
        }
        loop {
            let frame = self
                .next_frame()
                .await
                .unwrap_or_else(|| panic!("socket closed awaiting answer {id}"));
            match frame.get("id").and_then(Value::as_i64) {
                Some(other) if other == id => return frame,
                Some(other) => {
                    self.answers.insert(other, frame);
                }
                None => self.events.push_back(frame),
            }
        }
    }

    /// Sends a request without waiting; returns its id.
    pub(crate) async fn send_request(&mut self, mut frame: Value) -> i64 {
        self.next_id += 1;
        frame["id"] = json!(self.next_id);
        self.send_json(&frame).await;
        self.next_id
    }

    pub(crate) async fn send_json(&mut self, frame: &Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub(crate) async fn send_text(&mut self, text: &str) {
        self.stream
            .send(Message::Text(text.into()))
            .await
            .expect("send");
    }

    pub(crate) async fn send_message(&mut self, message: Message) {
        self.stream.send(message).await.expect("send");
    }

    /// Writes all these messages with one flush, so they reach the server together.
    pub(crate) async fn send_together(&mut self, messages: Vec<Message>) {
        for message in messages {
            self.stream.feed(message).await.expect("send");
        }
        self.stream.flush().await.expect("flush");
    }

    /// Returns the next event (a frame without an id).
    pub(crate) async fn event(&mut self) -> Value {
        if let Some(event) = self.events.pop_front() {
            return event;
        }
        loop {
            let frame = self
                .next_frame()
                .await
                .expect("socket closed awaiting an event");
            if frame.get("id").is_none_or(Value::is_null) {
                return frame;
            }
        }
    }

    /// Returns the next event of the given type, skipping others.
    pub(crate) async fn event_of(&mut self, kind: &str) -> Value {
        loop {
            let event = self.event().await;
            if event["type"] == kind {
                return event;
            }
        }
    }

    /// Asserts nothing arrives for a short while.
    pub(crate) async fn assert_quiet(&mut self, for_how_long: Duration) {
        assert!(
            self.events.is_empty(),
            "unexpected events: {:?}",
            self.events
        );
        if let Ok(Some(Ok(message))) = tokio::time::timeout(for_how_long, self.stream.next()).await
        {
            panic!("unexpected frame: {message:?}");
        }
    }

    /// Returns every event that arrives within `for_how_long`.
    pub(crate) async fn drain_events(&mut self, for_how_long: Duration) -> Vec<Value> {
        let mut events: Vec<Value> = self.events.drain(..).collect();
        let deadline = tokio::time::Instant::now() + for_how_long;
        while let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout_at(deadline, self.stream.next()).await
        {
            events.push(serde_json::from_str(&text).expect("server sent JSON"));
        }
        events
    }

    /// Reads the next text frame as JSON; None when the socket closes.
    pub(crate) async fn next_frame(&mut self) -> Option<Value> {
        loop {
            let message = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("timed out waiting for a frame");
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(&text).expect("server sent JSON"));
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Reads until the server closes; returns the close code. Frames read on the way are
    /// kept in `events`.
    pub(crate) async fn close_code(&mut self) -> Option<u16> {
        loop {
            let message = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("timed out waiting for close");
            match message {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code.into()),
                Some(Ok(Message::Text(text))) => {
                    self.events
                        .push_back(serde_json::from_str(&text).expect("server sent JSON"));
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return None,
            }
        }
    }

    pub(crate) async fn ping(&mut self) {
        let answer = self.request(json!({"type": "ping"})).await;
        assert_eq!(answer["type"], "pong", "{answer}");
    }

    pub(crate) async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

/// Sends a text message and returns the `sent` answer.
pub(crate) async fn send(ws: &mut Ws, to: &str, client_msg_id: &str, body: &str) -> Value {
    let answer = ws
        .request(json!({"type": "send", "to": to, "client_msg_id": client_msg_id, "body": body}))
        .await;
    assert_eq!(answer["type"], "sent", "{answer}");
    answer
}

/// Fetches every message of every thread through paged `sync`; returns them in order received.
pub(crate) async fn sync_all(ws: &mut Ws, page: u32) -> Vec<Value> {
    let mut have = serde_json::Map::new();
    let mut all = Vec::new();
    loop {
        let answer = ws
            .request(json!({"type": "sync", "have": have, "limit": page}))
            .await;
        assert_eq!(answer["type"], "sync", "{answer}");
        for message in answer["messages"].as_array().unwrap() {
            let thread = message["thread_id"].as_str().unwrap().to_owned();
            let seq = message["seq"].as_u64().unwrap();
            let held = have.get(&thread).and_then(Value::as_u64).unwrap_or(0);
            assert_eq!(seq, held + 1, "sync returned a gap or a repeat: {message}");
            have.insert(thread, json!(seq));
            all.push(message.clone());
        }
        if !answer["more"].as_bool().unwrap() {
            return all;
        }
    }
}

/// Sends `count` texts ("{from} {n}") to the user `to` through the SDK, `in_flight` at a
/// time, counting each ack in `acked` as it comes; resolves to the acked seqs.
pub(crate) fn send_texts(
    client: pigeon_client::Client,
    to: &'static str,
    from: &'static str,
    count: usize,
    in_flight: usize,
    acked: Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        futures::stream::iter(0..count)
            .map(|n| {
                let client = client.clone();
                let acked = acked.clone();
                async move {
                    let sent = client
                        .send_text(
                            pigeon_client::Target::User(to.into()),
                            format!("{from} {n}"),
                        )
                        .await
                        .unwrap();
                    acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sent.seq
                }
            })
            .buffer_unordered(in_flight)
            .collect::<Vec<u64>>()
            .await
    })
}

//! One connection to the server, over a WebSocket or over long-poll, seen the same way by
//! the engine: frames go out, answers and events come in on one channel.

use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use pigeon_proto::{ClientFrame, ReqId, ServerFrame};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Error, Result, TransportKind, http};

type WsSink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, WsMessage>;

/// What arrives from the server.
pub(crate) enum Incoming {
    /// An answer or an event.
    Frame(ServerFrame),
    /// The long-poll stream restarted: events may have been missed, sync.
    Reset,
    /// The connection is gone.
    Closed(String),
}

/// Who this connection authenticated as.
pub(crate) struct Identity {
    pub(crate) user_id: pigeon_proto::UserId,
    pub(crate) device_id: pigeon_proto::DeviceId,
    /// The server's body limit, when it said (`welcome`, or `GET /v1/me` for long-poll).
    pub(crate) max_body_bytes: Option<usize>,
    /// The server's frame and HTTP body limit, when it said (as above).
    pub(crate) max_frame_bytes: Option<usize>,
}

pub(crate) struct Connection {
    pub(crate) kind: TransportKind,
    outgoing: Outgoing,
    incoming_rx: mpsc::UnboundedReceiver<Incoming>,
    incoming_tx: mpsc::UnboundedSender<Incoming>,
    tasks: Vec<JoinHandle<()>>,
}

enum Outgoing {
    Socket(WsSink),
    Poll {
        http: reqwest::Client,
        server: String,
        token: String,
    },
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Connection {
    /// Opens a WebSocket authenticated by header and waits for `welcome`.
    pub(crate) async fn websocket(server: &str, token: &str) -> Result<(Self, Identity)> {
        let url = if let Some(rest) = server.strip_prefix("https://") {
            format!("wss://{rest}/ws")
        } else {
            format!(
                "ws://{}/ws",
                server.strip_prefix("http://").unwrap_or(server)
            )
        };
        let mut request = url
            .into_client_request()
            .map_err(|e| Error::Disconnected(e.to_string()))?;
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Disconnected("bad token".into()))?;
        request.headers_mut().insert("authorization", header);
        let (socket, _) = match tokio_tungstenite::connect_async(request).await {
            Ok(opened) => opened,
            Err(tokio_tungstenite::tungstenite::Error::Http(response))
                if response.status() == 401 =>
            {
                return Err(Error::Server {
                    code: pigeon_proto::ErrorCode::Unauthorized,
                    message: "token refused".into(),
                });
            }
            Err(error) => return Err(Error::Disconnected(error.to_string())),
        };
        let (sink, mut stream) = socket.split();
        let identity = match stream.next().await {
            Some(Ok(WsMessage::Text(text))) => match serde_json::from_str(&text) {
                Ok(ServerFrame::Welcome {
                    user_id,
                    device_id,
                    max_body_bytes,
                    max_frame_bytes,
                    ..
                }) => Identity {
                    user_id,
                    device_id,
                    max_body_bytes: Some(max_body_bytes),
                    max_frame_bytes: Some(max_frame_bytes),
                },
                _ => return Err(Error::Unexpected(text.to_string())),
            },
            other => return Err(Error::Disconnected(format!("no welcome: {other:?}"))),
        };
        let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
        let reader_tx = incoming_tx.clone();
        let reader = tokio::spawn(async move {
            while let Some(message) = stream.next().await {
                match message {
                    Ok(WsMessage::Text(text)) => match serde_json::from_str::<ServerFrame>(&text) {
                        Ok(frame) => {
                            let _ = reader_tx.send(Incoming::Frame(frame));
                        }
                        Err(error) => {
                            tracing::warn!(%error, "ignoring a frame this client does not understand")
                        }
                    },
                    Ok(WsMessage::Close(frame)) => {
                        let _ = reader_tx
                            .send(Incoming::Closed(format!("closed by server: {frame:?}")));
                        return;
                    }
                    Ok(_) => {}
                    Err(error) => {
                        let _ = reader_tx.send(Incoming::Closed(error.to_string()));
                        return;
                    }
                }
            }
            let _ = reader_tx.send(Incoming::Closed("connection ended".into()));
        });
        let connection = Self {
            kind: TransportKind::WebSocket,
            outgoing: Outgoing::Socket(sink),
            incoming_rx,
            incoming_tx,
            tasks: vec![reader],
        };
        Ok((connection, identity))
    }

    /// Opens a long-poll stream: requests over `POST /v1/rpc`, events over `GET /v1/events`.
    pub(crate) async fn long_poll(server: &str, token: &str) -> Result<(Self, Identity)> {
        // Every request is bounded: a poll waits at most 25 s on the server, plus slack.
        let client = http::client(std::time::Duration::from_secs(40));
        let me = http::me(&client, server, token).await?;
        let opened = http::poll(&client, server, token, None, 0).await?;
        let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
        let poll_tx = incoming_tx.clone();
        let (poll_client, poll_server, poll_token) =
            (client.clone(), server.to_owned(), token.to_owned());
        let poller = tokio::spawn(async move {
            let mut cursor = opened.cursor;
            loop {
                match http::poll(&poll_client, &poll_server, &poll_token, Some(&cursor), 25).await {
                    Ok(answer) => {
                        if answer.reset {
                            let _ = poll_tx.send(Incoming::Reset);
                        }
                        cursor = answer.cursor;
                        for frame in answer.events {
                            let _ = poll_tx.send(Incoming::Frame(frame));
                        }
                    }
                    Err(error) => {
                        let _ = poll_tx.send(Incoming::Closed(error.to_string()));
                        return;
                    }
                }
            }
        });
        let connection = Self {
            kind: TransportKind::LongPoll,
            outgoing: Outgoing::Poll {
                http: client,
                server: server.to_owned(),
                token: token.to_owned(),
            },
            incoming_rx,
            incoming_tx,
            tasks: vec![poller],
        };
        Ok((
            connection,
            Identity {
                user_id: me.user_id,
                device_id: me.device_id,
                max_body_bytes: me.max_body_bytes,
                max_frame_bytes: me.max_frame_bytes,
            },
        ))
    }

    /// Sends a request; its answer arrives through [`Connection::next`].
    pub(crate) async fn send(&mut self, id: i64, frame: &ClientFrame) -> Result<()> {
        let mut value =
            serde_json::to_value(frame).map_err(|e| Error::Unexpected(e.to_string()))?;
        value["id"] = serde_json::json!(id);
        match &mut self.outgoing {
            Outgoing::Socket(sink) => sink
                .send(WsMessage::Text(value.to_string().into()))
                .await
                .map_err(|e| Error::Disconnected(e.to_string())),
            Outgoing::Poll {
                http,
                server,
                token,
            } => {
                let (http, server, token, answers) = (
                    http.clone(),
                    server.clone(),
                    token.clone(),
                    self.incoming_tx.clone(),
                );
                // Requests of one connection are answered in order by the server's socket
                // session; over HTTP each is its own request, sent in order here.
                let answer = http::rpc(&http, &server, &token, &value).await;
                let incoming = match answer {
                    Ok(frame) => Incoming::Frame(frame),
                    Err(Error::Server { code, message }) => Incoming::Frame(ServerFrame::Error {
                        id: Some(ReqId::Int(id)),
                        code,
                        message,
                    }),
                    Err(other) => Incoming::Closed(other.to_string()),
                };
                let _ = answers.send(incoming);
                Ok(())
            }
        }
    }

    /// Waits for the next answer or event.
    pub(crate) async fn next(&mut self) -> Incoming {
        self.incoming_rx
            .recv()
            .await
            .unwrap_or_else(|| Incoming::Closed("connection ended".into()))
    }
}

//! The plain HTTP calls: accounts, identity, requests and long-poll.

use pigeon_proto::{ErrorCode, PollResponse, ServerFrame, UserId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Error, Result};

/// A logged-in device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Session {
    /// The session token: keep it secret.
    pub token: String,
    /// The user.
    pub user_id: UserId,
    /// Their username.
    pub username: String,
    /// This device.
    pub device_id: pigeon_proto::DeviceId,
}

/// How long a one-shot request may take.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// An HTTP client whose every request gives up after `timeout`.
pub(crate) fn client(timeout: std::time::Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .unwrap_or_default()
}

/// Creates an account; returns the new user's id.
pub async fn register(server: &str, username: &str, password: &str) -> Result<UserId> {
    let body = json!({"username": username, "password": password});
    let answer = post(
        &client(REQUEST_TIMEOUT),
        server,
        "/v1/register",
        None,
        &body,
    )
    .await?;
    serde_json::from_value(answer["user_id"].clone()).map_err(|e| Error::Unexpected(e.to_string()))
}

/// Logs a new device in.
pub async fn login(
    server: &str,
    username: &str,
    password: &str,
    device_name: &str,
) -> Result<Session> {
    let body = json!({"username": username, "password": password, "device_name": device_name});
    let answer = post(&client(REQUEST_TIMEOUT), server, "/v1/login", None, &body).await?;
    serde_json::from_value(answer).map_err(|e| Error::Unexpected(e.to_string()))
}

/// Ends a device session: the token stops working everywhere.
pub async fn logout(server: &str, token: &str) -> Result<()> {
    post(
        &client(REQUEST_TIMEOUT),
        server,
        "/v1/logout",
        Some(token),
        &Value::Null,
    )
    .await
    .map(|_| ())
}

/// Who a token belongs to.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Me {
    pub(crate) user_id: UserId,
    pub(crate) device_id: pigeon_proto::DeviceId,
    /// The server's limits (absent from servers older than these fields).
    #[serde(default)]
    pub(crate) max_body_bytes: Option<usize>,
    #[serde(default)]
    pub(crate) max_frame_bytes: Option<usize>,
}

pub(crate) async fn me(http: &reqwest::Client, server: &str, token: &str) -> Result<Me> {
    let response = http
        .get(format!("{server}/v1/me"))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| Error::Disconnected(e.to_string()))?;
    let answer = decode(response).await?;
    serde_json::from_value(answer).map_err(|e| Error::Unexpected(e.to_string()))
}

/// Sends one request frame over `POST /v1/rpc`.
pub(crate) async fn rpc(
    http: &reqwest::Client,
    server: &str,
    token: &str,
    frame: &Value,
) -> Result<ServerFrame> {
    // A failed command comes back with an HTTP error status; `post` turns it into
    // `Error::Server` with the frame's code.
    let answer = post(http, server, "/v1/rpc", Some(token), frame).await?;
    serde_json::from_value(answer).map_err(|e| Error::Unexpected(e.to_string()))
}

/// One long-poll request.
pub(crate) async fn poll(
    http: &reqwest::Client,
    server: &str,
    token: &str,
    cursor: Option<&str>,
    wait_s: u64,
) -> Result<PollResponse> {
    let mut url = format!("{server}/v1/events?wait={wait_s}");
    if let Some(cursor) = cursor {
        url.push_str("&cursor=");
        url.push_str(cursor);
    }
    let response = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| Error::Disconnected(e.to_string()))?;
    let answer = decode(response).await?;
    serde_json::from_value(answer).map_err(|e| Error::Unexpected(e.to_string()))
}

async fn post(
    http: &reqwest::Client,
    server: &str,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> Result<Value> {
    let mut request = http.post(format!("{server}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if !body.is_null() {
        request = request.json(body);
    }
    let response = request
        .send()
        .await
        .map_err(|e| Error::Disconnected(e.to_string()))?;
    decode(response).await
}

/// Turns a response into its JSON body, or the server's typed error.
async fn decode(response: reqwest::Response) -> Result<Value> {
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| Error::Disconnected(e.to_string()))?;
    if status.is_success() {
        if text.is_empty() {
            return Ok(Value::Null);
        }
        return serde_json::from_str(&text).map_err(|e| Error::Unexpected(e.to_string()));
    }
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let code =
        serde_json::from_value::<ErrorCode>(body["code"].clone()).unwrap_or(ErrorCode::Internal);
    let message = body["message"]
        .as_str()
        .map_or_else(|| format!("HTTP {status}"), str::to_owned);
    Err(Error::Server { code, message })
}

/// One-shot requests over `POST /v1/rpc`, without holding a connection: for scripts and
/// command-line tools. Answers are the same frames a socket gets.
#[derive(Clone)]
pub struct Rpc {
    http: reqwest::Client,
    server: String,
    token: String,
}

impl Rpc {
    /// A request sender for this server and token.
    pub fn new(server: &str, token: &str) -> Self {
        Self {
            http: client(REQUEST_TIMEOUT),
            server: server.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        }
    }

    /// Sends one request; `error` frames become [`Error::Server`].
    pub async fn call(&self, frame: &pigeon_proto::ClientFrame) -> Result<ServerFrame> {
        let value = serde_json::to_value(frame).map_err(|e| Error::Unexpected(e.to_string()))?;
        rpc(&self.http, &self.server, &self.token, &value).await
    }

    /// Sends a text message; network failures are retried with the same `client_msg_id`,
    /// which the server deduplicates, so the message is stored once.
    pub async fn send_text(&self, target: crate::Target, body: &str) -> Result<crate::Sent> {
        let (to, thread_id) = match target {
            crate::Target::User(user) => (Some(user), None),
            crate::Target::Thread(thread) => (None, Some(thread)),
        };
        let frame = pigeon_proto::ClientFrame::Send {
            id: crate::placeholder(),
            to,
            thread_id,
            client_msg_id: crate::new_client_msg_id(),
            body: body.to_owned(),
        };
        let mut attempt = 0;
        loop {
            match self.call(&frame).await {
                Ok(ServerFrame::Sent {
                    client_msg_id,
                    thread_id,
                    seq,
                    message_id,
                    server_time,
                    ..
                }) => {
                    return Ok(crate::Sent {
                        client_msg_id,
                        thread_id,
                        seq,
                        message_id,
                        server_time,
                    });
                }
                Ok(other) => return Err(crate::unexpected(&other)),
                Err(Error::Disconnected(reason)) if attempt < 5 => {
                    attempt += 1;
                    tracing::debug!(%reason, attempt, "retrying send");
                    tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

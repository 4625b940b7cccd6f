//! The HTTP API: accounts and devices, requests for clients without a socket, health, metrics.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use pigeon_core::{Caller, ChatError};
use pigeon_proto::{ClientFrame, DeviceId, ErrorCode, FrameError, ReqId, ServerFrame};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::{AppState, GatewayConfig};

/// Rate limits of the HTTP API.
pub(crate) struct Limits {
    /// Register and login attempts, per client address.
    auth: DefaultKeyedRateLimiter<IpAddr>,
    /// `/v1/rpc` requests, per device.
    rpc: DefaultKeyedRateLimiter<DeviceId>,
}

impl Limits {
    pub(crate) fn new(config: &GatewayConfig) -> Self {
        let per_second = |n: u32| NonZeroU32::new(n.max(1)).expect("nonzero");
        Self {
            auth: RateLimiter::keyed(
                Quota::per_second(per_second(config.auth_rate_per_second))
                    .allow_burst(per_second(config.auth_rate_per_second.saturating_mul(2))),
            ),
            rpc: RateLimiter::keyed(
                Quota::per_second(per_second(config.rate_per_second))
                    .allow_burst(per_second(config.rate_burst)),
            ),
        }
    }
}

/// An error answered over HTTP: the same {code, message, id} as an `error` frame.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
    pub(crate) id: Option<ReqId>,
}

impl ApiError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            id: None,
        }
    }
}

impl From<ChatError> for ApiError {
    fn from(error: ChatError) -> Self {
        Self {
            code: error.code(),
            message: error.client_message(),
            id: None,
        }
    }
}

/// The HTTP status for an error code.
pub(crate) fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::UnknownType | ErrorCode::MissingField | ErrorCode::InvalidField => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::InvalidUsername | ErrorCode::InvalidPassword | ErrorCode::BodyTooLarge => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::UnknownThread | ErrorCode::UnknownUser | ErrorCode::UnknownDevice => {
            StatusCode::NOT_FOUND
        }
        ErrorCode::NotMember | ErrorCode::Forbidden | ErrorCode::Blocked => StatusCode::FORBIDDEN,
        ErrorCode::LimitExceeded => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::NoPendingRequest => StatusCode::CONFLICT,
        ErrorCode::GroupClosed => StatusCode::GONE,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Unauthorized | ErrorCode::InvalidCredentials => StatusCode::UNAUTHORIZED,
        ErrorCode::UsernameTaken => StatusCode::CONFLICT,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.code, "message": self.message, "id": self.id });
        (status_of(self.code), Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Reads `Authorization: Bearer <token>`.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim())
}

/// Authenticates an HTTP request by its bearer token.
pub(crate) async fn authenticate(state: &AppState, headers: &HeaderMap) -> ApiResult<Caller> {
    let token = bearer_token(headers).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unauthorized,
            "missing Authorization: Bearer token",
        )
    })?;
    Ok(state.chat.authenticate(token, None).await?)
}

/// Parses a JSON body, answering a typed error when it does not fit.
fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let body = body.map_err(body_rejection)?;
    serde_json::from_slice(&body).map_err(|error| {
        // The client knows which body it sent; serde's position adds nothing.
        let full = error.to_string();
        let message = full
            .split(" at line ")
            .next()
            .unwrap_or_default()
            .to_owned();
        let code = if message.starts_with("missing field") {
            ErrorCode::MissingField
        } else {
            ErrorCode::InvalidField
        };
        ApiError::new(code, message)
    })
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            "request body over the size limit",
        )
    } else {
        ApiError::new(ErrorCode::InvalidField, rejection.body_text())
    }
}

fn check_auth_rate(state: &AppState, addr: SocketAddr) -> ApiResult<()> {
    state
        .limits
        .auth
        .check_key(&addr.ip())
        .map_err(|_| ApiError::new(ErrorCode::RateLimited, "too many attempts; slow down"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Credentials {
    username: String,
    password: String,
    #[serde(default)]
    device_name: Option<String>,
}

/// `POST /v1/register` {username, password} → 201 {user_id, username}
pub(crate) async fn register(
    State(state): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    check_auth_rate(&state, addr)?;
    let credentials: Credentials = parse_body(body)?;
    let user = state
        .chat
        .register(&credentials.username, &credentials.password)
        .await?;
    let body = json!({ "user_id": user.id, "username": user.username });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `POST /v1/login` {username, password, device_name?} → {token, user_id, username, device_id}
pub(crate) async fn login(
    State(state): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    check_auth_rate(&state, addr)?;
    let credentials: Credentials = parse_body(body)?;
    let outcome = state
        .chat
        .login(
            &credentials.username,
            &credentials.password,
            credentials.device_name.as_deref(),
        )
        .await?;
    let body = json!({
        "token": outcome.token,
        "user_id": outcome.user.id,
        "username": outcome.user.username,
        "device_id": outcome.device.id,
    });
    Ok(Json(body).into_response())
}

/// `POST /v1/logout` → 204; the token stops working and its connections close.
pub(crate) async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let caller = authenticate(&state, &headers).await?;
    state.chat.logout(&caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/me` → {user_id, username, device_id, hide_last_seen, max_body_bytes,
/// max_frame_bytes}: who this token is, and the limits `welcome` gives socket clients.
pub(crate) async fn me(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let caller = authenticate(&state, &headers).await?;
    let hide_last_seen = state.chat.hides_last_seen(&caller).await?;
    let body = json!({
        "user_id": caller.user_id,
        "username": caller.username,
        "device_id": caller.device_id,
        "hide_last_seen": hide_last_seen,
        "max_body_bytes": state.chat.config().max_body_bytes,
        "max_frame_bytes": state.config.max_frame_bytes,
    });
    Ok(Json(body).into_response())
}

/// `GET /v1/devices` → {devices: [...]}
pub(crate) async fn list_devices(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let caller = authenticate(&state, &headers).await?;
    let devices = state.chat.list_devices(&caller).await?;
    Ok(Json(json!({ "devices": devices })).into_response())
}

/// `DELETE /v1/devices/{device_id}` → 204
pub(crate) async fn revoke_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(device_id): Path<String>,
) -> ApiResult<StatusCode> {
    let caller = authenticate(&state, &headers).await?;
    let device_id: DeviceId = device_id
        .parse()
        .map_err(|_| ApiError::new(ErrorCode::InvalidField, "device_id: not a valid id"))?;
    state.chat.revoke_device(&caller, device_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/rpc`: any request frame, answered with its server frame (for long-poll clients).
pub(crate) async fn rpc(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let mut caller = authenticate(&state, &headers).await?;
    if state.limits.rpc.check_key(&caller.device_id).is_err() {
        return Err(ApiError::from(ChatError::RateLimited));
    }
    let body = body.map_err(body_rejection)?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::new(ErrorCode::InvalidField, "body is not UTF-8"))?;
    let frame = match ClientFrame::parse(text) {
        Ok(frame) => frame,
        Err(FrameError::NotJson) => {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "body is not a JSON object",
            ));
        }
        Err(FrameError::Invalid { id, code, message }) => {
            return Err(ApiError { code, message, id });
        }
    };
    // Events this request causes are not echoed to the device's own long-poll stream.
    caller.conn = state.polls.conn_of(caller.device_id);
    let answer = state.chat.handle(&caller, frame).await;
    let status = match &answer {
        ServerFrame::Error { code, .. } => status_of(*code),
        _ => StatusCode::OK,
    };
    Ok((status, Json(answer)).into_response())
}

/// `GET /healthz`
/// `GET /healthz`: 503 when the store does not answer (the node can serve nobody), else
/// 200. A bus outage is reported (`degraded`) but keeps 200: the node still commits and
/// serves its own connections, and taking every node out of a balancer would make a NATS
/// outage a full one.
pub(crate) async fn healthz(State(state): State<AppState>) -> Response {
    let health = state.chat.health().await;
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let status = match (health.store, health.bus) {
        (true, true) => "ok",
        (true, false) => "degraded",
        (false, _) => "unavailable",
    };
    let body = json!({
        "status": status,
        "store": word(health.store),
        "bus": word(health.bus),
        "connections": state.registry.len(),
    });
    let code = if health.store {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    match &state.prometheus {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

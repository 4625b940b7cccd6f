//! Error codes of `error` frames and HTTP error bodies, and WebSocket close codes.

use serde::{Deserialize, Serialize};

/// Why a request failed. Sent as `code` in an `error` frame, in snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame's `type` is not one the server knows.
    UnknownType,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong JSON type or an invalid value.
    InvalidField,
    /// The thread does not exist.
    UnknownThread,
    /// The user does not exist.
    UnknownUser,
    /// The device does not exist or is not one of the caller's.
    UnknownDevice,
    /// The caller is not a member of the thread.
    NotMember,
    /// The message body is larger than the server's limit.
    BodyTooLarge,
    /// The request body (HTTP) is larger than the server's limit.
    PayloadTooLarge,
    /// The token is missing, malformed, unknown or revoked.
    Unauthorized,
    /// The username and password do not match an account.
    InvalidCredentials,
    /// The username is not 3–32 characters of `[a-z0-9_.-]`.
    InvalidUsername,
    /// The password is shorter than 8 characters (or absurdly long).
    InvalidPassword,
    /// The username is already registered.
    UsernameTaken,
    /// The request is not allowed for this caller (e.g. their role is too low).
    Forbidden,
    /// The other user blocked the caller.
    Blocked,
    /// A configured limit would be exceeded (group size, groups per user, lengths).
    LimitExceeded,
    /// There is no pending friend request to answer or cancel.
    NoPendingRequest,
    /// The group is closed: its last member left.
    GroupClosed,
    /// Too many requests: slow down and retry later.
    RateLimited,
    /// The server cannot serve the request right now (storage down, shutting down): retry.
    Unavailable,
    /// An unexpected server-side failure; details are in the server log.
    Internal,
}

impl ErrorCode {
    /// Returns the snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownType => "unknown_type",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::UnknownThread => "unknown_thread",
            Self::UnknownUser => "unknown_user",
            Self::UnknownDevice => "unknown_device",
            Self::NotMember => "not_member",
            Self::BodyTooLarge => "body_too_large",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Unauthorized => "unauthorized",
            Self::InvalidCredentials => "invalid_credentials",
            Self::InvalidUsername => "invalid_username",
            Self::InvalidPassword => "invalid_password",
            Self::UsernameTaken => "username_taken",
            Self::Forbidden => "forbidden",
            Self::Blocked => "blocked",
            Self::LimitExceeded => "limit_exceeded",
            Self::NoPendingRequest => "no_pending_request",
            Self::GroupClosed => "group_closed",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// Tells whether the same request may succeed if retried later unchanged.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::RateLimited | Self::Unavailable | Self::Internal)
    }
}

/// WebSocket close codes the server uses (RFC 6455 §7.4 and the 4000–4999 private range).
pub mod close {
    /// The server is shutting down; reconnect (to another node) and sync.
    pub const GOING_AWAY: u16 = 1001;
    /// A binary frame was sent; the protocol is JSON text frames only.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A text frame was not a JSON object.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A protocol rule was broken (e.g. a request before `hello`).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame was larger than the frame limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The connection fell too far behind on its events; reconnect and sync.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Authentication failed, or the device was revoked or logged out.
    pub const UNAUTHORIZED: u16 = 4001;
    /// Nothing was received within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4002;
}

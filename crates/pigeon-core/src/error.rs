//! Errors of the chat service, and their one mapping to wire error codes.

use pigeon_bus::BusError;
use pigeon_proto::{ErrorCode, ReqId, ServerFrame};
use pigeon_store::StoreError;

/// Why a chat request failed.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// A required field is absent.
    #[error("missing field: {0}")]
    MissingField(&'static str),
    /// A field has an invalid value.
    #[error("invalid {0}")]
    InvalidField(String),
    /// The thread does not exist.
    #[error("unknown thread")]
    UnknownThread,
    /// The user does not exist.
    #[error("unknown user")]
    UnknownUser,
    /// The device does not exist or is not the caller's.
    #[error("unknown device")]
    UnknownDevice,
    /// The caller is not a member of the thread.
    #[error("not a member of this thread")]
    NotMember,
    /// The body exceeds the limit.
    #[error("message body is {size} bytes, over the limit of {limit}")]
    BodyTooLarge {
        /// Size of the body sent.
        size: usize,
        /// The server's limit.
        limit: usize,
    },
    /// The username breaks the rules.
    #[error("username must be 3 to 32 characters of a-z, 0-9, '_', '.', '-'")]
    InvalidUsername,
    /// The password breaks the rules.
    #[error("password must be at least 8 characters")]
    InvalidPassword,
    /// The username is registered already.
    #[error("username is taken")]
    UsernameTaken,
    /// Wrong username or password.
    #[error("wrong username or password")]
    InvalidCredentials,
    /// Bad, unknown or revoked token.
    #[error("missing, invalid or revoked token")]
    Unauthorized,
    /// The request is not allowed.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The other user blocked the caller.
    #[error("blocked")]
    Blocked,
    /// A limit would be exceeded.
    #[error("{0}")]
    LimitExceeded(String),
    /// There is no pending request to answer.
    #[error("no pending friend request")]
    NoPendingRequest,
    /// Too many requests.
    #[error("too many requests; slow down")]
    RateLimited,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An unexpected failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ChatError {
    /// Returns the wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MissingField(_) => ErrorCode::MissingField,
            Self::InvalidField(_) => ErrorCode::InvalidField,
            Self::UnknownThread | Self::Store(StoreError::ThreadNotFound) => {
                ErrorCode::UnknownThread
            }
            Self::UnknownUser => ErrorCode::UnknownUser,
            Self::UnknownDevice => ErrorCode::UnknownDevice,
            Self::NotMember | Self::Store(StoreError::NotMember) => ErrorCode::NotMember,
            Self::BodyTooLarge { .. } => ErrorCode::BodyTooLarge,
            Self::InvalidUsername => ErrorCode::InvalidUsername,
            Self::InvalidPassword => ErrorCode::InvalidPassword,
            Self::UsernameTaken => ErrorCode::UsernameTaken,
            Self::InvalidCredentials => ErrorCode::InvalidCredentials,
            Self::Unauthorized => ErrorCode::Unauthorized,
            Self::Forbidden(_) | Self::Store(StoreError::Forbidden(_)) => ErrorCode::Forbidden,
            Self::Blocked | Self::Store(StoreError::Blocked) => ErrorCode::Blocked,
            Self::LimitExceeded(_) | Self::Store(StoreError::LimitExceeded(_)) => {
                ErrorCode::LimitExceeded
            }
            Self::NoPendingRequest | Self::Store(StoreError::NoPendingRequest) => {
                ErrorCode::NoPendingRequest
            }
            Self::Store(StoreError::GroupClosed) => ErrorCode::GroupClosed,
            Self::Store(StoreError::UnknownUser) => ErrorCode::UnknownUser,
            Self::Store(StoreError::TargetNotMember) => ErrorCode::NotMember,
            Self::RateLimited => ErrorCode::RateLimited,
            Self::Store(StoreError::Unavailable(_)) | Self::Bus(BusError::Unavailable(_)) => {
                ErrorCode::Unavailable
            }
            Self::Store(StoreError::Conflict | StoreError::Internal(_)) | Self::Internal(_) => {
                ErrorCode::Internal
            }
        }
    }

    /// Returns the text for the client: internal details stay in the server log.
    pub fn client_message(&self) -> String {
        match self.code() {
            ErrorCode::Internal => {
                tracing::error!(error = %self, "request failed");
                "internal error".to_owned()
            }
            ErrorCode::Unavailable => {
                tracing::warn!(error = %self, "request failed; retryable");
                "temporarily unavailable; retry".to_owned()
            }
            _ => self.to_string(),
        }
    }

    /// The `error` frame answering the request `id` (`None` when it had no readable id).
    pub fn frame(&self, id: Option<ReqId>) -> ServerFrame {
        ServerFrame::Error {
            id,
            code: self.code(),
            message: self.client_message(),
        }
    }
}

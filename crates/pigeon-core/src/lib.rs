//! Pigeon's chat logic. It knows the [`Store`](pigeon_store::Store) and the
//! [`Bus`](pigeon_bus::Bus), never a socket: the gateway turns frames into calls here
//! and delivers the envelopes this crate publishes.

mod accounts;
mod commands;
mod error;
mod presence;
mod publish;
mod service;

pub use accounts::LoginOutcome;
pub use error::ChatError;
pub use service::{Caller, ChatConfig, ChatService, Health, is_thread_send};

/// The crate's result type.
pub type Result<T, E = ChatError> = std::result::Result<T, E>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

//! The Pigeon wire protocol, shared by the server, the SDK, the bench and the clients.
//!
//! A gateway frame is one JSON text message with a `type` field. Clients send
//! [`ClientFrame`]s; every request carries a client-chosen `id` that comes back in its
//! answer. The server sends [`ServerFrame`]s: answers (with that `id`) and events
//! (without). This crate holds types only: no sockets, no tasks, no server code.
#![warn(missing_docs)]

mod error;
mod frame;
mod ids;
mod model;
mod parse;
mod validate;

pub use error::{ErrorCode, close};
pub use frame::{
    ClientFrame, ContactAction, DeviceInfo, MarkKind, Message, MessageKind, PollResponse,
    ServerFrame, ThreadKind, ThreadSummary, UserEventRecord, UserRef, in_sync_range,
};
pub use ids::{DeviceId, IdParseError, MessageId, ReqId, ThreadId, UserId};
pub use model::{
    ContactInfo, ContactState, GroupInfo, MemberInfo, Role, SystemEvent, ThreadSettings, UserEvent,
};
pub use parse::FrameError;
pub use validate::{
    MAX_CLIENT_MSG_ID_LEN, MAX_PASSWORD_LEN, MIN_PASSWORD_LEN, UserSpec, validate_client_msg_id,
    validate_password, validate_username,
};

/// Version of the protocol described by this crate, sent in the `welcome` frame.
pub const PROTOCOL_VERSION: u16 = 1;

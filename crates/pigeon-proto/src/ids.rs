//! Validated identifier newtypes: ids are never bare strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A string that is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdParseError;

impl fmt::Display for IdParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a valid id (expected a UUID)")
    }
}

impl std::error::Error for IdParseError {}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// Creates a new, time-ordered (UUIDv7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Wraps an existing UUID.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// Returns the UUID inside.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }

            /// Returns the 16 bytes of the UUID, as stored.
            pub const fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            /// Builds the id from its 16 stored bytes.
            pub const fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(bytes))
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| IdParseError)
            }
        }
    };
}

uuid_id!(
    /// Identifies a user account.
    UserId
);
uuid_id!(
    /// Identifies one logged-in device (one session token) of a user.
    DeviceId
);
uuid_id!(
    /// Identifies a conversation: a direct thread between two users, or a group.
    ThreadId
);
uuid_id!(
    /// Identifies a stored message, unique across all threads.
    MessageId
);

/// The client-chosen id of a request, echoed verbatim in its answer: a string or an integer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReqId {
    /// An integer id, such as `7`.
    Int(i64),
    /// A string id, such as `"a1"`.
    Str(String),
}

impl fmt::Display for ReqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(n) => write!(f, "{n}"),
            Self::Str(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_strings_and_json() {
        let id = ThreadId::new();
        assert_eq!(id.to_string().parse::<ThreadId>(), Ok(id));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<ThreadId>(&json).unwrap(), id);
        assert!("not-an-id".parse::<UserId>().is_err());
    }

    #[test]
    fn request_ids_keep_their_json_type() {
        let int: ReqId = serde_json::from_str("42").unwrap();
        let text: ReqId = serde_json::from_str("\"42\"").unwrap();
        assert_eq!(int, ReqId::Int(42));
        assert_eq!(text, ReqId::Str("42".into()));
        assert_eq!(serde_json::to_string(&int).unwrap(), "42");
        assert_eq!(serde_json::to_string(&text).unwrap(), "\"42\"");
    }
}

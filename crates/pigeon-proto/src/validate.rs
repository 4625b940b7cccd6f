//! Input rules shared by the server and the clients.

use crate::{ErrorCode, UserId};

/// Shortest accepted password, in characters.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest accepted password, in bytes (hashing cost is bounded by it).
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Longest accepted `client_msg_id`, in bytes.
pub const MAX_CLIENT_MSG_ID_LEN: usize = 64;

/// Checks a username: 3–32 characters of `[a-z0-9_.-]`.
///
/// ```
/// assert!(pigeon_proto::validate_username("alice_1").is_ok());
/// assert!(pigeon_proto::validate_username("Al").is_err());
/// ```
pub fn validate_username(name: &str) -> Result<(), ErrorCode> {
    let ok_len = (3..=32).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(ErrorCode::InvalidUsername)
    }
}

/// Checks a password: at least 8 characters, at most 1 KiB.
pub fn validate_password(password: &str) -> Result<(), ErrorCode> {
    if password.chars().count() >= MIN_PASSWORD_LEN && password.len() <= MAX_PASSWORD_LEN {
        Ok(())
    } else {
        Err(ErrorCode::InvalidPassword)
    }
}

/// Checks a `client_msg_id`: 1–64 bytes, without U+0000 (which PostgreSQL text refuses).
pub fn validate_client_msg_id(id: &str) -> Result<(), ErrorCode> {
    if !id.is_empty() && id.len() <= MAX_CLIENT_MSG_ID_LEN && !id.contains('\0') {
        Ok(())
    } else {
        Err(ErrorCode::InvalidField)
    }
}

/// A reference to a user in a request: a user id, or a username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSpec {
    /// The user with this id.
    Id(UserId),
    /// The user with this username.
    Username(String),
}

impl UserSpec {
    /// Reads a user reference: a UUID is an id, anything else a username.
    /// Usernames are at most 32 characters, so they never look like a UUID.
    pub fn parse(text: &str) -> Self {
        match text.parse() {
            Ok(id) => Self::Id(id),
            Err(_) => Self::Username(text.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for good in ["abc", "a.b-c_d", "x23456789012345678901234567890ab"] {
            assert_eq!(validate_username(good), Ok(()), "{good}");
        }
        for bad in [
            "ab",
            "ABC",
            "a b",
            "é-user",
            "x234567890123456789012345678901ab",
            "",
        ] {
            assert_eq!(
                validate_username(bad),
                Err(ErrorCode::InvalidUsername),
                "{bad}"
            );
        }
    }

    #[test]
    fn passwords_and_client_ids() {
        assert!(validate_password("12345678").is_ok());
        assert!(validate_password("1234567").is_err());
        assert!(validate_password(&"x".repeat(2000)).is_err());
        assert!(validate_client_msg_id("").is_err());
        assert!(validate_client_msg_id(&"x".repeat(65)).is_err());
        assert!(validate_client_msg_id("m-1").is_ok());
        assert!(validate_client_msg_id("m\0").is_err());
    }

    #[test]
    fn user_spec_tells_ids_from_names() {
        let id = UserId::new();
        assert_eq!(UserSpec::parse(&id.to_string()), UserSpec::Id(id));
        assert_eq!(UserSpec::parse("bob"), UserSpec::Username("bob".into()));
    }
}

//! Reading a client frame, telling a bad request (answered) from a broken frame (closed).

use serde_json::Value;

use crate::{ClientFrame, ErrorCode, ReqId};

/// Why a text frame is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not a JSON object at all: the socket is closed with [`close::INVALID_PAYLOAD`](crate::close::INVALID_PAYLOAD).
    NotJson,
    /// A JSON object that is not a valid request: answered with an `error` frame.
    Invalid {
        /// The request id, when the object had a readable one.
        id: Option<ReqId>,
        /// `unknown_type`, `missing_field` or `invalid_field`.
        code: ErrorCode,
        /// What is wrong, for people.
        message: String,
    },
}

impl ClientFrame {
    /// Every `type` a client may send.
    pub const TYPES: &'static [&'static str] = &[
        "hello",
        "ping",
        "send",
        "mark",
        "history",
        "sync",
        "threads",
        "presence",
        "devices",
        "revoke_device",
        "create_group",
        "add_members",
        "remove_member",
        "leave_group",
        "update_group",
        "set_role",
        "transfer_ownership",
        "group_info",
        "group_members",
        "find_groups",
        "thread_settings",
        "typing",
        "contact",
        "set_alias",
        "contacts",
        "search_users",
        "set_privacy",
    ];

    /// Parses one text frame.
    ///
    /// ```
    /// use pigeon_proto::{ClientFrame, ErrorCode, FrameError, ReqId};
    /// assert!(ClientFrame::parse(r#"{"type":"ping","id":1}"#).is_ok());
    /// assert_eq!(ClientFrame::parse("hello"), Err(FrameError::NotJson));
    /// let Err(FrameError::Invalid { id, code, .. }) = ClientFrame::parse(r#"{"type":"fly","id":2}"#) else { panic!() };
    /// assert_eq!((id, code), (Some(ReqId::Int(2)), ErrorCode::UnknownType));
    /// ```
    pub fn parse(text: &str) -> Result<Self, FrameError> {
        let typed_error = match serde_json::from_str::<ClientFrame>(text) {
            Ok(frame) => return Ok(frame),
            Err(error) => error,
        };
        // Only failures pay for a second, untyped parse to say precisely what is wrong.
        let Ok(Value::Object(object)) = serde_json::from_str::<Value>(text) else {
            return Err(FrameError::NotJson);
        };
        let id = object
            .get("id")
            .cloned()
            .and_then(|id| serde_json::from_value::<ReqId>(id).ok());
        let invalid = |code, message: String| {
            Err(FrameError::Invalid {
                id: id.clone(),
                code,
                message,
            })
        };
        match object.get("type") {
            None => invalid(ErrorCode::MissingField, "missing field `type`".into()),
            Some(Value::String(kind)) if !Self::TYPES.contains(&kind.as_str()) => invalid(
                ErrorCode::UnknownType,
                format!("unknown frame type `{kind}`"),
            ),
            Some(Value::String(_)) => {
                let message = strip_position(&typed_error.to_string());
                let code = if message.starts_with("missing field") {
                    ErrorCode::MissingField
                } else {
                    ErrorCode::InvalidField
                };
                invalid(code, message)
            }
            Some(_) => invalid(ErrorCode::InvalidField, "`type` must be a string".into()),
        }
    }
}

/// Drops serde's " at line 1 column 42" suffix: the client knows which frame it sent.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(text: &str) -> (Option<ReqId>, ErrorCode, String) {
        match ClientFrame::parse(text) {
            Err(FrameError::Invalid { id, code, message }) => (id, code, message),
            other => panic!("expected an invalid frame, got {other:?}"),
        }
    }

    #[test]
    fn tells_what_is_wrong() {
        let (id, code, message) = invalid(r#"{"type":"send","id":"a","to":"bob","body":"x"}"#);
        assert_eq!(
            (id, code),
            (Some(ReqId::Str("a".into())), ErrorCode::MissingField)
        );
        assert_eq!(message, "missing field `client_msg_id`");

        let (_, code, message) =
            invalid(r#"{"type":"mark","id":1,"thread_id":"x","seq":1,"kind":"read"}"#);
        assert_eq!(code, ErrorCode::InvalidField, "{message}");

        let (_, code, _) = invalid(
            r#"{"type":"history","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000","limit":"ten"}"#,
        );
        assert_eq!(code, ErrorCode::InvalidField);

        assert_eq!(invalid(r#"{"id":3}"#).1, ErrorCode::MissingField);
        assert_eq!(invalid(r#"{"type":7,"id":3}"#).1, ErrorCode::InvalidField);
        assert_eq!(invalid(r#"{"type":"ping"}"#).0, None);
    }

    #[test]
    fn non_objects_are_not_requests() {
        for text in ["", "ping", "[1,2]", "\"text\"", "{\"type\":"] {
            assert_eq!(ClientFrame::parse(text), Err(FrameError::NotJson), "{text}");
        }
    }

    #[test]
    fn every_variant_type_is_listed() {
        let samples = [
            r#"{"type":"hello","id":1,"token":"t"}"#,
            r#"{"type":"ping","id":1}"#,
            r#"{"type":"send","id":1,"to":"bob","client_msg_id":"c","body":"b"}"#,
            r#"{"type":"mark","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000","seq":1,"kind":"read"}"#,
            r#"{"type":"history","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000"}"#,
            r#"{"type":"sync","id":1}"#,
            r#"{"type":"threads","id":1}"#,
            r#"{"type":"presence","id":1,"user":"bob"}"#,
            r#"{"type":"devices","id":1}"#,
            r#"{"type":"revoke_device","id":1,"device_id":"0190b4d4-7f6e-7cc3-8000-000000000000"}"#,
            r#"{"type":"create_group","id":1,"title":"t","members":["bob"]}"#,
            r#"{"type":"add_members","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000","members":["bob"]}"#,
            r#"{"type":"remove_member","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000","user":"bob"}"#,
            r#"{"type":"leave_group","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000"}"#,
            r#"{"type":"update_group","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000","title":"x"}"#,
            r#"{"type":"set_role","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000","user":"bob","role":"admin"}"#,
            r#"{"type":"transfer_ownership","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000","user":"bob"}"#,
            r#"{"type":"group_info","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000"}"#,
            r#"{"type":"group_members","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000"}"#,
            r#"{"type":"find_groups","id":1,"members":["bob"]}"#,
            r#"{"type":"thread_settings","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000","muted":true}"#,
            r#"{"type":"typing","id":1,"thread_id":"0190b4d4-7f6e-7cc3-8000-000000000000"}"#,
            r#"{"type":"contact","id":1,"user":"bob","action":"block"}"#,
            r#"{"type":"set_alias","id":1,"user":"bob","alias":"Bobby"}"#,
            r#"{"type":"contacts","id":1}"#,
            r#"{"type":"search_users","id":1,"prefix":"bo"}"#,
            r#"{"type":"set_privacy","id":1,"hide_last_seen":true}"#,
        ];
        assert_eq!(samples.len(), ClientFrame::TYPES.len());
        for (sample, kind) in samples.iter().zip(ClientFrame::TYPES) {
            let frame = ClientFrame::parse(sample).unwrap_or_else(|e| panic!("{sample}: {e:?}"));
            let value = serde_json::to_value(&frame).unwrap();
            assert_eq!(value["type"], *kind);
        }
    }
}

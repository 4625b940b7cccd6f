//! `send`: store a message (once per client_msg_id), ack after commit, deliver to members.

use pigeon_proto::{MessageKind, ReqId, ServerFrame, ThreadId, validate_client_msg_id};
use pigeon_store::NewMessage;

use crate::publish::Item;
use crate::{Caller, ChatError, ChatService, Result};

pub(crate) struct Send {
    pub(crate) id: ReqId,
    pub(crate) to: Option<String>,
    pub(crate) thread_id: Option<ThreadId>,
    pub(crate) client_msg_id: String,
    pub(crate) body: String,
}

pub(crate) async fn execute(
    chat: &ChatService,
    caller: &Caller,
    request: Send,
) -> Result<ServerFrame> {
    validate_client_msg_id(&request.client_msg_id).map_err(|_| {
        ChatError::InvalidField("client_msg_id: must be 1 to 64 bytes, without U+0000".into())
    })?;
    let limit = chat.config.max_body_bytes;
    if request.body.len() > limit {
        return Err(ChatError::BodyTooLarge {
            size: request.body.len(),
            limit,
        });
    }
    if request.body.trim().is_empty() {
        return Err(ChatError::InvalidField("body: must not be empty".into()));
    }
    // Text in PostgreSQL cannot hold it; refused on every store, so both behave alike.
    if request.body.contains('\0') {
        return Err(ChatError::InvalidField(
            "body: must not contain U+0000".into(),
        ));
    }
    let thread_id = match (request.to, request.thread_id) {
        (Some(to), None) => {
            let peer = super::resolve_user(chat, &to).await?;
            if peer.id == caller.user_id {
                return Err(ChatError::InvalidField(
                    "to: cannot message yourself".into(),
                ));
            }
            // Checked before the thread exists, so a blocker never sees an empty new thread.
            if chat.store.is_blocked(peer.id, caller.user_id).await? {
                return Err(ChatError::Blocked);
            }
            chat.store
                .get_or_create_direct_thread(caller.user_id, peer.id)
                .await?
        }
        (None, Some(thread_id)) => thread_id,
        (None, None) => return Err(ChatError::MissingField("to or thread_id")),
        (Some(_), Some(_)) => {
            return Err(ChatError::InvalidField(
                "request: give either to or thread_id, not both".into(),
            ));
        }
    };

    let queue = chat.publisher.queue();
    let skip = caller.conn;
    let appended = chat
        .store
        .append_message(
            NewMessage {
                thread_id,
                sender_id: caller.user_id,
                sender_device_id: caller.device_id,
                client_msg_id: request.client_msg_id,
                kind: MessageKind::Text,
                body: request.body,
            },
            Box::new(move |appended| {
                if !appended.duplicate {
                    let item = Item::Committed {
                        message: appended.message.clone(),
                        members: appended.members.clone(),
                        skip,
                    };
                    let _ = queue.send(item);
                }
            }),
        )
        .await?;
    let message = appended.message;
    Ok(ServerFrame::Sent {
        id: request.id,
        client_msg_id: message.client_msg_id,
        thread_id: message.thread_id,
        seq: message.seq,
        message_id: message.message_id,
        server_time: message.created_at,
    })
}

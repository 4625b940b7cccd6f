//! `send`: store a message (once per client_msg_id), ack after commit, deliver to members.

use pigeon_proto::{
    ClientFrame, Message, MessageKind, ReqId, ServerFrame, ThreadId, validate_client_msg_id,
};
use pigeon_store::{CommitHook, NewMessage, StoreError};

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
    check(chat, &request.client_msg_id, &request.body)?;
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
    let (message, hook) = prepare(chat, caller, thread_id, request.client_msg_id, request.body);
    let appended = chat.store.append_message(message, hook).await?;
    Ok(sent(request.id, appended.message))
}

/// Several sends into known threads (`thread_id`, no `to`), as one connection had them
/// waiting: stored in this order, usually in one transaction, each answered on its own,
/// in the same order.
pub(crate) async fn execute_many(
    chat: &ChatService,
    caller: &Caller,
    frames: Vec<ClientFrame>,
) -> Vec<ServerFrame> {
    // Each request's id, and its error when it never reaches the store.
    let mut answers: Vec<(ReqId, Option<ChatError>)> = Vec::with_capacity(frames.len());
    let mut ready = Vec::with_capacity(frames.len());
    for frame in frames {
        let ClientFrame::Send {
            id,
            to: None,
            thread_id: Some(thread_id),
            client_msg_id,
            body,
        } = frame
        else {
            let error =
                ChatError::InvalidField("request: only sends with thread_id go together".into());
            answers.push((frame.id().clone(), Some(error)));
            continue;
        };
        match check(chat, &client_msg_id, &body) {
            Ok(()) => {
                ready.push(prepare(chat, caller, thread_id, client_msg_id, body));
                answers.push((id, None));
            }
            Err(error) => answers.push((id, Some(error))),
        }
    }
    // Nothing for the store when every request failed its checks.
    let outcomes = if ready.is_empty() {
        Vec::new()
    } else {
        chat.store.append_messages(ready).await
    };
    let mut outcomes = outcomes.into_iter();
    answers
        .into_iter()
        .map(|(id, refused)| {
            let outcome = match refused {
                Some(error) => Err(error),
                None => outcomes
                    .next()
                    .unwrap_or_else(|| {
                        Err(StoreError::Internal("a send without an outcome".into()))
                    })
                    .map_err(ChatError::from),
            };
            match outcome {
                Ok(appended) => sent(id, appended.message),
                Err(error) => error.frame(Some(id)),
            }
        })
        .collect()
}

/// The checks that need nothing but the request.
fn check(chat: &ChatService, client_msg_id: &str, body: &str) -> Result<()> {
    validate_client_msg_id(client_msg_id).map_err(|_| {
        ChatError::InvalidField("client_msg_id: must be 1 to 64 bytes, without U+0000".into())
    })?;
    let limit = chat.config.max_body_bytes;
    if body.len() > limit {
        return Err(ChatError::BodyTooLarge {
            size: body.len(),
            limit,
        });
    }
    if body.trim().is_empty() {
        return Err(ChatError::InvalidField("body: must not be empty".into()));
    }
    // Text in PostgreSQL cannot hold it; refused on every store, so both behave alike.
    if body.contains('\0') {
        return Err(ChatError::InvalidField(
            "body: must not contain U+0000".into(),
        ));
    }
    Ok(())
}

/// The store's message, and the hook that hands it to the publisher once committed.
fn prepare(
    chat: &ChatService,
    caller: &Caller,
    thread_id: ThreadId,
    client_msg_id: String,
    body: String,
) -> (NewMessage, CommitHook) {
    let queue = chat.publisher.queue();
    let skip = caller.conn;
    let message = NewMessage {
        thread_id,
        sender_id: caller.user_id,
        sender_device_id: caller.device_id,
        client_msg_id,
        kind: MessageKind::Text,
        body,
    };
    let hook: CommitHook = Box::new(move |appended| {
        if !appended.duplicate {
            let item = Item::Committed {
                message: appended.message.clone(),
                members: appended.members.clone(),
                skip,
            };
            let _ = queue.send(item);
        }
    });
    (message, hook)
}

fn sent(id: ReqId, message: Message) -> ServerFrame {
    ServerFrame::Sent {
        id,
        client_msg_id: message.client_msg_id,
        thread_id: message.thread_id,
        seq: message.seq,
        message_id: message.message_id,
        server_time: message.created_at,
    }
}

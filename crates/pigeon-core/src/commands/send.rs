//! `send`: store a message (once per client_msg_id), ack after commit, deliver to members.

use pigeon_proto::{Message, MessageKind, ReqId, ServerFrame, ThreadId, validate_client_msg_id};
use pigeon_store::{CommitHook, NewMessage};

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
    check(chat, &request)?;
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
    requests: Vec<Send>,
) -> Vec<ServerFrame> {
    let mut answers: Vec<(ReqId, Option<Result<ServerFrame>>)> = Vec::with_capacity(requests.len());
    let mut ready = Vec::with_capacity(requests.len());
    for request in requests {
        let checked = check(chat, &request).and_then(|()| match (&request.to, request.thread_id) {
            (None, Some(thread_id)) => Ok(thread_id),
            _ => Err(ChatError::InvalidField(
                "request: sends taken together need thread_id".into(),
            )),
        });
        match checked {
            Ok(thread_id) => {
                ready.push(prepare(
                    chat,
                    caller,
                    thread_id,
                    request.client_msg_id,
                    request.body,
                ));
                answers.push((request.id, None));
            }
            Err(error) => answers.push((request.id, Some(Err(error)))),
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
        .map(|(id, answer)| {
            let answer = answer.unwrap_or_else(|| match outcomes.next() {
                Some(outcome) => outcome
                    .map(|appended| sent(id.clone(), appended.message))
                    .map_err(ChatError::from),
                None => Err(ChatError::Internal("a send without an outcome".into())),
            });
            answer.unwrap_or_else(|error| crate::service::error_frame(id, &error))
        })
        .collect()
}

/// The checks that need nothing but the request.
fn check(chat: &ChatService, request: &Send) -> Result<()> {
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

//! One file per request type; [`execute`] dispatches a frame to its command.

mod devices;
mod history;
mod mark;
mod presence;
mod send;
mod sync;
mod threads;

use pigeon_proto::{ClientFrame, ServerFrame};

use crate::{Caller, ChatError, ChatService, Result, now_ms};

/// Runs one request for `caller` and returns its answer.
pub(crate) async fn execute(
    chat: &ChatService,
    caller: &Caller,
    frame: ClientFrame,
) -> Result<ServerFrame> {
    match frame {
        ClientFrame::Hello { .. } => Err(ChatError::Forbidden(
            "this connection is already authenticated",
        )),
        ClientFrame::Ping { id } => Ok(ServerFrame::Pong {
            id,
            server_time: now_ms(),
        }),
        ClientFrame::Send {
            id,
            to,
            thread_id,
            client_msg_id,
            body,
        } => {
            send::execute(
                chat,
                caller,
                send::Send {
                    id,
                    to,
                    thread_id,
                    client_msg_id,
                    body,
                },
            )
            .await
        }
        ClientFrame::Mark {
            id,
            thread_id,
            seq,
            kind,
        } => mark::execute(chat, caller, id, thread_id, seq, kind).await,
        ClientFrame::History {
            id,
            thread_id,
            before,
            after,
            limit,
        } => {
            history::execute(
                chat,
                caller,
                history::History {
                    id,
                    thread_id,
                    before,
                    after,
                    limit,
                },
            )
            .await
        }
        ClientFrame::Sync { id, have, limit } => {
            sync::execute(chat, caller, id, &have, limit).await
        }
        ClientFrame::Threads { id } => threads::execute(chat, caller, id).await,
        ClientFrame::Presence { id, user } => presence::execute(chat, id, &user).await,
        ClientFrame::Devices { id } => devices::list(chat, caller, id).await,
        ClientFrame::RevokeDevice { id, device_id } => {
            devices::revoke(chat, caller, id, device_id).await
        }
    }
}

/// Resolves a user given by id or username.
pub(crate) async fn resolve_user(chat: &ChatService, spec: &str) -> Result<pigeon_store::User> {
    let user = match pigeon_proto::UserSpec::parse(spec) {
        pigeon_proto::UserSpec::Id(id) => chat.store.get_user(id).await?,
        pigeon_proto::UserSpec::Username(name) => chat.store.get_user_by_username(&name).await?,
    };
    user.ok_or(ChatError::UnknownUser)
}

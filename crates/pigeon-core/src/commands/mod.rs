//! One file per request type; [`execute`] dispatches a frame to its command.

mod contacts;
mod devices;
mod group;
mod history;
mod mark;
mod presence;
mod send;
mod settings;
mod sync;
mod threads;
mod typing;

pub(crate) use send::execute_many as execute_sends;
pub(crate) use typing::TypingThrottle;

use pigeon_proto::{ClientFrame, ServerFrame};
use pigeon_store::{GroupChange, SettingsPatch};

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
        ClientFrame::Sync {
            id,
            have,
            limit,
            events_after,
            threads_from,
            threads_before,
        } => {
            let range = sync::Range {
                from: threads_from,
                before: threads_before,
            };
            sync::execute(chat, caller, id, &have, limit, events_after, range).await
        }
        ClientFrame::Threads { id } => threads::execute(chat, caller, id).await,
        ClientFrame::Presence { id, user } => presence::execute(chat, caller, id, &user).await,
        ClientFrame::Devices { id } => devices::list(chat, caller, id).await,
        ClientFrame::RevokeDevice { id, device_id } => {
            devices::revoke(chat, caller, id, device_id).await
        }
        ClientFrame::CreateGroup {
            id,
            title,
            members,
            topic,
            avatar,
            share_history,
        } => {
            group::create(
                chat,
                caller,
                group::Create {
                    id,
                    title,
                    members,
                    topic,
                    avatar,
                    share_history,
                },
            )
            .await
        }
        ClientFrame::AddMembers {
            id,
            thread_id,
            members,
        } => group::add(chat, caller, id, thread_id, &members).await,
        ClientFrame::RemoveMember {
            id,
            thread_id,
            user,
        } => {
            group::about_user(
                chat,
                caller,
                id,
                thread_id,
                &user,
                GroupChange::RemoveMember,
            )
            .await
        }
        ClientFrame::LeaveGroup { id, thread_id } => {
            group::change(chat, caller, id, thread_id, GroupChange::Leave).await
        }
        ClientFrame::UpdateGroup {
            id,
            thread_id,
            title,
            topic,
            avatar,
            share_history,
        } => {
            let change = GroupChange::Update {
                title,
                topic,
                avatar,
                share_history,
            };
            group::change(chat, caller, id, thread_id, change).await
        }
        ClientFrame::SetRole {
            id,
            thread_id,
            user,
            role,
        } => {
            group::about_user(chat, caller, id, thread_id, &user, |user| {
                GroupChange::SetRole(user, role)
            })
            .await
        }
        ClientFrame::TransferOwnership {
            id,
            thread_id,
            user,
        } => {
            group::about_user(
                chat,
                caller,
                id,
                thread_id,
                &user,
                GroupChange::TransferOwnership,
            )
            .await
        }
        ClientFrame::GroupInfo { id, thread_id } => group::info(chat, caller, id, thread_id).await,
        ClientFrame::GroupMembers {
            id,
            thread_id,
            after,
            limit,
        } => group::members(chat, caller, id, thread_id, after, limit).await,
        ClientFrame::FindGroups { id, members } => group::find(chat, caller, id, &members).await,
        ClientFrame::ThreadSettings {
            id,
            thread_id,
            muted,
            pinned,
            archived,
            nickname,
        } => {
            let patch = SettingsPatch {
                muted,
                pinned,
                archived,
                nickname,
            };
            settings::thread(chat, caller, id, thread_id, patch).await
        }
        ClientFrame::Typing {
            id,
            thread_id,
            active,
        } => typing::execute(chat, caller, id, thread_id, active).await,
        ClientFrame::Contact { id, user, action } => {
            contacts::act(chat, caller, id, &user, action).await
        }
        ClientFrame::SetAlias { id, user, alias } => {
            contacts::alias(chat, caller, id, &user, alias).await
        }
        ClientFrame::Contacts { id } => contacts::list(chat, caller, id).await,
        ClientFrame::SearchUsers { id, prefix, limit } => {
            contacts::search(chat, caller, id, &prefix, limit).await
        }
        ClientFrame::SetPrivacy { id, hide_last_seen } => {
            settings::privacy(chat, caller, id, hide_last_seen).await
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

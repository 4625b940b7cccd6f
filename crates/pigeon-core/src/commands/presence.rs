//! `presence`: whether a user is online, and when they were last seen.

use pigeon_proto::{ReqId, ServerFrame};

use crate::{Caller, ChatError, ChatService, Result};

pub(crate) async fn execute(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    user: &str,
) -> Result<ServerFrame> {
    let user = super::resolve_user(chat, user).await?;
    // Presence is visible to friends and thread peers the user has not blocked; everyone
    // else gets the same answer, so a block reveals nothing.
    if !chat.store.can_see_presence(caller.user_id, user.id).await? {
        return Err(ChatError::Forbidden(
            "presence is visible to contacts and people sharing a chat",
        ));
    }
    chat.presence_frame(Some(id), user.id, user.username).await
}

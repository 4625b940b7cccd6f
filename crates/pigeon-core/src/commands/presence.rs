//! `presence`: whether a user is online, and when they were last seen.

use pigeon_proto::{ReqId, ServerFrame};

use crate::{ChatService, Result};

pub(crate) async fn execute(chat: &ChatService, id: ReqId, user: &str) -> Result<ServerFrame> {
    let user = super::resolve_user(chat, user).await?;
    chat.presence_frame(Some(id), user.id, user.username).await
}

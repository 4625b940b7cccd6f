//! `threads`: the conversation list, most recent first, with the total unread.

use pigeon_proto::{ReqId, ServerFrame};

use crate::{Caller, ChatService, Result};

pub(crate) async fn execute(chat: &ChatService, caller: &Caller, id: ReqId) -> Result<ServerFrame> {
    let threads = chat.store.list_threads(caller.user_id).await?;
    let total_unread = threads.iter().filter(|t| !t.muted).map(|t| t.unread).sum();
    Ok(ServerFrame::Threads {
        id,
        threads,
        total_unread,
    })
}

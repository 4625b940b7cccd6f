//! `thread_settings` and `set_privacy`: the caller's own settings, synced to their devices.

use pigeon_proto::{ReqId, ServerFrame, ThreadId};
use pigeon_store::SettingsPatch;

use crate::{Caller, ChatError, ChatService, Result};

/// Longest private name for a thread, in characters.
const MAX_NICKNAME_CHARS: usize = 128;

pub(crate) async fn thread(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    thread_id: ThreadId,
    patch: SettingsPatch,
) -> Result<ServerFrame> {
    if patch
        .nickname
        .as_deref()
        .is_some_and(|n| n.chars().count() > MAX_NICKNAME_CHARS)
    {
        return Err(ChatError::LimitExceeded(format!(
            "nickname is longer than {MAX_NICKNAME_CHARS} characters"
        )));
    }
    let (settings, record) = chat
        .store
        .set_thread_settings(caller.user_id, thread_id, patch)
        .await?;
    chat.publish_user_events(vec![(caller.user_id, record)])
        .await;
    Ok(ServerFrame::Settings {
        id,
        thread_id,
        settings,
    })
}

pub(crate) async fn privacy(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    hide_last_seen: bool,
) -> Result<ServerFrame> {
    let record = chat
        .store
        .set_privacy(caller.user_id, hide_last_seen)
        .await?;
    chat.publish_user_events(vec![(caller.user_id, record)])
        .await;
    Ok(ServerFrame::Ok { id })
}

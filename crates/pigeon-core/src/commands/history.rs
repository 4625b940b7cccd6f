//! `history`: a page of a thread, backwards from `before` or forwards from `after`.

use pigeon_proto::{ReqId, ServerFrame, ThreadId};
use pigeon_store::{PageFrom, SeqRange};

use crate::{Caller, ChatService, Result};

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 200;

pub(crate) struct History {
    pub(crate) id: ReqId,
    pub(crate) thread_id: ThreadId,
    pub(crate) before: Option<u64>,
    pub(crate) after: Option<u64>,
    pub(crate) limit: Option<u32>,
}

pub(crate) async fn execute(
    chat: &ChatService,
    caller: &Caller,
    request: History,
) -> Result<ServerFrame> {
    let membership = chat
        .store
        .get_membership(request.thread_id, caller.user_id)
        .await?;
    let limit = request.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    // A member never sees messages from before it joined.
    let range = SeqRange {
        after: request.after.unwrap_or(0).max(membership.joined_seq),
        before: request.before.unwrap_or(u64::MAX),
    };
    // With only `before` (or nothing) the page is the newest part of the range; with `after`
    // it is the oldest part, to fill a gap forwards.
    let from = if request.after.is_some() {
        PageFrom::Oldest
    } else {
        PageFrom::Newest
    };
    let mut messages = chat
        .store
        .list_messages(request.thread_id, range, from, limit + 1)
        .await?;
    let more = messages.len() > limit as usize;
    if more {
        match from {
            PageFrom::Newest => drop(messages.drain(..1)),
            PageFrom::Oldest => messages.truncate(limit as usize),
        }
    }
    Ok(ServerFrame::History {
        id: request.id,
        thread_id: request.thread_id,
        messages,
        more,
    })
}

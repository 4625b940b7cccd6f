//! `sync`: everything a client missed, from the highest contiguous seq it holds per thread.

use std::collections::HashMap;

use pigeon_proto::{ReqId, ServerFrame, ThreadId};
use pigeon_store::{PageFrom, SeqRange};

use crate::{Caller, ChatError, ChatService, Result};

const DEFAULT_LIMIT: u32 = 500;
const MAX_LIMIT: u32 = 1000;
/// Most per-user events in one page.
const MAX_EVENTS: u32 = 500;

/// The part of the thread id space one `sync` covers: all of it by default. A client with
/// more threads than one frame can list in `have` walks the space range by range.
pub(crate) struct Range {
    pub(crate) from: Option<ThreadId>,
    pub(crate) before: Option<ThreadId>,
}

impl Range {
    fn contains(&self, thread_id: ThreadId) -> bool {
        pigeon_proto::in_sync_range(thread_id, self.from, self.before)
    }
}

/// Threads the client does not know, or with messages past what it holds, are returned
/// with those messages (oldest first), up to `limit` messages per page. `more` asks the
/// client to call again with `have` advanced. Messages committed after this snapshot reach
/// the client as live events, since its connection was registered before it asked.
pub(crate) async fn execute(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    have: &HashMap<ThreadId, u64>,
    limit: Option<u32>,
    events_after: Option<u64>,
    range: Range,
) -> Result<ServerFrame> {
    if let (Some(from), Some(before)) = (range.from, range.before)
        && from >= before
    {
        return Err(ChatError::InvalidField(
            "threads_before: must come after threads_from".into(),
        ));
    }
    let limit = limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT) as u64;
    let mut threads = Vec::new();
    let mut messages = Vec::new();
    let mut more = false;
    for summary in chat.store.list_threads(caller.user_id).await? {
        if !range.contains(summary.thread_id) {
            continue;
        }
        let held = have.get(&summary.thread_id).copied();
        // Never below what the member may see.
        let from_seq = held.unwrap_or(0).max(summary.joined_seq);
        if held.is_some() && summary.last_seq <= from_seq {
            continue;
        }
        let missing = summary.last_seq.saturating_sub(from_seq);
        let room = limit - messages.len() as u64;
        if missing > 0 && room > 0 {
            let take = missing.min(room);
            let range = SeqRange {
                after: from_seq,
                before: summary.last_seq + 1,
            };
            let page = chat
                .store
                .list_messages(summary.thread_id, range, PageFrom::Oldest, take as u32)
                .await?;
            messages.extend(page);
        }
        more |= missing > room;
        threads.push(summary);
    }
    let (events, event_cursor, events_reset) = match events_after {
        Some(after) => {
            let page = chat
                .store
                .list_user_events(caller.user_id, after, MAX_EVENTS)
                .await?;
            let cursor = page.events.last().map_or(page.last_seq, |e| e.seq);
            more |= cursor < page.last_seq;
            (page.events, cursor, page.reset)
        }
        None => (
            Vec::new(),
            chat.store
                .list_user_events(caller.user_id, u64::MAX, 1)
                .await?
                .last_seq,
            false,
        ),
    };
    Ok(ServerFrame::Sync {
        id,
        threads,
        messages,
        more,
        events,
        event_cursor,
        events_reset,
    })
}

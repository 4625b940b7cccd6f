//! `mark`: move a delivered or read marker; other members get a receipt, the user's devices
//! a `read` user event.

use pigeon_proto::{MarkKind, ReqId, ServerFrame, ThreadId};

use crate::{Caller, ChatService, Result};

pub(crate) async fn execute(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    thread_id: ThreadId,
    seq: u64,
    kind: MarkKind,
) -> Result<ServerFrame> {
    let update = chat
        .store
        .set_marker(thread_id, caller.user_id, kind, seq)
        .await?;
    if update.changed {
        // The other members get a receipt; the user's own devices get the logged event.
        // Receipts are for small threads; a big group's markers still count its unread.
        let others: Vec<_> = if update.members.len() <= pigeon_store::PRESENCE_GROUP_LIMIT as usize
        {
            update
                .members
                .iter()
                .copied()
                .filter(|m| *m != caller.user_id)
                .collect()
        } else {
            Vec::new()
        };
        let receipt = ServerFrame::Receipt {
            thread_id,
            user_id: caller.user_id,
            kind,
            seq: update.seq,
        };
        if !others.is_empty() {
            chat.publish(others.into(), caller.conn, &receipt).await?;
        }
        if let Some(record) = update.user_event {
            chat.publish_user_events(vec![(caller.user_id, record)])
                .await;
        }
    }
    Ok(ServerFrame::Ok { id })
}

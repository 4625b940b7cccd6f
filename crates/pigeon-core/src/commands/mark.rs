//! `mark`: move a delivered or read marker; members and the user's other devices get a receipt.

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
        let receipt = ServerFrame::Receipt {
            thread_id,
            user_id: caller.user_id,
            kind,
            seq: update.seq,
        };
        chat.publish(update.members, caller.conn, &receipt).await?;
    }
    Ok(ServerFrame::Ok { id })
}

//! Publishes committed messages in commit order.
//!
//! The store calls a hook for each message as its transaction commits, in seq order per
//! thread. The hook only queues; one task encodes each event once and hands it to the bus,
//! so recipients receive a thread's messages in seq order however the senders' tasks are
//! scheduled.

use std::sync::Arc;

use pigeon_bus::{Bus, ConnId, Envelope, Payload};
use pigeon_proto::{Message, ServerFrame, UserId};
use tokio::sync::{mpsc, oneshot};

use crate::service::encode;

/// What the publishing task is given. Nearly every item is a message, so boxing it would
/// only add an allocation per message.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Item {
    /// A committed message, for the thread's members except the sending connection.
    Committed {
        message: Message,
        members: Arc<[UserId]>,
        skip: Option<ConnId>,
    },
    /// Answered once everything queued before it is published.
    Flush(oneshot::Sender<()>),
}

pub(crate) struct Publisher {
    queue_tx: mpsc::UnboundedSender<Item>,
}

impl Publisher {
    pub(crate) fn start(bus: Arc<dyn Bus>) -> Self {
        let (queue_tx, mut queue_rx) = mpsc::unbounded_channel::<Item>();
        tokio::spawn(async move {
            while let Some(item) = queue_rx.recv().await {
                let (message, members, skip) = match item {
                    Item::Committed {
                        message,
                        members,
                        skip,
                    } => (message, members, skip),
                    Item::Flush(done) => {
                        let _ = done.send(());
                        continue;
                    }
                };
                let payload = match encode(&ServerFrame::Message(message)) {
                    Ok(bytes) => Payload::Frame(bytes),
                    Err(error) => {
                        tracing::error!(%error, "dropping event; clients recover it by sync");
                        continue;
                    }
                };
                if let Err(error) = bus
                    .publish(Envelope {
                        users: members,
                        skip,
                        payload,
                    })
                    .await
                {
                    tracing::warn!(%error, "publish failed; clients recover the message by sync");
                }
            }
        });
        Self { queue_tx }
    }

    /// Returns a sender for the store's commit hook.
    pub(crate) fn queue(&self) -> mpsc::UnboundedSender<Item> {
        self.queue_tx.clone()
    }

    /// Waits until everything queued so far is published.
    pub(crate) async fn drain(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.queue_tx.send(Item::Flush(done_tx)).is_ok() {
            let _ = done_rx.await;
        }
    }
}

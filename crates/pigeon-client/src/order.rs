//! Exactly once, in order: messages are handed on only when they extend the highest
//! contiguous seq of their thread; earlier seqs are duplicates, later ones wait for the gap
//! to be filled.

use std::collections::{BTreeMap, HashMap};

use pigeon_proto::{Message, ThreadId};

#[derive(Default)]
pub(crate) struct Ordering {
    /// Highest seq handed on, per known thread.
    pub(crate) contiguous: HashMap<ThreadId, u64>,
    /// Messages past a gap, waiting.
    waiting: HashMap<ThreadId, BTreeMap<u64, Message>>,
}

/// What ingesting a message did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Ingested {
    /// Messages now ready, in order.
    pub(crate) ready: Vec<Message>,
    /// A gap (or an unknown thread) needs a sync.
    pub(crate) needs_sync: bool,
}

impl Ordering {
    /// Starts tracking a thread at `seq` unless it is tracked already (or further).
    pub(crate) fn know(&mut self, thread_id: ThreadId, seq: u64) {
        let entry = self.contiguous.entry(thread_id).or_insert(seq);
        *entry = (*entry).max(seq);
    }

    pub(crate) fn ingest(&mut self, message: Message) -> Ingested {
        let thread_id = message.thread_id;
        let Some(&held) = self.contiguous.get(&thread_id) else {
            // A thread never seen: keep it until a sync tells where it starts.
            self.waiting
                .entry(thread_id)
                .or_default()
                .insert(message.seq, message);
            return Ingested {
                ready: Vec::new(),
                needs_sync: true,
            };
        };
        if message.seq <= held {
            return Ingested::default();
        }
        self.waiting
            .entry(thread_id)
            .or_default()
            .insert(message.seq, message);
        let ready = self.drain(thread_id);
        let needs_sync = self.waiting.get(&thread_id).is_some_and(|w| !w.is_empty());
        Ingested { ready, needs_sync }
    }

    /// Whether any message waits for a gap to close.
    pub(crate) fn has_waiting(&self) -> bool {
        self.waiting.values().any(|w| !w.is_empty())
    }

    /// Hands on what became contiguous after `know` (e.g. a thread's start is now known).
    pub(crate) fn drain(&mut self, thread_id: ThreadId) -> Vec<Message> {
        let Some(held) = self.contiguous.get_mut(&thread_id) else {
            return Vec::new();
        };
        let Some(waiting) = self.waiting.get_mut(&thread_id) else {
            return Vec::new();
        };
        // Anything at or below the mark is a duplicate.
        while waiting
            .first_key_value()
            .is_some_and(|(seq, _)| *seq <= *held)
        {
            waiting.pop_first();
        }
        let mut ready = Vec::new();
        while let Some(message) = waiting.remove(&(*held + 1)) {
            *held += 1;
            ready.push(message);
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use pigeon_proto::{DeviceId, MessageId, MessageKind, UserId};

    use super::*;

    fn message(thread_id: ThreadId, seq: u64) -> Message {
        Message {
            thread_id,
            seq,
            message_id: MessageId::new(),
            sender_id: UserId::new(),
            sender_device_id: DeviceId::new(),
            client_msg_id: format!("c{seq}"),
            kind: MessageKind::Text,
            body: String::new(),
            system: None,
            created_at: 0,
        }
    }

    #[test]
    fn duplicates_vanish_and_gaps_wait() {
        let thread = ThreadId::new();
        let mut ordering = Ordering::default();
        ordering.know(thread, 0);
        assert_eq!(ordering.ingest(message(thread, 1)).ready.len(), 1);
        assert!(
            ordering.ingest(message(thread, 1)).ready.is_empty(),
            "a duplicate"
        );
        let gap = ordering.ingest(message(thread, 3));
        assert!(gap.ready.is_empty() && gap.needs_sync);
        let filled = ordering.ingest(message(thread, 2));
        let seqs: Vec<u64> = filled.ready.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [2, 3]);
        assert!(!filled.needs_sync);
    }

    #[test]
    fn unknown_threads_wait_for_their_start() {
        let thread = ThreadId::new();
        let mut ordering = Ordering::default();
        assert!(ordering.ingest(message(thread, 5)).needs_sync);
        ordering.know(thread, 4);
        assert_eq!(ordering.drain(thread).len(), 1);
    }
}

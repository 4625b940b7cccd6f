//! A socket's outbound queue: events the bus hands over, waiting for the session to write them.
//!
//! Most connections are idle most of the time, so the queue holds no buffer until its first
//! event. Then a `VecDeque` of a few slots is kept (so fan-out to a member does not
//! allocate per event), and a buffer a burst grew past [`KEEP_CAPACITY`] slots is dropped
//! once it has been written. A channel crate would allocate its nodes, its sender handle and its
//! parking queue up front for every connection (about 250 B each, measured), and its
//! sender needs `&mut` to send, which forced the registry to write-lock a shard per
//! delivery. The mailbox is one small allocation, shared by the registry (producer, many
//! threads) and the session (the one consumer), and also carries the time the client was
//! last heard from, which the sweep reads.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tungstenite::Utf8Bytes;

/// What a socket's session is asked to do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outbound {
    /// Send this encoded frame.
    Frame(Utf8Bytes),
    /// Close with this code and reason (after the frames queued before it).
    Close(u16, &'static str),
}

/// Why an event was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue was full: it is now closed with the code given, so the client reconnects
    /// and syncs instead of silently missing the event.
    Full,
    /// The session is already closing; the event is not needed.
    Closing,
}

/// Slots a drained queue may keep; a larger buffer is given back.
const KEEP_CAPACITY: usize = 8;

struct Queue {
    frames: VecDeque<Utf8Bytes>,
    /// Set once; taken by the session after the frames queued before it.
    close: Option<(u16, &'static str)>,
    /// The close has been handed to the session.
    closed: bool,
}

/// One WebSocket session's queue of outbound events, and its activity clock.
pub(crate) struct Mailbox {
    queue: Mutex<Queue>,
    waker: AtomicWaker,
    capacity: usize,
    /// When the client was last heard from, in the registry's clock (milliseconds).
    heard: AtomicU64,
}

impl Mailbox {
    /// An empty mailbox holding at most `capacity` frames.
    pub(crate) fn new(capacity: usize, now: u64) -> Self {
        Self {
            queue: Mutex::new(Queue {
                frames: VecDeque::new(),
                close: None,
                closed: false,
            }),
            waker: AtomicWaker::new(),
            capacity: capacity.max(1),
            heard: AtomicU64::new(now),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock leaves the queue consistent: every method
        // changes it with single assignments.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a frame. When the queue is full, closes it with `overflow` instead.
    pub(crate) fn push(
        &self,
        frame: Utf8Bytes,
        overflow: (u16, &'static str),
    ) -> Result<(), Refused> {
        let result = {
            let mut queue = self.lock();
            if queue.close.is_some() || queue.closed {
                return Err(Refused::Closing);
            }
            if queue.frames.len() >= self.capacity {
                queue.close = Some(overflow);
                Err(Refused::Full)
            } else {
                queue.frames.push_back(frame);
                Ok(())
            }
        };
        self.waker.wake();
        result
    }

    /// Asks the session to close once it has written what is already queued. The first
    /// close asked for wins. Returns whether this one was taken.
    pub(crate) fn close(&self, code: u16, reason: &'static str) -> bool {
        let taken = {
            let mut queue = self.lock();
            if queue.close.is_some() || queue.closed {
                false
            } else {
                queue.close = Some((code, reason));
                true
            }
        };
        if taken {
            self.waker.wake();
        }
        taken
    }

    /// The next thing to do, if any is ready now.
    pub(crate) fn try_next(&self) -> Option<Outbound> {
        let mut queue = self.lock();
        if let Some(frame) = queue.frames.pop_front() {
            if queue.frames.is_empty() && queue.frames.capacity() > KEEP_CAPACITY {
                queue.frames = VecDeque::new();
            }
            return Some(Outbound::Frame(frame));
        }
        if queue.closed {
            return None;
        }
        let (code, reason) = queue.close?;
        queue.closed = true;
        Some(Outbound::Close(code, reason))
    }

    /// Waits for the next thing to do. Only the session calls this. Once the close has been
    /// handed out, it stays pending.
    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Outbound> {
        if let Some(next) = self.try_next() {
            return Poll::Ready(next);
        }
        self.waker.register(cx.waker());
        // Whatever was pushed between the check and the registration would have woken the
        // previous waker: look again.
        match self.try_next() {
            Some(next) => Poll::Ready(next),
            None => Poll::Pending,
        }
    }

    /// Waits for the next thing to do.
    pub(crate) fn next(&self) -> impl Future<Output = Outbound> + '_ {
        std::future::poll_fn(|cx| self.poll_next(cx))
    }

    /// Records that the client was heard from at `now`.
    pub(crate) fn heard_at(&self, now: u64) {
        self.heard.store(now, Ordering::Relaxed);
    }

    /// When the client was last heard from.
    pub(crate) fn last_heard(&self) -> u64 {
        self.heard.load(Ordering::Relaxed)
    }

    /// Frames waiting, and whether a close is asked for (for tests).
    #[cfg(test)]
    fn pending(&self) -> (usize, usize, bool) {
        let queue = self.lock();
        (
            queue.frames.len(),
            queue.frames.capacity(),
            queue.close.is_some(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const OVERFLOW: (u16, &str) = (1013, "too far behind");

    fn frame(text: &'static str) -> Utf8Bytes {
        Utf8Bytes::from_static(text)
    }

    #[test]
    fn an_idle_mailbox_holds_no_buffer_and_gives_a_drained_one_back() {
        let mailbox = Mailbox::new(64, 0);
        assert_eq!(mailbox.pending(), (0, 0, false));
        for _ in 0..40 {
            mailbox.push(frame("e"), OVERFLOW).unwrap();
        }
        assert!(mailbox.pending().1 >= 40);
        for _ in 0..40 {
            assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("e"))));
        }
        assert_eq!(mailbox.pending(), (0, 0, false));
        assert_eq!(mailbox.try_next(), None);
    }

    #[test]
    fn frames_come_out_in_order_and_the_close_after_them() {
        let mailbox = Mailbox::new(8, 0);
        mailbox.push(frame("a"), OVERFLOW).unwrap();
        mailbox.push(frame("b"), OVERFLOW).unwrap();
        assert!(mailbox.close(1000, "bye"));
        assert!(!mailbox.close(1001, "second close is ignored"));
        assert_eq!(mailbox.push(frame("c"), OVERFLOW), Err(Refused::Closing));
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("a"))));
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("b"))));
        assert_eq!(mailbox.try_next(), Some(Outbound::Close(1000, "bye")));
        assert_eq!(mailbox.try_next(), None);
    }

    #[test]
    fn a_full_mailbox_closes_instead_of_dropping() {
        let mailbox = Mailbox::new(2, 0);
        mailbox.push(frame("a"), OVERFLOW).unwrap();
        mailbox.push(frame("b"), OVERFLOW).unwrap();
        assert_eq!(mailbox.push(frame("c"), OVERFLOW), Err(Refused::Full));
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("a"))));
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("b"))));
        assert_eq!(
            mailbox.try_next(),
            Some(Outbound::Close(OVERFLOW.0, OVERFLOW.1))
        );
    }

    #[tokio::test]
    async fn a_waiting_session_wakes_for_a_push_from_another_thread() {
        let mailbox = Arc::new(Mailbox::new(8, 0));
        let producer = mailbox.clone();
        let waiter = tokio::spawn(async move { mailbox.next().await });
        tokio::task::yield_now().await;
        std::thread::spawn(move || producer.push(frame("x"), OVERFLOW).unwrap())
            .join()
            .unwrap();
        assert_eq!(waiter.await.unwrap(), Outbound::Frame(frame("x")));
    }
}

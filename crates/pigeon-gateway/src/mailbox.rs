//! A socket's outbound queue, and the socket itself: the fan-out writes an event straight
//! into an idle socket, and queues it for the session only when that cannot be done at once.
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
//!
//! **Direct writes.** Waking a session task to write one event costs more than the write
//! itself: for a 10,000-member group, 10,000 task wakeups per message were most of the
//! fan-out's time. So when a socket has nothing queued and nothing half-written, the
//! fan-out writes the event's frame (framed once for all recipients: server frames are
//! not masked) with a non-blocking `try_write`, under the mailbox's lock. Every other
//! write to the socket also happens under that lock, through [`Wire`], so two writers can
//! never interleave inside a frame:
//! - a write that leaves part of its buffer unwritten marks the socket `partial` until a
//!   later write finishes it (both tungstenite and `write_all` hand over the whole rest of
//!   their buffer on every call, so a finished call ends on a frame boundary);
//! - a direct write that only got part of a frame out leaves the rest as the `tail`, which
//!   the next write of any kind sends first, and wakes the session to send it;
//! - while the session holds frames it took from the queue but has not written, it is
//!   `busy`, and events queue behind them, so order is kept.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tungstenite::Utf8Bytes;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};

/// What a socket's session is asked to do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outbound {
    /// Send this encoded frame.
    Frame(Utf8Bytes),
    /// Finish the frame the fan-out wrote in part.
    Tail,
    /// Close with this code and reason (after the frames queued before it).
    Close(u16, &'static str),
}

/// How an event was taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Written to the socket (or its start written, and the rest left to the session).
    Written,
    /// Queued for the session.
    Queued,
}

/// Why an event was not taken.
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

/// Appends `text` to `out` as one WebSocket text frame (unmasked, as a server sends).
pub(crate) fn push_frame(out: &mut Vec<u8>, text: Utf8Bytes) {
    let frame = Frame::message(text, OpCode::Data(Data::Text), true);
    out.reserve(frame.len());
    // Writing into a Vec cannot fail.
    let _ = frame.format(out);
}

/// Events on their way to many sockets: the texts, and their frames as one run of bytes,
/// made at most once (on the first direct write) however many sockets take them.
pub(crate) struct Events<'a> {
    texts: &'a [Utf8Bytes],
    framed: std::cell::OnceCell<Bytes>,
}

impl<'a> Events<'a> {
    pub(crate) fn new(texts: &'a [Utf8Bytes]) -> Self {
        Self {
            texts,
            framed: std::cell::OnceCell::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.texts.len()
    }

    fn framed(&self) -> &Bytes {
        self.framed.get_or_init(|| {
            let mut out = Vec::new();
            for text in self.texts {
                push_frame(&mut out, text.clone());
            }
            Bytes::from(out)
        })
    }
}

struct Queue {
    frames: VecDeque<Utf8Bytes>,
    /// Set once; taken by the session after the frames queued before it.
    close: Option<(u16, &'static str)>,
    /// The close has been handed to the session, or the session stopped: nothing more is
    /// taken.
    closed: bool,
    /// The session holds frames it took and has not finished writing, or is not serving
    /// yet: events queue.
    busy: bool,
    /// A write stopped inside its buffer: nothing else may go out until it is finished.
    partial: bool,
    /// The rest of a direct write that got out only in part; it goes out before anything else.
    tail: Option<Bytes>,
}

/// One WebSocket session's socket, its queue of outbound events, and its activity clock.
pub(crate) struct Mailbox {
    queue: Mutex<Queue>,
    waker: AtomicWaker,
    capacity: usize,
    /// When the client was last heard from, in the registry's clock (milliseconds).
    heard: AtomicU64,
    /// The socket; `None` only in unit tests of the queue.
    stream: Option<TcpStream>,
}

impl Mailbox {
    /// An empty mailbox holding at most `capacity` frames (or, when empty, one longer run
    /// of events), not yet taking direct writes
    /// (until [`Mailbox::ready`]).
    pub(crate) fn new(capacity: usize, now: u64, stream: Option<TcpStream>) -> Self {
        Self {
            queue: Mutex::new(Queue {
                frames: VecDeque::new(),
                close: None,
                closed: false,
                busy: true,
                partial: false,
                tail: None,
            }),
            waker: AtomicWaker::new(),
            capacity: capacity.max(1),
            heard: AtomicU64::new(now),
            stream,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock leaves the queue consistent: every method
        // changes it with single assignments.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes the events straight to the socket when it is idle, or else queues them.
    /// When the queue has no room for them, closes it with `overflow` instead.
    pub(crate) fn push(
        &self,
        events: &Events<'_>,
        overflow: (u16, &'static str),
    ) -> Result<Taken, Refused> {
        let result = {
            let mut queue = self.lock();
            if queue.close.is_some() || queue.closed {
                return Err(Refused::Closing);
            }
            if let Some(taken) = self.write_now(&mut queue, events) {
                return Ok(taken);
            }
            // A run of events longer than the whole queue still fits an empty one.
            if !queue.frames.is_empty() && queue.frames.len() + events.len() > self.capacity {
                queue.close = Some(overflow);
                Err(Refused::Full)
            } else {
                queue.frames.extend(events.texts.iter().cloned());
                Ok(Taken::Queued)
            }
        };
        self.waker.wake();
        result
    }

    /// The direct write: `None` when the events must be queued instead.
    fn write_now(&self, queue: &mut Queue, events: &Events<'_>) -> Option<Taken> {
        let stream = self.stream.as_ref()?;
        if queue.busy || queue.partial || queue.tail.is_some() || !queue.frames.is_empty() {
            return None;
        }
        let framed = events.framed();
        match stream.try_write(framed) {
            Ok(written) if written == framed.len() => Some(Taken::Written),
            Ok(written) if written > 0 => {
                queue.tail = Some(framed.slice(written..));
                // Not `None`: the start is on the wire. The session writes the rest.
                self.waker.wake();
                Some(Taken::Written)
            }
            // Would block, or the socket failed (the session's own I/O will see it).
            _ => None,
        }
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

    /// The session has nothing of its own left to write (`welcome` is out, or what it
    /// took from the queue is written): events may be written straight into the socket.
    pub(crate) fn ready(&self) {
        self.lock().busy = false;
    }

    /// The session is ending: nothing is written directly any more (not after its close
    /// frame, above all), and nothing more is queued.
    pub(crate) fn stop(&self) {
        self.lock().closed = true;
    }

    /// The next thing to do, if any is ready now. Taking a frame makes the session busy
    /// until it calls [`Mailbox::ready`].
    pub(crate) fn try_next(&self) -> Option<Outbound> {
        let mut queue = self.lock();
        if let Some(frame) = queue.frames.pop_front() {
            queue.busy = true;
            if queue.frames.is_empty() && queue.frames.capacity() > KEEP_CAPACITY {
                queue.frames = VecDeque::new();
            }
            return Some(Outbound::Frame(frame));
        }
        if queue.tail.is_some() {
            return Some(Outbound::Tail);
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

    fn stream(&self) -> io::Result<&TcpStream> {
        self.stream
            .as_ref()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// Writes what [`Wire::poll_write`] was given, after any tail, under the lock.
    /// `WouldBlock` when nothing of `buf` could go out yet.
    fn write_locked(&self, stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
        let mut queue = self.lock();
        while let Some(tail) = queue.tail.as_mut() {
            let written = stream.try_write(tail)?;
            if written == tail.len() {
                queue.tail = None;
            } else {
                let _ = tail.split_to(written);
            }
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let written = stream.try_write(buf)?;
        queue.partial = written < buf.len();
        Ok(written)
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

/// The session's side of the socket in a mailbox: what tungstenite reads from and writes
/// to. Its writes take the mailbox's lock, so they never interleave with a direct write.
pub(crate) struct Wire(pub(crate) std::sync::Arc<Mailbox>);

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = self.0.stream()?;
        loop {
            ready!(stream.poll_read_ready(cx))?;
            match stream.try_read(buf.initialize_unfilled()) {
                Ok(read) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                // The readiness was stale; it is cleared now, so the next poll waits.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let stream = self.0.stream()?;
        loop {
            match self.0.write_locked(stream, buf) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
            ready!(stream.poll_write_ready(cx))?;
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The only bytes held back are a direct write's tail.
        self.poll_write(cx, &[]).map_ok(|_| ())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The socket closes when the mailbox is dropped, after the session unregisters.
        self.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncWriteExt;

    use super::*;

    const OVERFLOW: (u16, &str) = (1013, "too far behind");

    fn frame(text: &'static str) -> Utf8Bytes {
        Utf8Bytes::from_static(text)
    }

    fn push(mailbox: &Mailbox, text: &'static str) -> Result<Taken, Refused> {
        mailbox.push(&Events::new(&[frame(text)]), OVERFLOW)
    }

    #[test]
    fn an_idle_mailbox_holds_no_buffer_and_gives_a_drained_one_back() {
        let mailbox = Mailbox::new(64, 0, None);
        assert_eq!(mailbox.pending(), (0, 0, false));
        for _ in 0..40 {
            push(&mailbox, "e").unwrap();
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
        let mailbox = Mailbox::new(8, 0, None);
        push(&mailbox, "a").unwrap();
        push(&mailbox, "b").unwrap();
        assert!(mailbox.close(1000, "bye"));
        assert!(!mailbox.close(1001, "second close is ignored"));
        assert_eq!(push(&mailbox, "c"), Err(Refused::Closing));
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("a"))));
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("b"))));
        assert_eq!(mailbox.try_next(), Some(Outbound::Close(1000, "bye")));
        assert_eq!(mailbox.try_next(), None);
    }

    #[test]
    fn a_full_mailbox_closes_instead_of_dropping() {
        let mailbox = Mailbox::new(2, 0, None);
        push(&mailbox, "a").unwrap();
        push(&mailbox, "b").unwrap();
        assert_eq!(push(&mailbox, "c"), Err(Refused::Full));
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("a"))));
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("b"))));
        assert_eq!(
            mailbox.try_next(),
            Some(Outbound::Close(OVERFLOW.0, OVERFLOW.1))
        );
    }

    #[tokio::test]
    async fn a_waiting_session_wakes_for_a_push_from_another_thread() {
        let mailbox = Arc::new(Mailbox::new(8, 0, None));
        let producer = mailbox.clone();
        let waiter = tokio::spawn(async move { mailbox.next().await });
        tokio::task::yield_now().await;
        std::thread::spawn(move || push(&producer, "x").unwrap())
            .join()
            .unwrap();
        assert_eq!(waiter.await.unwrap(), Outbound::Frame(frame("x")));
    }

    /// A connected pair: the server's end in a mailbox, and the client's end.
    async fn socket_pair(capacity: usize) -> (Arc<Mailbox>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // The runtime has seen that the socket can take writes (a direct write is only
        // tried then).
        server.writable().await.unwrap();
        (Arc::new(Mailbox::new(capacity, 0, Some(server))), client)
    }

    fn framed(texts: &[Utf8Bytes]) -> Vec<u8> {
        let mut out = Vec::new();
        for text in texts {
            push_frame(&mut out, text.clone());
        }
        out
    }

    async fn read_exactly(client: &mut tokio::net::TcpStream, len: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = vec![0; len];
        client.read_exact(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn an_open_idle_socket_is_written_at_once_and_a_busy_one_queues() {
        let (mailbox, mut client) = socket_pair(8).await;
        // Not open yet (the session has not said welcome): queued.
        assert_eq!(push(&mailbox, "early"), Ok(Taken::Queued));
        mailbox.ready();
        // Something is queued: the next one queues behind it.
        assert_eq!(push(&mailbox, "second"), Ok(Taken::Queued));
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("early"))));
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("second"))));
        // The session holds them and has not written them: still queued.
        assert_eq!(push(&mailbox, "third"), Ok(Taken::Queued));
        let mut wire = Wire(mailbox.clone());
        wire.write_all(&framed(&[frame("early"), frame("second")]))
            .await
            .unwrap();
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("third"))));
        wire.write_all(&framed(&[frame("third")])).await.unwrap();
        mailbox.ready();
        // Idle now: written by the pusher itself, and nothing is left for the session.
        assert_eq!(push(&mailbox, "fourth"), Ok(Taken::Written));
        assert_eq!(mailbox.try_next(), None);
        let expected = framed(&["early", "second", "third", "fourth"].map(frame));
        assert_eq!(read_exactly(&mut client, expected.len()).await, expected);
        // A stopped session takes nothing more.
        mailbox.stop();
        assert_eq!(push(&mailbox, "late"), Err(Refused::Closing));
        assert_eq!(mailbox.try_next(), None);
    }

    /// Pushes big events at a socket whose client does not read, until one direct write
    /// gets only part of its frame out. `None` when the buffers happened to fill up exactly
    /// (the next event was queued, with no tail).
    fn fill_until_tail(mailbox: &Mailbox) -> Option<Vec<Utf8Bytes>> {
        let mut sent = Vec::new();
        for n in 0..400 {
            let text = Utf8Bytes::from(format!("{n:06}").repeat(20_000));
            let taken = mailbox.push(&Events::new(std::slice::from_ref(&text)), OVERFLOW);
            if taken != Ok(Taken::Written) {
                return None;
            }
            sent.push(text);
            if mailbox.try_next() == Some(Outbound::Tail) {
                return Some(sent);
            }
        }
        panic!("the socket never filled up");
    }

    #[tokio::test]
    async fn the_rest_of_a_partial_direct_write_goes_out_before_anything_else() {
        let mut attempts = 0;
        let (mailbox, mut client, sent) = loop {
            attempts += 1;
            assert!(attempts <= 10, "no direct write stopped inside a frame");
            let (mailbox, client) = socket_pair(1024).await;
            mailbox.ready();
            if let Some(sent) = fill_until_tail(&mailbox) {
                break (mailbox, client, sent);
            }
        };
        // Neither an event nor the session's own write may cut into the tail.
        assert_eq!(push(&mailbox, "after"), Ok(Taken::Queued));
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut wire = Wire(mailbox.clone());
        wire.write_all(&framed(&[frame("answer")])).await.unwrap();
        assert_eq!(mailbox.try_next(), Some(Outbound::Frame(frame("after"))));
        wire.write_all(&framed(&[frame("after")])).await.unwrap();
        mailbox.ready();
        assert_eq!(mailbox.try_next(), None);
        drop(wire);
        drop(Arc::into_inner(mailbox).expect("the last handle"));
        let mut expected = framed(&sent);
        expected.extend(framed(&[frame("answer"), frame("after")]));
        let got = reader.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the bytes on the wire are out of order");
    }
}

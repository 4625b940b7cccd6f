//! Members that only listen, read by a few threads of their own over `epoll` (mio).
//!
//! The bench shares this machine's two cores with the server, so whatever the bench spends
//! reading its members' sockets is taken from the fan-out it measures. A tokio task per
//! member with tungstenite's reader cost about 5.5 µs of CPU per delivery (task wakeups, a
//! timer re-armed per frame, tungstenite's buffering), about 40% of all the CPU a message
//! to 10,000 members took. Here each socket, once past the handshake and `welcome` (done
//! with the SDK's connection code), is read raw: each thread waits on its share of the
//! sockets, reads each ready one until it would block, and takes the server's frames apart
//! itself (server frames are never masked). Each read also brings the time the kernel
//! received its last byte (`SO_TIMESTAMPNS`), so "reached the member" does not include
//! the time the bench took to get to the socket.

use std::io::{ErrorKind, Write as _};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// What a listener does with the text frames it receives.
pub(crate) trait Listen: Send + 'static {
    /// A listener's own record of what it has seen (to find duplicates).
    type Seen: Default + Send;
    /// One text frame, read at `read`; `arrived` is when the kernel received it (for all
    /// the frames of one read, when the last of their bytes arrived), or `read` when the
    /// kernel did not say.
    fn frame(&self, text: &str, arrived: Instant, read: Instant, seen: &mut Self::Seen);
}

/// How often a listener pings, well inside the server's default heartbeat timeout, so
/// runs longer than it keep their sockets.
const PING_EVERY: Duration = Duration::from_secs(20);

/// The largest frame taken; a longer one means the stream is not what it should be.
const MAX_FRAME: usize = 16 << 20;

/// The listening threads, and what they found wrong.
pub(crate) struct Listeners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Sockets that ended, or sent something that is not a server frame, before the end.
    pub(crate) broken: Arc<AtomicU64>,
}

struct Member<S> {
    stream: TcpStream,
    /// The start of a frame that has not fully arrived.
    partial: Vec<u8>,
    seen: S,
}

impl Listeners {
    /// Starts reading `streams` on `threads` threads of niceness `nice`, each waiting on its
    /// share of the sockets. Each stream comes with the bytes already read from it past the
    /// handshake (see [`super::common::connect_raw`]).
    pub(crate) fn start<L: Listen + Clone>(
        streams: Vec<(std::net::TcpStream, Vec<u8>)>,
        listen: &L,
        threads: usize,
        nice: i32,
    ) -> std::io::Result<Self> {
        // Built first: if starting a later thread fails, dropping it stops the earlier ones.
        let mut listeners = Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            broken: Arc::new(AtomicU64::new(0)),
        };
        if streams.is_empty() {
            return Ok(listeners);
        }
        let threads = threads.clamp(1, streams.len());
        let mut shares: Vec<Vec<_>> = (0..threads).map(|_| Vec::new()).collect();
        for (index, stream) in streams.into_iter().enumerate() {
            shares[index % threads].push(stream);
        }
        for (index, share) in shares.into_iter().enumerate() {
            let poll = Poll::new()?;
            let mut members = Vec::with_capacity(share.len());
            for (token, (stream, read)) in share.into_iter().enumerate() {
                stream.set_nonblocking(true)?;
                // The time a frame reached the socket, not when a thread got to it: the
                // bench shares the cores with the server, so its reading lags the arrivals.
                setsockopt(&stream, sockopt::ReceiveTimestampns, &true)?;
                let mut stream = TcpStream::from_std(stream);
                poll.registry()
                    .register(&mut stream, Token(token), Interest::READABLE)?;
                members.push((
                    Member {
                        stream,
                        partial: Vec::new(),
                        seen: L::Seen::default(),
                    },
                    read,
                ));
            }
            let (stop, broken, listen) = (
                listeners.stop.clone(),
                listeners.broken.clone(),
                listen.clone(),
            );
            listeners.threads.push(
                std::thread::Builder::new()
                    .name(format!("bench-listen-{index}"))
                    .spawn(move || {
                        // Linux keeps a niceness per thread: the listeners alone yield.
                        let me = rustix::thread::gettid();
                        if let Err(error) = rustix::process::setpriority_process(Some(me), nice) {
                            tracing::warn!(%error, nice, "could not set the listeners' niceness");
                        }
                        run(poll, members, &listen, &stop, &broken);
                    })?,
            );
        }
        Ok(listeners)
    }

    /// Stops reading and closes the sockets.
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run<L: Listen>(
    mut poll: Poll,
    members: Vec<(Member<L::Seen>, Vec<u8>)>,
    listen: &L,
    stop: &AtomicBool,
    broken: &AtomicU64,
) {
    // What the handshake read past its answer goes first (`welcome`, and whatever came
    // right behind it).
    let mut members: Vec<_> = members
        .into_iter()
        .map(|(mut member, read)| {
            let now = Instant::now();
            take(&mut member, &read, now, now, listen).then_some(member)
        })
        .collect();
    broken.fetch_add(
        members.iter().filter(|member| member.is_none()).count() as u64,
        Ordering::Relaxed,
    );
    let mut events = Events::with_capacity(1024);
    let mut scratch = Scratch {
        data: vec![0u8; 64 * 1024],
        control: nix::cmsg_space!(nix::sys::time::TimeSpec),
    };
    let mut pings = Pings::new(members.len());
    while !stop.load(Ordering::Relaxed) {
        if let Err(error) = poll.poll(&mut events, Some(Duration::from_millis(50))) {
            if error.kind() == ErrorKind::Interrupted {
                continue;
            }
            let open = members.iter().flatten().count();
            tracing::warn!(%error, sockets = open, "a listener thread stopped waiting");
            broken.fetch_add(open as u64, Ordering::Relaxed);
            return;
        }
        for event in &events {
            let slot = &mut members[event.token().0];
            if let Some(member) = slot
                && !read(member, &mut scratch, listen)
            {
                drop_member(&poll, slot, broken);
            }
        }
        for due in pings.due() {
            let slot = &mut members[due];
            if let Some(member) = slot
                && !send(
                    &member.stream,
                    br#"{"type":"ping","id":0}"#,
                    OpCode::Data(Data::Text),
                )
            {
                drop_member(&poll, slot, broken);
            }
        }
    }
}

fn drop_member<S>(poll: &Poll, slot: &mut Option<Member<S>>, broken: &AtomicU64) {
    if let Some(mut member) = slot.take() {
        let _ = poll.registry().deregister(&mut member.stream);
        broken.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes one client frame whole; `false` when it could not be (a part of a frame would
/// leave the stream broken; a full send buffer is not expected for a ping).
fn send(mut stream: &TcpStream, payload: &[u8], opcode: OpCode) -> bool {
    let mut frame = Vec::new();
    client_frame(payload, opcode, &mut frame);
    matches!(stream.write(&frame), Ok(written) if written == frame.len())
}

/// Each member pings once per [`PING_EVERY`], at its own point of the period (as real
/// clients do, who connected at different times), not all at once: 10,000 pings in one
/// burst land on whatever message is fanning out then.
struct Pings {
    start: Instant,
    members: usize,
    /// Pings sent so far; member `sent % members` is next.
    sent: u64,
}

impl Pings {
    fn new(members: usize) -> Self {
        Self {
            start: Instant::now(),
            members,
            sent: 0,
        }
    }

    /// The members whose ping is due now.
    fn due(&mut self) -> impl Iterator<Item = usize> + use<> {
        // Nobody to ping: nothing is ever owed (and `% members` below is never by zero).
        let members = self.members as u64;
        let periods = self.start.elapsed().as_secs_f64() / PING_EVERY.as_secs_f64();
        let owed = (periods * members as f64) as u64;
        let from = self.sent;
        self.sent = owed.max(from);
        (from..self.sent).map(move |n| (n % members) as usize)
    }
}

/// The reading thread's buffers: for the bytes, and for the arrival time.
struct Scratch {
    data: Vec<u8>,
    control: Vec<u8>,
}

/// One read of a socket: how many bytes, when the last of them arrived, and when they were
/// read. The kernel's timestamp is wall-clock time: what counts is how long the bytes
/// waited, taken off the monotonic clock.
fn receive(stream: &TcpStream, scratch: &mut Scratch) -> nix::Result<(usize, Instant, Instant)> {
    let mut iov = [std::io::IoSliceMut::new(&mut scratch.data)];
    let message = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut scratch.control),
        MsgFlags::empty(),
    )?;
    // Control data the kernel cut short only costs the timestamp, not the bytes.
    let arrived = message.cmsgs().ok().and_then(|mut controls| {
        controls.find_map(|control| match control {
            ControlMessageOwned::ScmTimestampns(at) => {
                Some(SystemTime::UNIX_EPOCH + Duration::from(at))
            }
            _ => None,
        })
    });
    let read = Instant::now();
    let waited = arrived.and_then(|arrived| SystemTime::now().duration_since(arrived).ok());
    let arrived = waited.map_or(read, |waited| read.checked_sub(waited).unwrap_or(read));
    Ok((message.bytes, arrived, read))
}

/// Reads a member's socket until it would block, handing each text frame to `listen`.
/// `false` when the socket ended or carried something else than server frames.
fn read<L: Listen>(member: &mut Member<L::Seen>, scratch: &mut Scratch, listen: &L) -> bool {
    loop {
        let (bytes, arrived, read) = match receive(&member.stream, scratch) {
            Ok((0, ..)) => return false,
            Ok(received) => received,
            Err(nix::Error::EAGAIN) => return true,
            Err(nix::Error::EINTR) => continue,
            Err(_) => return false,
        };
        if !take(member, &scratch.data[..bytes], arrived, read, listen) {
            return false;
        }
    }
}

/// Takes the frames that `bytes` completes (after what was left of the last read), and
/// keeps the start of an unfinished one. `false` when the stream is done or broken.
fn take<L: Listen>(
    member: &mut Member<L::Seen>,
    bytes: &[u8],
    arrived: Instant,
    read: Instant,
    listen: &L,
) -> bool {
    let mut data = std::mem::take(&mut member.partial);
    let joined = !data.is_empty();
    let bytes = if joined {
        data.extend_from_slice(bytes);
        &data[..]
    } else {
        bytes
    };
    let mut pong = None;
    let Some(used) = frames(bytes, |opcode, payload| match opcode {
        OpCode::Data(Data::Text) => match std::str::from_utf8(payload) {
            Ok(text) => {
                listen.frame(text, arrived, read, &mut member.seen);
                true
            }
            Err(_) => false,
        },
        OpCode::Control(Control::Ping) => {
            pong = Some(payload.to_vec());
            true
        }
        OpCode::Control(Control::Close) => false,
        _ => true,
    }) else {
        return false;
    };
    if let Some(payload) = pong
        && !send(&member.stream, &payload, OpCode::Control(Control::Pong))
    {
        return false;
    }
    // The start of an unfinished frame is kept, in the buffer it was joined in if any.
    member.partial = if joined {
        data.drain(..used);
        data
    } else {
        bytes[used..].to_vec()
    };
    true
}

/// Hands each complete server frame at the start of `bytes` to `each`; returns how many
/// bytes they took, or `None` when a frame is not a whole unmasked server frame or `each`
/// says the stream is done.
fn frames(bytes: &[u8], mut each: impl FnMut(OpCode, &[u8]) -> bool) -> Option<usize> {
    let mut at = 0;
    loop {
        let rest = &bytes[at..];
        let [first, second, ..] = *rest else {
            return Some(at);
        };
        // Fragmented, extended (reserved bits) or masked: not what our server sends.
        if first & 0x80 == 0 || first & 0x70 != 0 || second & 0x80 != 0 {
            return None;
        }
        let (len, header) = match second & 0x7f {
            126 => match rest.get(2..4) {
                Some(len) => (usize::from(u16::from_be_bytes([len[0], len[1]])), 4),
                None => return Some(at),
            },
            127 => match rest.get(2..10) {
                Some(len) => (
                    usize::try_from(u64::from_be_bytes(len.try_into().ok()?)).ok()?,
                    10,
                ),
                None => return Some(at),
            },
            len => (usize::from(len), 2),
        };
        if len > MAX_FRAME {
            return None;
        }
        let Some(payload) = rest.get(header..header + len) else {
            return Some(at);
        };
        if !each(OpCode::from(first & 0x0f), payload) {
            return None;
        }
        at += header + len;
    }
}

/// Appends a client frame (masked, as every client frame must be).
fn client_frame(payload: &[u8], opcode: OpCode, out: &mut Vec<u8>) {
    let mut frame = Frame::message(payload.to_vec(), opcode, true);
    let random = uuid::Uuid::now_v7();
    let bytes = random.as_bytes();
    frame.header_mut().mask = Some([bytes[12], bytes[13], bytes[14], bytes[15]]);
    // Writing into a Vec cannot fail.
    let _ = frame.format(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(payload: &[u8], opcode: u8) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            len @ 0..126 => out.push(len as u8),
            len @ 126..65_536 => {
                out.push(126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn frames_are_taken_whole_and_a_partial_one_is_left() {
        let long = vec![b'x'; 300];
        let huge = vec![b'y'; 70_000];
        let mut bytes = server_frame(b"one", 1);
        bytes.extend(server_frame(&long, 1));
        bytes.extend(server_frame(&huge, 1));
        let whole = bytes.len();
        bytes.extend(&server_frame(b"four", 1)[..3]);
        let mut seen = Vec::new();
        let used = frames(&bytes, |_, payload| {
            seen.push(payload.len());
            true
        });
        assert_eq!(used, Some(whole));
        assert_eq!(seen, [3, 300, 70_000]);
    }

    #[test]
    fn masked_or_fragmented_frames_are_refused() {
        let mut masked = server_frame(b"abc", 1);
        masked[1] |= 0x80;
        assert_eq!(frames(&masked, |_, _| true), None);
        let mut fragment = server_frame(b"abc", 1);
        fragment[0] &= 0x7f;
        assert_eq!(frames(&fragment, |_, _| true), None);
    }

    #[test]
    fn pings_are_spread_over_the_period_and_none_without_members() {
        let ago = |seconds| Instant::now() - Duration::from_secs(seconds);
        let mut none = Pings {
            start: ago(25),
            members: 0,
            sent: 0,
        };
        assert_eq!(none.due().count(), 0);
        // Half a period in, half of the members have pinged, each once.
        let mut four = Pings {
            start: ago(10),
            members: 4,
            sent: 0,
        };
        assert_eq!(four.due().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(four.due().count(), 0);
    }

    /// Collects the texts it is given.
    #[derive(Clone, Default)]
    struct Texts(Arc<std::sync::Mutex<Vec<String>>>);

    impl Listen for Texts {
        type Seen = ();
        fn frame(&self, text: &str, _: Instant, _: Instant, (): &mut ()) {
            self.0.lock().unwrap().push(text.to_owned());
        }
    }

    #[test]
    fn bytes_read_ahead_are_taken_first_and_a_frame_may_span_reads() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut member = Member {
            stream: TcpStream::from_std(stream),
            partial: Vec::new(),
            seen: (),
        };
        let texts = Texts::default();
        let now = Instant::now();
        // What the handshake read past its answer: `welcome`, and the start of the next.
        let mut ahead = server_frame(br#"{"type":"welcome"}"#, 1);
        let next = server_frame(br#"{"type":"message"}"#, 1);
        ahead.extend_from_slice(&next[..5]);
        assert!(take(&mut member, &ahead, now, now, &texts));
        assert_eq!(member.partial, &next[..5]);
        assert!(take(&mut member, &next[5..], now, now, &texts));
        assert!(member.partial.is_empty());
        assert_eq!(
            *texts.0.lock().unwrap(),
            [r#"{"type":"welcome"}"#, r#"{"type":"message"}"#]
        );
        // A close ends the member.
        assert!(!take(&mut member, &server_frame(b"", 8), now, now, &texts));
    }

    #[test]
    fn a_client_frame_is_masked_and_unmasks_to_its_payload() {
        let mut out = Vec::new();
        client_frame(b"hello", OpCode::Data(Data::Text), &mut out);
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x80 | 5);
        let mask = &out[2..6];
        let payload: Vec<u8> = out[6..]
            .iter()
            .enumerate()
            .map(|(i, byte)| byte ^ mask[i % 4])
            .collect();
        assert_eq!(payload, b"hello");
    }
}

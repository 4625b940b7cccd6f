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

use std::io::{ErrorKind, Write};
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
    /// One text frame; `arrived` is when the kernel put it into the listener's socket
    /// (the last of the frames one read returned), when it said.
    fn frame(&self, text: &str, arrived: Option<SystemTime>, seen: &mut Self::Seen);
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
    /// Starts reading `streams` (each past its `welcome`, with nothing of it unread) on
    /// `threads` threads of niceness `nice`, each waiting on its share of the sockets.
    pub(crate) fn start<L: Listen + Clone>(
        streams: Vec<std::net::TcpStream>,
        listen: &L,
        threads: usize,
        nice: i32,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let broken = Arc::new(AtomicU64::new(0));
        let threads = threads.clamp(1, streams.len().max(1));
        let mut shares: Vec<Vec<std::net::TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
        for (index, stream) in streams.into_iter().enumerate() {
            shares[index % threads].push(stream);
        }
        let mut handles = Vec::with_capacity(threads);
        for (index, share) in shares.into_iter().enumerate() {
            let poll = Poll::new()?;
            let mut members = Vec::with_capacity(share.len());
            for (token, stream) in share.into_iter().enumerate() {
                stream.set_nonblocking(true)?;
                // The time a frame reached the socket, not when a thread got to it: the
                // bench shares the cores with the server, so its reading lags the arrivals.
                setsockopt(&stream, sockopt::ReceiveTimestampns, &true)?;
                let mut stream = TcpStream::from_std(stream);
                poll.registry()
                    .register(&mut stream, Token(token), Interest::READABLE)?;
                members.push(Some(Member {
                    stream,
                    partial: Vec::new(),
                    seen: L::Seen::default(),
                }));
            }
            let (stopped, broken, listen) = (stop.clone(), broken.clone(), listen.clone());
            let handle = std::thread::Builder::new()
                .name(format!("bench-listen-{index}"))
                .spawn(move || {
                    // Linux keeps a niceness per thread: the listeners alone yield.
                    if let Err(error) =
                        rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice)
                    {
                        tracing::warn!(%error, nice, "could not set the listeners' niceness");
                    }
                    run(poll, members, &listen, &stopped, &broken);
                });
            match handle {
                Ok(handle) => handles.push(handle),
                Err(error) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(error);
                }
            }
        }
        Ok(Self {
            stop,
            threads: handles,
            broken,
        })
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
    mut members: Vec<Option<Member<L::Seen>>>,
    listen: &L,
    stop: &AtomicBool,
    broken: &AtomicU64,
) {
    let mut events = Events::with_capacity(1024);
    let mut scratch = Scratch {
        data: vec![0u8; 64 * 1024],
        control: nix::cmsg_space!(nix::sys::time::TimeSpec),
    };
    let mut pings = Pings::new(members.len());
    while !stop.load(Ordering::Relaxed) {
        if poll
            .poll(&mut events, Some(Duration::from_millis(50)))
            .is_err_and(|error| error.kind() != ErrorKind::Interrupted)
        {
            break;
        }
        for event in &events {
            let slot = &mut members[event.token().0];
            let Some(member) = slot else { continue };
            if !read(member, &mut scratch, listen) {
                let _ = poll.registry().deregister(&mut member.stream);
                *slot = None;
                broken.fetch_add(1, Ordering::Relaxed);
            }
        }
        for due in pings.due() {
            if let Some(member) = &members[due] {
                let _ = (&member.stream).write(&pings.frame);
            }
        }
    }
}

/// Each member pings once per [`PING_EVERY`], at its own point of the period (as real
/// clients do, who connected at different times), not all at once: 10,000 pings in one
/// burst land on whatever message is fanning out then.
struct Pings {
    start: Instant,
    members: usize,
    /// Pings sent so far; member `sent % members` is next.
    sent: u64,
    frame: Vec<u8>,
}

impl Pings {
    fn new(members: usize) -> Self {
        let mut frame = Vec::new();
        client_frame(
            br#"{"type":"ping","id":0}"#,
            OpCode::Data(Data::Text),
            &mut frame,
        );
        Self {
            start: Instant::now(),
            members,
            sent: 0,
            frame,
        }
    }

    /// The members whose ping is due now.
    fn due(&mut self) -> impl Iterator<Item = usize> + use<> {
        let members = self.members.max(1) as u64;
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

/// One read of a socket: how many bytes, and when the last of them arrived.
fn receive(stream: &TcpStream, scratch: &mut Scratch) -> nix::Result<(usize, Option<SystemTime>)> {
    let mut iov = [std::io::IoSliceMut::new(&mut scratch.data)];
    let message = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut scratch.control),
        MsgFlags::empty(),
    )?;
    let arrived = message.cmsgs()?.find_map(|control| match control {
        ControlMessageOwned::ScmTimestampns(at) => {
            Some(SystemTime::UNIX_EPOCH + Duration::from(at))
        }
        _ => None,
    });
    Ok((message.bytes, arrived))
}

/// Reads a member's socket until it would block, handing each text frame to `listen`.
/// `false` when the socket ended or carried something else than server frames.
fn read<L: Listen>(member: &mut Member<L::Seen>, scratch: &mut Scratch, listen: &L) -> bool {
    loop {
        let (read, arrived) = match receive(&member.stream, scratch) {
            Ok((0, _)) => return false,
            Ok(read) => read,
            Err(nix::Error::EAGAIN) => return true,
            Err(nix::Error::EINTR) => continue,
            Err(_) => return false,
        };
        let mut data = std::mem::take(&mut member.partial);
        let bytes = if data.is_empty() {
            &scratch.data[..read]
        } else {
            data.extend_from_slice(&scratch.data[..read]);
            &data[..]
        };
        let mut pong = None;
        let Some(used) = frames(bytes, |opcode, payload| match opcode {
            OpCode::Data(Data::Text) => match std::str::from_utf8(payload) {
                Ok(text) => {
                    listen.frame(text, arrived, &mut member.seen);
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
        if let Some(payload) = pong {
            let mut frame = Vec::new();
            client_frame(&payload, OpCode::Control(Control::Pong), &mut frame);
            let _ = (&member.stream).write(&frame);
        }
        member.partial = bytes[used..].to_vec();
    }
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

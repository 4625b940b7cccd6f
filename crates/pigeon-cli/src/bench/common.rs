//! What every scenario needs: users, lean sockets, server CPU and memory, histograms.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{self, Poll, ready};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use pigeon_client::Session;
use pigeon_proto::{ServerFrame, ThreadId};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub(crate) type Socket = WebSocketStream<TcpStream>;
pub(crate) type Sink = SplitSink<Socket, WsMessage>;
pub(crate) type Stream = SplitStream<Socket>;

pub(crate) const PASSWORD: &str = "bench-password";

/// Registers and logs in `count` users named `<prefix><n>`, 32 at a time.
pub(crate) async fn users(
    server: &str,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<Session>> {
    let sessions = futures::stream::iter(0..count)
        .map(|n| async move {
            let name = format!("{prefix}{n}");
            pigeon_client::register(server, &name, PASSWORD)
                .await
                .with_context(|| format!("register {name}"))?;
            pigeon_client::login(server, &name, PASSWORD, "bench")
                .await
                .with_context(|| format!("login {name}"))
        })
        .buffered(32)
        .collect::<Vec<anyhow::Result<Session>>>()
        .await;
    sessions.into_iter().collect()
}

/// A prefix no earlier run used, so runs never collide on usernames.
pub(crate) fn run_prefix(scenario: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("b{}{}", &scenario[..1], &id[24..])
}

/// Resolves the server and refuses anything but loopback: every byte the bench sends,
/// registrations included, goes to this machine.
pub(crate) async fn loopback_server(server: &str) -> anyhow::Result<(&str, SocketAddr)> {
    let authority = server
        .strip_prefix("http://")
        .context("the bench speaks plain http:// to loopback")?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(authority).await?.collect();
    match addrs.first() {
        Some(addr) if addrs.iter().all(|a| a.ip().is_loopback()) => Ok((authority, *addr)),
        _ => bail!("the bench only sends traffic to loopback addresses, not {authority}"),
    }
}

/// Opens an authenticated socket from `source` (a loopback address), returns it after `welcome`.
pub(crate) async fn connect(
    server: &str,
    token: &str,
    source: Option<IpAddr>,
) -> anyhow::Result<Socket> {
    let (authority, addr) = loopback_server(server).await?;
    let stream = open(addr, source).await?;
    upgrade(authority, token, stream).await
}

/// Opens an authenticated socket for a member that only listens, and hands it back raw
/// after `welcome`, with every byte read from it past the handshake's HTTP answer (the
/// `welcome` frame, and whatever the server sent right behind it): the WebSocket
/// reader reads ahead, and a raw reader that started after it would lose those bytes,
/// or start inside a frame.
pub(crate) async fn connect_raw(
    server: &str,
    token: &str,
    source: Option<IpAddr>,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let (authority, addr) = loopback_server(server).await?;
    let stream = Recording {
        stream: open(addr, source).await?,
        read: Vec::new(),
    };
    let Recording { stream, read } = upgrade(authority, token, stream).await?.into_inner();
    let Some(end) = read.windows(4).position(|bytes| bytes == b"\r\n\r\n") else {
        bail!("no end of the handshake's answer in what was read");
    };
    Ok((stream, read[end + 4..].to_vec()))
}

async fn open(addr: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        socket.bind((source, 0).into())?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The WebSocket handshake with `token`, and the server's `welcome`.
async fn upgrade<S>(authority: &str, token: &str, stream: S) -> anyhow::Result<WebSocketStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request = format!("ws://{authority}/ws").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    // A small read buffer: the bench holds many idle sockets too.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut socket, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    match socket.next().await {
        Some(Ok(WsMessage::Text(text))) if text.contains("\"welcome\"") => Ok(socket),
        other => bail!("no welcome: {other:?}"),
    }
}

/// A socket that keeps a copy of every byte read from it (for [`connect_raw`]).
struct Recording {
    stream: TcpStream,
    read: Vec<u8>,
}

impl AsyncRead for Recording {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.stream).poll_read(cx, buf))?;
        self.read.extend_from_slice(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Recording {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Sends a text message into a thread: a `send` request numbered `id`, with a
/// time-ordered client id (a UUIDv7) as the SDK makes them.
pub(crate) async fn send_text(
    sink: &mut Sink,
    id: i64,
    thread_id: ThreadId,
    body: String,
) -> anyhow::Result<()> {
    let frame = serde_json::json!({
        "type": "send", "id": id, "thread_id": thread_id,
        "client_msg_id": pigeon_client::new_client_msg_id(), "body": body,
    });
    send_json(sink, &frame).await
}

pub(crate) async fn send_json(sink: &mut Sink, value: &serde_json::Value) -> anyhow::Result<()> {
    sink.send(WsMessage::Text(value.to_string().into())).await?;
    Ok(())
}

/// Reads the next server frame; `None` when the socket ends.
pub(crate) async fn next_frame(stream: &mut Stream) -> Option<ServerFrame> {
    loop {
        match stream.next().await? {
            Ok(WsMessage::Text(text)) => {
                if let Ok(frame) = serde_json::from_str(&text) {
                    return Some(frame);
                }
            }
            Ok(WsMessage::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// CPU time (user + system) of a process so far, from /proc.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in clock ticks of 1/100 s (USER_HZ).
    Some(Duration::from_millis(ticks * 10))
}

/// Resident memory of a process, in bytes, from /proc.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A periodic kernel timer (`timerfd`): fires every `interval`, to within microseconds.
///
/// tokio's timers tick in whole milliseconds, so sends paced with one tokio timer each
/// left about a millisecond late at the median (3.6 ms at p99, at 20,000 msg/s), and
/// latency measured from the schedule carried that lag of the bench's own.
pub(crate) struct Ticker {
    timer: AsyncFd<OwnedFd>,
}

impl Ticker {
    pub(crate) fn every(interval: Duration) -> std::io::Result<Self> {
        use rustix::time::{
            Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
            timerfd_settime,
        };
        // A zero interval would fire once, a zero first expiry never.
        let period = Timespec::try_from(interval.max(Duration::from_micros(1)))
            .map_err(std::io::Error::other)?;
        let timer = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        timerfd_settime(
            &timer,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: period,
                it_value: period,
            },
        )?;
        // `AsyncFd::new` is deprecated because an arbitrary `AsRawFd` might close its fd
        // while the reactor watches it. An `OwnedFd` moved into the `AsyncFd` cannot: it
        // is the timer's only handle and closes when the `AsyncFd` drops.
        #[allow(deprecated)]
        let timer = AsyncFd::new(timer)?;
        Ok(Self { timer })
    }

    /// Waits for the timer's next expiry (returns at once if one passed unread).
    pub(crate) async fn tick(&mut self) -> std::io::Result<()> {
        loop {
            let mut ready = self.timer.readable().await?;
            let mut expirations = [0u8; 8];
            if let Ok(read) = ready.try_io(|timer| {
                rustix::io::read(timer.get_ref(), &mut expirations[..])
                    .map_err(std::io::Error::from)
            }) {
                return read.map(|_| ());
            }
            // The readiness was stale: wait again.
        }
    }
}

/// A latency histogram in microseconds, 1 µs to 10 min, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

pub(crate) fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    if histogram.is_empty() {
        return 0.0;
    }
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

/// Microseconds since the bench started: the clock every timestamp in a body uses.
pub(crate) fn micros_since(start: Instant) -> u64 {
    micros_at(start, Instant::now())
}

/// Microseconds from the bench's start to `at`.
pub(crate) fn micros_at(start: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(start).as_micros()).unwrap_or(u64::MAX)
}

/// A body of exactly `size` bytes carrying `tag`.
pub(crate) fn padded(tag: &str, size: usize) -> String {
    let mut body = tag.to_owned();
    while body.len() < size {
        body.push('.');
    }
    body
}

/// A progress bar that advances once a second: shown for runs longer than a few seconds,
/// hidden otherwise and with --json.
pub(crate) struct Progress {
    bar: indicatif::ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub(crate) fn start(message: String, seconds: u64, quiet: bool) -> Self {
        let bar = if quiet || seconds < 4 {
            indicatif::ProgressBar::hidden()
        } else {
            let bar = indicatif::ProgressBar::new(seconds);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} s")
                    .expect("template"),
            );
            bar
        };
        bar.set_message(message);
        let ticking = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                ticking.inc(1);
            }
        });
        Self { bar, ticker }
    }

    pub(crate) fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// Server CPU time since `before` (a reading of [`cpu_time`]).
pub(crate) fn cpu_since(pid: Option<u32>, before: Option<Duration>) -> Option<Duration> {
    Some(cpu_time(pid?)?.saturating_sub(before?))
}

/// Milliseconds of CPU per 1,000 units of work, two decimals.
pub(crate) fn per_thousand(cpu: Option<Duration>, units: u64) -> Option<f64> {
    cpu.map(|cpu| (cpu.as_secs_f64() * 1_000_000.0 / units.max(1) as f64 * 100.0).round() / 100.0)
}

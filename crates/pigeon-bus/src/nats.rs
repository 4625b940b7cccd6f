//! The cluster bus over core NATS.
//!
//! An event for a few users goes out once per recipient user, on the subject
//! `pigeon.user.<user_id>`. A node subscribes to the subjects of the users connected to
//! it, and only those, so it receives exactly the events its connections need. An event
//! for more than [`BROADCAST_ABOVE`] users (a big group's message) goes out once, on
//! `pigeon.fanout`, with the recipients' ids in the payload: every node subscribes to
//! that subject and delivers to those of the users it holds. A 10,000-member group's
//! message is then one publication instead of 10,000. The connection is made with
//! `no_echo`: a node never receives its own publications, because it has already handed
//! them to its local connections before publishing (local delivery never waits on the
//! network).
//!
//! Core NATS is at-most-once. Nothing is lost for good, because every event a client
//! cares about is also in the store: when the NATS connection drops and comes back, the
//! node asks every local connection to reconnect and sync (see [`Deliver::resync`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, HeaderMap, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::SelectAll;
use pigeon_proto::{DeviceId, UserId};
use tokio::sync::{mpsc, oneshot};

use crate::{Bus, BusError, ConnId, Deliver, Envelope, Payload};

const SUBJECT_PREFIX: &str = "pigeon.user.";
/// The subject every node hears: events for many users, listed in the payload.
const FANOUT_SUBJECT: &str = "pigeon.fanout";
/// Events for more users than this are published once on [`FANOUT_SUBJECT`]. Each node
/// then gets it once, whether or not it holds one of them; below this, one publication
/// per user costs less than one per node in any cluster of sensible size.
const BROADCAST_ABOVE: usize = 64;
const HEADER_SKIP: &str = "Pigeon-Skip";
const HEADER_CLOSE_DEVICE: &str = "Pigeon-Close-Device";
/// Longest a new connection waits on NATS for its user's subscription.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest one event's publications may wait on NATS before the rest are dropped: the
/// single publisher task must not stall local delivery behind a slow or half-open
/// connection.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the client pings the server, so a half-open connection is noticed.
const PING_INTERVAL: Duration = Duration::from_secs(10);

/// One user's subscription on this node, shared by all of their local connections.
struct UserSubscription {
    /// Local connections of the user.
    connections: u32,
    /// Names the subscribe call that owns `stop`, so a late one cannot clobber a newer one.
    generation: u64,
    /// Dropping it ends (and unsubscribes) the stream; `None` while subscribing.
    stop: Option<oneshot::Sender<()>>,
}

/// A subscription's stream of messages, ending when its user's last connection closes.
type UserStream = futures::stream::BoxStream<'static, async_nats::Message>;

/// The NATS backend of [`Bus`].
pub struct NatsBus {
    client: Client,
    sink: Arc<dyn Deliver>,
    /// Per user with local connections.
    subscriptions: Mutex<HashMap<UserId, UserSubscription>>,
    generations: AtomicU64,
    /// New subscriptions for the receiving task.
    streams: mpsc::UnboundedSender<UserStream>,
    connected: Arc<AtomicBool>,
    published: metrics::Counter,
    dropped: metrics::Counter,
}

impl NatsBus {
    /// Connects to NATS at `url` (e.g. `nats://127.0.0.1:4222`) and starts receiving for
    /// `sink`. The client reconnects by itself for as long as the process runs.
    pub async fn connect(url: &str, sink: Arc<dyn Deliver>) -> Result<Arc<Self>, BusError> {
        let connected = Arc::new(AtomicBool::new(false));
        let events_sink = sink.clone();
        let events_connected = connected.clone();
        let client = ConnectOptions::new()
            .no_echo()
            .ping_interval(PING_INTERVAL)
            .name("pigeon")
            .event_callback(move |event| {
                let sink = events_sink.clone();
                let connected = events_connected.clone();
                async move {
                    match event {
                        Event::Connected => {
                            let was = connected.swap(true, Ordering::SeqCst);
                            tracing::info!("bus connected");
                            if !was {
                                // Whatever was published while we were away is lost here;
                                // it is in the store, so the clients fetch it by sync.
                                sink.resync();
                            }
                        }
                        Event::Disconnected => {
                            connected.store(false, Ordering::SeqCst);
                            tracing::warn!("bus disconnected; reconnecting");
                        }
                        other => tracing::info!(event = %other, "bus event"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|error| BusError::Unavailable(error.to_string()))?;
        // The first Connected event must not resync anyone: there is nobody yet.
        connected.store(true, Ordering::SeqCst);
        let (streams, incoming) = mpsc::unbounded_channel();
        let bus = Arc::new(Self {
            client,
            sink: sink.clone(),
            subscriptions: Mutex::new(HashMap::new()),
            generations: AtomicU64::new(0),
            streams,
            connected,
            published: metrics::counter!("pigeon_bus_published_total"),
            dropped: metrics::counter!("pigeon_bus_dropped_total"),
        });
        tokio::spawn(receive(incoming, sink));
        let fanout = bus
            .client
            .subscribe(FANOUT_SUBJECT)
            .await
            .map_err(|error| BusError::Unavailable(error.to_string()))?;
        bus.client
            .flush()
            .await
            .map_err(|error| BusError::Unavailable(error.to_string()))?;
        bus.streams
            .send(fanout.boxed())
            .map_err(|_| BusError::Unavailable("bus receiver stopped".to_owned()))?;
        Ok(bus)
    }

    /// Whether the NATS connection is up now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }
}

/// Hands every message of every subscription to the sink, from one task.
async fn receive(mut incoming: mpsc::UnboundedReceiver<UserStream>, sink: Arc<dyn Deliver>) {
    let received = metrics::counter!("pigeon_bus_received_total");
    let mut streams: SelectAll<UserStream> = SelectAll::new();
    loop {
        tokio::select! {
            stream = incoming.recv() => match stream {
                Some(stream) => streams.push(stream),
                None => return,
            },
            Some(message) = streams.next(), if !streams.is_empty() => {
                received.increment(1);
                match decode(&message) {
                    Some(envelope) => sink.deliver(&envelope),
                    None => tracing::warn!(subject = %message.subject, "dropping a malformed bus message"),
                }
            }
        }
    }
}

fn subject(user: UserId) -> String {
    format!("{SUBJECT_PREFIX}{user}")
}

fn decode(message: &async_nats::Message) -> Option<Envelope> {
    let (users, body): (Arc<[UserId]>, Bytes) = if message.subject.as_str() == FANOUT_SUBJECT {
        let (users, body) = split_fanout(&message.payload)?;
        (users, body)
    } else {
        let user: UserId = message
            .subject
            .as_str()
            .strip_prefix(SUBJECT_PREFIX)?
            .parse()
            .ok()?;
        (Arc::from([user]), message.payload.clone())
    };
    let headers = message.headers.as_ref();
    let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    let skip = match header(HEADER_SKIP) {
        Some(value) => Some(value.parse::<ConnId>().ok()?),
        None => None,
    };
    let payload = match header(HEADER_CLOSE_DEVICE) {
        Some(device) => Payload::CloseDevice(device.parse::<DeviceId>().ok()?),
        None => Payload::Frame(body),
    };
    Some(Envelope {
        users,
        skip,
        payload,
    })
}

/// A fan-out payload: the number of users (4 bytes, big-endian), their 16-byte ids, then
/// the event's bytes.
fn join_fanout(users: &[UserId], body: &[u8]) -> Bytes {
    let mut bytes = Vec::with_capacity(4 + users.len() * 16 + body.len());
    bytes.extend_from_slice(&u32::try_from(users.len()).unwrap_or(u32::MAX).to_be_bytes());
    for user in users {
        bytes.extend_from_slice(user.as_bytes());
    }
    bytes.extend_from_slice(body);
    Bytes::from(bytes)
}

fn split_fanout(payload: &Bytes) -> Option<(Arc<[UserId]>, Bytes)> {
    let count = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?) as usize;
    let ids_end = 4usize.checked_add(count.checked_mul(16)?)?;
    let ids = payload.get(4..ids_end)?;
    let users = ids
        .chunks_exact(16)
        .map(|id| UserId::from_bytes(id.try_into().expect("16-byte chunks")))
        .collect();
    Some((users, payload.slice(ids_end..)))
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, envelope: Envelope) -> Result<(), BusError> {
        // Local connections first: they never wait on the network.
        self.sink.deliver(&envelope);
        if !self.is_connected() {
            // Not queued for later: the nodes resync their clients when the bus is back,
            // and local publishing must not stall behind a dead connection.
            self.dropped.increment(envelope.users.len() as u64);
            return Ok(());
        }
        let mut headers = HeaderMap::new();
        if let Some(skip) = envelope.skip {
            headers.insert(HEADER_SKIP, skip.to_string().as_str());
        }
        let payload = match &envelope.payload {
            Payload::Frame(bytes) => bytes.clone(),
            Payload::CloseDevice(device) => {
                headers.insert(HEADER_CLOSE_DEVICE, device.to_string().as_str());
                Bytes::new()
            }
        };
        let deadline = tokio::time::Instant::now() + PUBLISH_TIMEOUT;
        if envelope.users.len() > BROADCAST_ABOVE {
            let payload = join_fanout(&envelope.users, &payload);
            let publish = self
                .client
                .publish_with_headers(FANOUT_SUBJECT, headers, payload);
            return match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(())) => {
                    self.published.increment(1);
                    Ok(())
                }
                Ok(Err(error)) => Err(BusError::Unavailable(error.to_string())),
                Err(_) => {
                    self.dropped.increment(envelope.users.len() as u64);
                    tracing::warn!("bus publish timed out; dropping a fan-out event");
                    Ok(())
                }
            };
        }
        for (sent, user) in envelope.users.iter().enumerate() {
            let publish =
                self.client
                    .publish_with_headers(subject(*user), headers.clone(), payload.clone());
            match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(())) => self.published.increment(1),
                Ok(Err(error)) => return Err(BusError::Unavailable(error.to_string())),
                Err(_) => {
                    // Their clients notice the gap at the next event or reconnect, and sync.
                    let left = envelope.users.len() - sent;
                    self.dropped.increment(left as u64);
                    tracing::warn!(left, "bus publish timed out; dropping the rest of an event");
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    async fn subscribe(&self, user: UserId) -> Result<(), BusError> {
        let generation = {
            let mut subscriptions = self.subscriptions.lock().expect("subscriptions lock");
            let entry = subscriptions.entry(user).or_insert(UserSubscription {
                connections: 0,
                generation: 0,
                stop: None,
            });
            entry.connections += 1;
            if entry.connections > 1 {
                // Subscribed already, or being subscribed by the first connection.
                return Ok(());
            }
            entry.generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
            entry.generation
        };
        let subscribed = tokio::time::timeout(SUBSCRIBE_TIMEOUT, async {
            let subscriber = self.client.subscribe(subject(user)).await?;
            // Sends the SUB now rather than with the next batch of publications.
            self.client.flush().await?;
            Ok::<Subscriber, Box<dyn std::error::Error + Send + Sync>>(subscriber)
        })
        .await;
        let subscriber = match subscribed {
            Ok(Ok(subscriber)) => subscriber,
            Ok(Err(error)) => return Err(BusError::Unavailable(error.to_string())),
            // While NATS is away the client subscribes again once it is back, and the
            // resync that follows covers the gap: a new connection does not wait for it.
            Err(_) => return Err(BusError::Unavailable("subscribe timed out".to_owned())),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        {
            let mut subscriptions = self.subscriptions.lock().expect("subscriptions lock");
            match subscriptions.get_mut(&user) {
                Some(entry) if entry.generation == generation => entry.stop = Some(stop),
                // Every connection left meanwhile (dropping `stop` ends the stream at once).
                _ => return Ok(()),
            }
        }
        // Dropping the subscriber when the stream ends unsubscribes it.
        let stream = subscriber.take_until(stopped).boxed();
        self.streams
            .send(stream)
            .map_err(|_| BusError::Unavailable("bus receiver stopped".to_owned()))
    }

    async fn unsubscribe(&self, user: UserId) -> Result<(), BusError> {
        let mut subscriptions = self.subscriptions.lock().expect("subscriptions lock");
        if let Some(entry) = subscriptions.get_mut(&user) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 {
                // Dropping `stop` ends the stream, which drops the subscriber.
                subscriptions.remove(&user);
            }
        }
        Ok(())
    }

    async fn close(&self) {
        // Whatever the publisher handed over last still reaches the other nodes.
        if tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.client.flush())
            .await
            .is_err()
        {
            tracing::warn!("bus flush at shutdown timed out");
        }
    }

    fn is_healthy(&self) -> bool {
        self.is_connected()
    }
}

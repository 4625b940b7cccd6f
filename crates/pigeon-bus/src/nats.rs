//! The cluster bus over core NATS.
//!
//! Every event goes out once per recipient user, on the subject `pigeon.user.<user_id>`.
//! A node subscribes to the subjects of the users connected to it, and only those, so a
//! node receives exactly the events its connections need. The connection is made with
//! `no_echo`: a node never receives its own publications, because it has already handed
//! them to its local connections before publishing (local delivery never waits on the
//! network).
//!
//! Core NATS is at-most-once. Nothing is lost for good, because every event a client
//! cares about is also in the store: when the NATS connection drops and comes back, the
//! node asks every local connection to reconnect and sync (see [`Deliver::resync`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::{Client, ConnectOptions, Event, HeaderMap, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::SelectAll;
use pigeon_proto::{DeviceId, UserId};
use tokio::sync::{mpsc, oneshot};

use crate::{Bus, BusError, ConnId, Deliver, Envelope, Payload};

const SUBJECT_PREFIX: &str = "pigeon.user.";
const HEADER_SKIP: &str = "Pigeon-Skip";
const HEADER_CLOSE_DEVICE: &str = "Pigeon-Close-Device";
/// Longest a new connection waits for NATS to confirm its user's subscription.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A subscription's stream of messages, ending when its user's last connection closes.
type UserStream = futures::stream::BoxStream<'static, async_nats::Message>;

/// The NATS backend of [`Bus`].
pub struct NatsBus {
    client: Client,
    sink: Arc<dyn Deliver>,
    /// Per subscribed user: dropping the sender ends (and unsubscribes) the stream.
    subscriptions: Mutex<HashMap<UserId, oneshot::Sender<()>>>,
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
            streams,
            connected,
            published: metrics::counter!("pigeon_bus_published_total"),
            dropped: metrics::counter!("pigeon_bus_dropped_total"),
        });
        tokio::spawn(receive(incoming, sink));
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
    let user: UserId = message
        .subject
        .as_str()
        .strip_prefix(SUBJECT_PREFIX)?
        .parse()
        .ok()?;
    let headers = message.headers.as_ref();
    let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    let skip = match header(HEADER_SKIP) {
        Some(value) => Some(value.parse::<ConnId>().ok()?),
        None => None,
    };
    let payload = match header(HEADER_CLOSE_DEVICE) {
        Some(device) => Payload::CloseDevice(device.parse::<DeviceId>().ok()?),
        None => Payload::Frame(message.payload.clone()),
    };
    Some(Envelope {
        users: Arc::from([user]),
        skip,
        payload,
    })
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, envelope: Envelope) -> Result<(), BusError> {
        // Local connections first: they never wait on the network.
        self.sink.deliver(&envelope);
        if !self.is_connected() {
            // Not queued for later: the other nodes resync their clients when the bus is
            // back, and local publishing must not stall behind a dead connection.
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
        for user in envelope.users.iter() {
            self.client
                .publish_with_headers(subject(*user), headers.clone(), payload.clone())
                .await
                .map_err(|error| BusError::Unavailable(error.to_string()))?;
            self.published.increment(1);
        }
        Ok(())
    }

    async fn subscribe(&self, user: UserId) -> Result<(), BusError> {
        let subscriber: Subscriber = self
            .client
            .subscribe(subject(user))
            .await
            .map_err(|error| BusError::Unavailable(error.to_string()))?;
        // The server has the subscription once a round trip has passed: from here on, no
        // event for this user is missed by this node. While NATS is away the client
        // subscribes again on reconnect, and the resync that follows covers the gap, so a
        // new connection does not wait for NATS.
        if self.is_connected() {
            match tokio::time::timeout(FLUSH_TIMEOUT, self.client.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "bus flush after subscribe failed"),
                Err(_) => tracing::warn!("bus flush after subscribe timed out"),
            }
        }
        let (stop, stopped) = oneshot::channel::<()>();
        // Dropping the subscriber when the stream ends unsubscribes it.
        let stream = subscriber.take_until(stopped).boxed();
        let previous = self
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .insert(user, stop);
        drop(previous);
        self.streams
            .send(stream)
            .map_err(|_| BusError::Unavailable("bus receiver stopped".to_owned()))
    }

    async fn unsubscribe(&self, user: UserId) -> Result<(), BusError> {
        // Dropping the sender ends the stream, which drops the subscriber.
        self.subscriptions
            .lock()
            .expect("subscriptions lock")
            .remove(&user);
        Ok(())
    }

    fn is_healthy(&self) -> bool {
        self.is_connected()
    }
}

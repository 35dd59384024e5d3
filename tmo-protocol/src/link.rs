//! The MQTT link: one connection task on rumqttc that polls its event loop forever.
//!
//! The link speaks **MQTT v5**: a response topic and correlation data on cloud requests, the
//! broker's maximum packet size learnt from CONNACK (frames are split to fit it), PUBACK reason
//! codes (a QoS 1 cloud request acknowledged with "no matching subscribers" means no bridge is
//! listening, so the daemon can fall back at once), and message expiry for requests whose
//! deadline passes while queued. Mosquitto 2, EMQX, HiveMQ and VerneMQ all speak v5; the payload
//! types still carry the request id so that a v3.1.1 bridge can route replies (see
//! [`crate::ReplyRoute`]).
//!
//! Behaviour:
//! - reconnects with exponential backoff (capped), with a clean session each time, and
//!   re-subscribes; `connected` turns true once the subscriptions are acknowledged, so a
//!   reply cannot arrive before its subscription exists;
//! - publishes a retained `online` on the availability topic on every connect, with a retained
//!   `offline` last will; [`Link::shutdown`] publishes `offline` itself before disconnecting;
//! - incoming publishes go to a bounded channel; when it is full they are dropped and counted,
//!   the event loop never waits for the consumer;
//! - a publish returns once rumqttc has taken it; its [`Delivery`] resolves when it is written
//!   (QoS 0) or acknowledged by the broker (QoS 1). Publishes that were queued or unacknowledged
//!   when the connection broke fail with [`DeliveryError::ConnectionLost`]; nothing is replayed
//!   on the next connection (a cloud request would be stale; outcome batches are retried by
//!   their uploader until a collector acknowledges them).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS as RumqttQoS;
use rumqttc::v5::mqttbytes::v5::{
    Filter, LastWill, Packet, PubAckReason, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions, Request};
use rumqttc::{NetworkOptions, Outgoing, TlsConfiguration, Transport};
use serde::Deserialize;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::chunk::{SplitError, new_message_id, split};
use crate::topic::{OFFLINE, ONLINE};

/// The `[mqtt]` section of `tmod.toml` (and of the bridge's and fleet CLI's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Broker host name or address (also the TLS server name).
    pub host: String,
    /// Broker port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// MQTT client id; for devices, usually the device id.
    pub client_id: String,
    /// User name, if the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (with `username`).
    #[serde(default)]
    pub password: Option<String>,
    /// PEM file of the CA that signed the broker's certificate; setting it turns TLS on.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; needs `key_file` and `ca_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// MQTT keep-alive.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// Largest MQTT packet sent or accepted; the broker's own limit (CONNACK) lowers it.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: u32,
    /// First reconnection delay; doubles up to `reconnect_max_ms`.
    #[serde(default = "default_reconnect_initial_ms")]
    pub reconnect_initial_ms: u64,
    /// Longest reconnection delay.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Incoming messages buffered for the consumer; more are dropped and counted.
    #[serde(default = "default_incoming_capacity")]
    pub incoming_capacity: usize,
    /// Outgoing requests buffered for the event loop.
    #[serde(default = "default_outgoing_capacity")]
    pub outgoing_capacity: usize,
}

fn default_port() -> u16 {
    1883
}
fn default_keep_alive_secs() -> u64 {
    30
}
fn default_max_packet_bytes() -> u32 {
    256 * 1024
}
fn default_reconnect_initial_ms() -> u64 {
    250
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_incoming_capacity() -> usize {
    256
}
fn default_outgoing_capacity() -> usize {
    256
}

impl LinkConfig {
    /// A plain-TCP configuration with every other field at its default.
    pub fn new(host: impl Into<String>, port: u16, client_id: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            port,
            client_id: client_id.into(),
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            keep_alive_secs: default_keep_alive_secs(),
            max_packet_bytes: default_max_packet_bytes(),
            reconnect_initial_ms: default_reconnect_initial_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            incoming_capacity: default_incoming_capacity(),
            outgoing_capacity: default_outgoing_capacity(),
        }
    }

    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<(), LinkError> {
        let bad = |reason: &str| Err(LinkError::Config(reason.to_owned()));
        if self.host.is_empty() {
            return bad("host is empty");
        }
        if self.client_id.is_empty() {
            return bad("client_id is empty");
        }
        if self.password.is_some() && self.username.is_none() {
            return bad("password without username");
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return bad("cert_file and key_file go together");
        }
        if self.cert_file.is_some() && self.ca_file.is_none() {
            return bad("cert_file needs ca_file (mutual TLS)");
        }
        if !(5..=65_535).contains(&self.keep_alive_secs) {
            return bad("keep_alive_secs must be within 5..=65535");
        }
        if self.max_packet_bytes < 1024 {
            return bad("max_packet_bytes must be at least 1024");
        }
        if self.reconnect_initial_ms == 0 || self.reconnect_max_ms < self.reconnect_initial_ms {
            return bad("need 0 < reconnect_initial_ms <= reconnect_max_ms");
        }
        if self.incoming_capacity == 0 || self.outgoing_capacity == 0 {
            return bad("channel capacities must be positive");
        }
        Ok(())
    }
}

/// The link could not start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A configuration value is wrong.
    #[error("mqtt configuration: {0}")]
    Config(String),
    /// A TLS file could not be read or used.
    #[error("mqtt TLS {path}: {reason}")]
    Tls {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Delivery guarantee of one publish or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QoS {
    /// Fire and forget.
    AtMostOnce,
    /// Acknowledged by the broker (PUBACK).
    AtLeastOnce,
}

impl From<QoS> for RumqttQoS {
    fn from(q: QoS) -> Self {
        match q {
            QoS::AtMostOnce => RumqttQoS::AtMostOnce,
            QoS::AtLeastOnce => RumqttQoS::AtLeastOnce,
        }
    }
}

/// A subscription the link keeps across reconnections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Topic filter (wildcards and `$share/...` allowed).
    pub filter: String,
    /// Maximum QoS.
    pub qos: QoS,
}

impl Subscription {
    /// A subscription.
    pub fn new(filter: impl Into<String>, qos: QoS) -> Self {
        Self { filter: filter.into(), qos }
    }
}

/// What the link does besides the connection itself.
#[derive(Debug, Clone, Default)]
pub struct LinkSetup {
    /// Retained `online` on connect, retained `offline` as last will and on shutdown.
    pub availability_topic: Option<String>,
    /// Subscriptions made on every connection.
    pub subscriptions: Vec<Subscription>,
}

/// A received publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// Whether the broker sent it from its retained store.
    pub retain: bool,
    /// MQTT v5 response topic, if any.
    pub response_topic: Option<String>,
    /// MQTT v5 correlation data, if any.
    pub correlation_data: Option<Bytes>,
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name (no wildcards).
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: QoS,
    /// Retained by the broker.
    pub retain: bool,
    /// MQTT v5 response topic.
    pub response_topic: Option<String>,
    /// MQTT v5 correlation data.
    pub correlation_data: Option<Bytes>,
    /// MQTT v5 message expiry: the broker drops it if not delivered in time.
    pub expiry_secs: Option<u32>,
}

impl Message {
    /// A message with no v5 properties, not retained.
    pub fn new(topic: impl Into<String>, qos: QoS, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain: false,
            response_topic: None,
            correlation_data: None,
            expiry_secs: None,
        }
    }

    /// Sets the retain flag.
    pub fn retained(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    fn properties(&self) -> Option<PublishProperties> {
        if self.response_topic.is_none() && self.correlation_data.is_none() && self.expiry_secs.is_none() {
            return None;
        }
        Some(PublishProperties {
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation_data.clone(),
            message_expiry_interval: self.expiry_secs,
            ..PublishProperties::default()
        })
    }

    /// Bytes this message adds to its payload in a PUBLISH packet (upper bound).
    fn overhead_bytes(&self) -> usize {
        let props = self.response_topic.as_ref().map_or(0, |t| 3 + t.len())
            + self.correlation_data.as_ref().map_or(0, |c| 3 + c.len())
            + self.expiry_secs.map_or(0, |_| 5);
        // fixed header (1 + up to 4), topic (2 + len), packet id (2), properties length (up to 4).
        5 + 2 + self.topic.len() + 2 + 4 + props
    }
}

/// A publish was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The link is not connected (or lost the connection while waiting for room).
    #[error("not connected to the broker")]
    NotConnected,
    /// The packet would exceed the broker's or the configured maximum packet size.
    #[error("packet of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Packet length (upper bound).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The topic is empty or has wildcards.
    #[error("invalid topic name {0:?}")]
    InvalidTopic(String),
    /// Frames could not be made.
    #[error(transparent)]
    Split(#[from] SplitError),
    /// The link task has ended.
    #[error("the link has shut down")]
    Closed,
}

/// How a publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// QoS 0: written to the connection.
    Written,
    /// QoS 1: acknowledged by the broker. `no_matching_subscribers`: the broker said nobody
    /// subscribes to the topic (MQTT v5 reason 0x10).
    Acknowledged {
        /// Nobody received it.
        no_matching_subscribers: bool,
    },
}

/// A publish did not get through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The connection broke before it was written or acknowledged.
    #[error("connection lost before the publish was confirmed")]
    ConnectionLost,
    /// The broker refused it (PUBACK reason code).
    #[error("broker refused the publish: {0}")]
    Refused(String),
    /// The link shut down.
    #[error("the link has shut down")]
    Closed,
}

/// Resolves when a publish is written (QoS 0) or acknowledged (QoS 1).
#[derive(Debug)]
pub struct Delivery {
    done: oneshot::Receiver<Result<Delivered, DeliveryError>>,
}

impl Delivery {
    /// Waits for the outcome.
    pub async fn confirmed(self) -> Result<Delivered, DeliveryError> {
        self.done.await.unwrap_or(Err(DeliveryError::Closed))
    }

    /// Waits for all of `deliveries` (the frames of one message); the first failure wins.
    pub async fn all_confirmed(deliveries: Vec<Delivery>) -> Result<Delivered, DeliveryError> {
        let mut last = Delivered::Written;
        for d in deliveries {
            last = d.confirmed().await?;
        }
        Ok(last)
    }
}

/// Counters of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Successful connections (CONNACK).
    pub connections: u64,
    /// Connection attempts or connections that failed.
    pub connection_errors: u64,
    /// SUBACKs in which the broker refused a subscription (its ACL, for example).
    pub subscriptions_refused: u64,
    /// Publishes handed to rumqttc.
    pub published: u64,
    /// Publishes lost because the connection broke.
    pub lost_on_disconnect: u64,
    /// Publishes received and delivered to the channel.
    pub received: u64,
    /// Publishes received and dropped because the channel was full.
    pub dropped_channel_full: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    connection_errors: AtomicU64,
    subscriptions_refused: AtomicU64,
    published: AtomicU64,
    lost_on_disconnect: AtomicU64,
    received: AtomicU64,
    dropped_channel_full: AtomicU64,
}

type Waiter = oneshot::Sender<Result<Delivered, DeliveryError>>;

struct Pending {
    qos: QoS,
    waiter: Option<Waiter>,
}

/// Matches rumqttc's events with the publishes they belong to. rumqttc takes requests in
/// channel order and reports each publish it writes as `Outgoing::Publish(pkid)` in the same
/// order, so `queue` (pushed under the same lock as the channel send) lines up with them.
#[derive(Default)]
struct Tracker {
    queue: VecDeque<Pending>,
    by_pkid: HashMap<u16, Waiter>,
    collided: Option<u16>,
}

impl Tracker {
    fn on_written(&mut self, pkid: u16) {
        if self.collided == Some(pkid) {
            // The resend of a publish that waited for its packet id; already mapped.
            self.collided = None;
            return;
        }
        let Some(p) = self.queue.pop_front() else {
            debug!(pkid, "outgoing publish not issued through the publisher");
            return;
        };
        match p.qos {
            QoS::AtMostOnce => {
                if let Some(w) = p.waiter {
                    let _ = w.send(Ok(Delivered::Written));
                }
            }
            QoS::AtLeastOnce => {
                if let Some(w) = p.waiter {
                    self.by_pkid.insert(pkid, w);
                }
            }
        }
    }

    fn on_collision(&mut self, pkid: u16) {
        if let Some(p) = self.queue.pop_front()
            && let Some(w) = p.waiter
        {
            self.by_pkid.insert(pkid, w);
        }
        self.collided = Some(pkid);
    }

    fn on_puback(&mut self, pkid: u16, reason: PubAckReason) {
        let Some(w) = self.by_pkid.remove(&pkid) else {
            return;
        };
        let result = match reason {
            PubAckReason::Success => Ok(Delivered::Acknowledged { no_matching_subscribers: false }),
            PubAckReason::NoMatchingSubscribers => {
                Ok(Delivered::Acknowledged { no_matching_subscribers: true })
            }
            other => Err(DeliveryError::Refused(format!("{other:?}"))),
        };
        let _ = w.send(result);
    }

    /// Fails everything in flight and the first `queued` not yet written; returns how many.
    fn on_disconnect(&mut self, queued: usize) -> u64 {
        let mut lost = 0;
        for (_, w) in self.by_pkid.drain() {
            let _ = w.send(Err(DeliveryError::ConnectionLost));
            lost += 1;
        }
        let queued = queued.min(self.queue.len());
        for p in self.queue.drain(..queued) {
            if let Some(w) = p.waiter {
                let _ = w.send(Err(DeliveryError::ConnectionLost));
            }
            lost += 1;
        }
        self.collided = None;
        lost
    }
}

struct Shared {
    tracker: Mutex<Tracker>,
    room: Notify,
    counters: Counters,
    broker_max_packet: AtomicU32,
    config_max_packet: u32,
    subscriptions: Mutex<Vec<Subscription>>,
}

impl Shared {
    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn max_packet_bytes(&self) -> usize {
        let broker = self.broker_max_packet.load(Ordering::Relaxed);
        self.config_max_packet.min(broker) as usize
    }
}

/// Publishes through the link; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    shared: Arc<Shared>,
    connected: watch::Receiver<bool>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("max_packet_bytes", &self.max_packet_bytes()).finish()
    }
}

impl Publisher {
    /// The largest packet this link may send now (configuration and broker).
    pub fn max_packet_bytes(&self) -> usize {
        self.shared.max_packet_bytes()
    }

    /// The largest frame that fits one packet of `template` (its topic and properties).
    pub fn max_frame_bytes(&self, template: &Message) -> usize {
        self.max_packet_bytes().saturating_sub(template.overhead_bytes())
    }

    /// Hands `message` to rumqttc, waiting while its queue is full. Fails at once when the
    /// link is not connected.
    pub async fn publish(&self, message: Message) -> Result<Delivery, PublishError> {
        if message.topic.is_empty() || message.topic.contains(['+', '#']) {
            return Err(PublishError::InvalidTopic(message.topic));
        }
        let len = message.payload.len() + message.overhead_bytes();
        let max = self.max_packet_bytes();
        if len > max {
            return Err(PublishError::TooLarge { len, max });
        }
        let mut connected = self.connected.clone();
        loop {
            if !*connected.borrow_and_update() {
                return Err(PublishError::NotConnected);
            }
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if let Some(delivery) = self.try_hand_over(&message)? {
                return Ok(delivery);
            }
            tokio::select! {
                _ = room => {}
                changed = connected.changed() => {
                    if changed.is_err() {
                        return Err(PublishError::Closed);
                    }
                }
            }
        }
    }

    /// Splits `body` into frames that fit the packet limit (see [`crate::chunk`]) and publishes
    /// them in order with `template`'s topic, QoS and properties. One delivery per frame.
    pub async fn publish_body(&self, template: &Message, body: &[u8]) -> Result<Vec<Delivery>, PublishError> {
        let frames = split(body, self.max_frame_bytes(template), new_message_id())?;
        let mut deliveries = Vec::with_capacity(frames.len());
        for frame in frames {
            let message = Message { payload: Bytes::from(frame), ..template.clone() };
            deliveries.push(self.publish(message).await?);
        }
        Ok(deliveries)
    }

    fn try_hand_over(&self, message: &Message) -> Result<Option<Delivery>, PublishError> {
        let (tx, rx) = oneshot::channel();
        let mut tracker = self.shared.tracker();
        let sent = match message.properties() {
            Some(props) => self.client.try_publish_with_properties(
                message.topic.clone(),
                message.qos.into(),
                message.retain,
                message.payload.clone(),
                props,
            ),
            None => self.client.try_publish(
                message.topic.clone(),
                message.qos.into(),
                message.retain,
                message.payload.clone(),
            ),
        };
        match sent {
            Ok(()) => {
                tracker.queue.push_back(Pending { qos: message.qos, waiter: Some(tx) });
                self.shared.counters.published.fetch_add(1, Ordering::Relaxed);
                Ok(Some(Delivery { done: rx }))
            }
            // Full queue (or the event loop gone: then `connected` turns false).
            Err(_) => Ok(None),
        }
    }

    /// Adds a subscription kept across reconnections (and subscribes now if connected).
    pub fn subscribe(&self, subscription: Subscription) {
        let filter = Filter::new(subscription.filter.clone(), subscription.qos.into());
        self.shared.subscriptions.lock().unwrap_or_else(PoisonError::into_inner).push(subscription);
        if *self.connected.borrow() && self.client.try_subscribe_many([filter]).is_err() {
            warn!("subscription queued for the next connection: request queue full");
        }
    }
}

/// A running MQTT link. Dropping it stops the task without a clean disconnect.
#[derive(Debug)]
pub struct Link {
    publisher: Publisher,
    /// Received publishes, in order.
    pub incoming: mpsc::Receiver<Incoming>,
    connected: watch::Receiver<bool>,
    availability_topic: Option<String>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, LinkError> {
    std::fs::read(path).map_err(|e| LinkError::Tls { path: path.clone(), reason: e.to_string() })
}

fn tls_transport(config: &LinkConfig, ca_file: &PathBuf) -> Result<Transport, LinkError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls_err = |path: &PathBuf, reason: String| LinkError::Tls { path: path.clone(), reason };
    let ca_pem = read_file(ca_file)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        let cert = cert.map_err(|e| tls_err(ca_file, e.to_string()))?;
        roots.add(cert).map_err(|e| tls_err(ca_file, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(tls_err(ca_file, "no certificate in the file".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(ca_file, e.to_string()))?
        .with_root_certificates(roots);
    let client_config = match (&config.cert_file, &config.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let cert_pem = read_file(cert_file)?;
            let certs = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_err(cert_file, e.to_string()))?;
            if certs.is_empty() {
                return Err(tls_err(cert_file, "no certificate in the file".into()));
            }
            let key_pem = read_file(key_file)?;
            let key =
                PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| tls_err(key_file, e.to_string()))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| tls_err(key_file, e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(client_config))))
}

impl Link {
    /// Validates `config`, reads the TLS files and spawns the connection task on the current
    /// tokio runtime. Returns at once; watch [`Link::connected`] for the connection.
    pub fn start(config: &LinkConfig, setup: LinkSetup) -> Result<Link, LinkError> {
        config.validate()?;
        let mut options = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
        options
            .set_keep_alive(Duration::from_secs(config.keep_alive_secs))
            .set_clean_start(true)
            .set_max_packet_size(Some(config.max_packet_bytes));
        // Small frames (acks, replies) must not wait for Nagle and delayed ACKs (40 ms).
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        if let Some(user) = &config.username {
            options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
        }
        if let Some(ca_file) = &config.ca_file {
            options.set_transport(tls_transport(config, ca_file)?);
        }
        if let Some(topic) = &setup.availability_topic {
            options.set_last_will(LastWill::new(
                topic.clone(),
                OFFLINE.to_vec(),
                RumqttQoS::AtLeastOnce,
                true,
                None,
            ));
        }
        let (client, eventloop) = AsyncClient::new(options, config.outgoing_capacity);
        let (connected_tx, connected_rx) = watch::channel(false);
        let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_capacity);
        let shared = Arc::new(Shared {
            tracker: Mutex::new(Tracker::default()),
            room: Notify::new(),
            counters: Counters::default(),
            broker_max_packet: AtomicU32::new(u32::MAX),
            config_max_packet: config.max_packet_bytes,
            subscriptions: Mutex::new(setup.subscriptions),
        });
        let publisher =
            Publisher { client: client.clone(), shared: shared.clone(), connected: connected_rx.clone() };
        let cancel = CancellationToken::new();
        let task = EventTask {
            eventloop,
            client,
            shared,
            incoming: incoming_tx,
            connected: connected_tx,
            availability_topic: setup.availability_topic.clone(),
            backoff_initial: Duration::from_millis(config.reconnect_initial_ms),
            backoff_max: Duration::from_millis(config.reconnect_max_ms),
            cancel: cancel.clone(),
        };
        let handle = tokio::spawn(task.run());
        Ok(Link {
            publisher,
            incoming: incoming_rx,
            connected: connected_rx,
            availability_topic: setup.availability_topic,
            cancel,
            task: Some(handle),
        })
    }

    /// A publisher for this link.
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// True while connected with the subscriptions in place.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Waits until connected, at most `timeout`; returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.connected.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c)).await.is_ok_and(|r| r.is_ok())
    }

    /// Counters.
    pub fn stats(&self) -> LinkStats {
        let c = &self.publisher.shared.counters;
        LinkStats {
            connections: c.connections.load(Ordering::Relaxed),
            connection_errors: c.connection_errors.load(Ordering::Relaxed),
            subscriptions_refused: c.subscriptions_refused.load(Ordering::Relaxed),
            published: c.published.load(Ordering::Relaxed),
            lost_on_disconnect: c.lost_on_disconnect.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            dropped_channel_full: c.dropped_channel_full.load(Ordering::Relaxed),
        }
    }

    /// Publishes a retained `offline` (if there is an availability topic), disconnects cleanly
    /// and waits for the task, all within `timeout`.
    pub async fn shutdown(mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(topic) = self.availability_topic.clone()
            && let Ok(delivery) =
                self.publisher.publish(Message::new(topic, QoS::AtLeastOnce, OFFLINE).retained(true)).await
        {
            let _ = tokio::time::timeout_at(deadline, delivery.confirmed()).await;
        }
        if self.publisher.client.try_disconnect().is_err() {
            self.cancel.cancel();
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
    }

    /// Ends the connection without a DISCONNECT packet, as a crash would: the broker publishes
    /// the last will. For tests and for processes that must stop at once.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

struct EventTask {
    eventloop: EventLoop,
    client: AsyncClient,
    shared: Arc<Shared>,
    incoming: mpsc::Sender<Incoming>,
    connected: watch::Sender<bool>,
    availability_topic: Option<String>,
    backoff_initial: Duration,
    backoff_max: Duration,
    cancel: CancellationToken,
}

impl EventTask {
    async fn run(mut self) {
        let mut backoff = self.backoff_initial;
        let mut awaiting_suback = false;
        // When to subscribe again after the broker refused a subscription (its ACL, say).
        let mut resubscribe_at: Option<tokio::time::Instant> = None;
        loop {
            let resubscribe_due = async {
                match resubscribe_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                _ = resubscribe_due => {
                    resubscribe_at = None;
                    awaiting_suback = self.resubscribe();
                    continue;
                }
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(packet)) => match packet {
                    Packet::ConnAck(connack) => {
                        backoff = self.backoff_initial;
                        self.shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                        let broker_max =
                            connack.properties.as_ref().and_then(|p| p.max_packet_size).unwrap_or(u32::MAX);
                        self.shared.broker_max_packet.store(broker_max, Ordering::Relaxed);
                        info!(broker_max_packet = broker_max, "mqtt connected");
                        self.announce_online();
                        awaiting_suback = self.resubscribe();
                        if !awaiting_suback {
                            self.connected.send_replace(true);
                        }
                    }
                    Packet::SubAck(suback) => {
                        let refused = suback
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                            .count();
                        if refused > 0 {
                            // Messages on a refused subscription never arrive: not connected
                            // (a device answers locally meanwhile); subscribe again later.
                            awaiting_suback = false;
                            self.connected.send_replace(false);
                            self.shared.counters.subscriptions_refused.fetch_add(1, Ordering::Relaxed);
                            warn!(
                                reasons = ?suback.return_codes,
                                retry_in_ms = backoff.as_millis() as u64,
                                "the broker refused {refused} subscription(s): not connected"
                            );
                            resubscribe_at = Some(tokio::time::Instant::now() + backoff);
                            backoff = (backoff * 2).min(self.backoff_max);
                        } else if awaiting_suback {
                            awaiting_suback = false;
                            self.connected.send_replace(true);
                        }
                        debug!(reasons = ?suback.return_codes, "suback");
                    }
                    Packet::Publish(publish) => self.deliver(publish),
                    Packet::PubAck(ack) => self.shared.tracker().on_puback(ack.pkid, ack.reason),
                    Packet::Disconnect(d) => warn!(reason = ?d.reason_code, "broker disconnects"),
                    _ => {}
                },
                Ok(Event::Outgoing(outgoing)) => {
                    match outgoing {
                        Outgoing::Publish(pkid) => self.shared.tracker().on_written(pkid),
                        Outgoing::AwaitAck(pkid) => self.shared.tracker().on_collision(pkid),
                        Outgoing::Disconnect => {
                            // Our own clean disconnect (shutdown): the task ends.
                            self.connected.send_replace(false);
                            break;
                        }
                        _ => {}
                    }
                    self.shared.room.notify_waiters();
                }
                Err(error) => {
                    self.connected.send_replace(false);
                    awaiting_suback = false;
                    resubscribe_at = None;
                    self.shared.counters.connection_errors.fetch_add(1, Ordering::Relaxed);
                    self.forget_unsent();
                    warn!(%error, retry_in_ms = backoff.as_millis() as u64, "mqtt connection failed");
                    tokio::select! {
                        _ = self.cancel.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.backoff_max);
                }
            }
        }
        self.connected.send_replace(false);
        let lost = self.shared.tracker().on_disconnect(usize::MAX);
        self.shared.room.notify_waiters();
        debug!(lost, "mqtt link task ends");
    }

    /// After a connection error: settle buffered events, fail what was in flight or queued
    /// (rumqttc moved it to `pending`) and drop it, so a new clean session starts empty.
    fn forget_unsent(&mut self) {
        let mut tracker = self.shared.tracker();
        for event in self.eventloop.state.events.drain(..) {
            match event {
                Event::Outgoing(Outgoing::Publish(pkid)) => tracker.on_written(pkid),
                Event::Incoming(Packet::PubAck(ack)) => tracker.on_puback(ack.pkid, ack.reason),
                _ => {}
            }
        }
        let queued =
            self.eventloop.pending.iter().filter(|r| matches!(r, Request::Publish(p) if p.pkid == 0)).count();
        self.eventloop.pending.clear();
        self.eventloop.state.collision = None;
        let lost = tracker.on_disconnect(queued);
        drop(tracker);
        self.shared.counters.lost_on_disconnect.fetch_add(lost, Ordering::Relaxed);
        self.shared.room.notify_waiters();
    }

    fn announce_online(&self) {
        let Some(topic) = &self.availability_topic else {
            return;
        };
        let mut tracker = self.shared.tracker();
        match self.client.try_publish(topic.clone(), RumqttQoS::AtLeastOnce, true, ONLINE) {
            Ok(()) => tracker.queue.push_back(Pending { qos: QoS::AtLeastOnce, waiter: None }),
            Err(_) => warn!("could not queue the online availability message"),
        }
    }

    /// Subscribes to every kept subscription; returns whether a SUBACK is awaited.
    fn resubscribe(&self) -> bool {
        let filters: Vec<Filter> = self
            .shared
            .subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|s| Filter::new(s.filter.clone(), s.qos.into()))
            .collect();
        if filters.is_empty() {
            return false;
        }
        match self.client.try_subscribe_many(filters) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "could not queue the subscriptions");
                false
            }
        }
    }

    fn deliver(&self, publish: Publish) {
        let topic = match String::from_utf8(publish.topic.to_vec()) {
            Ok(t) => t,
            Err(_) => {
                warn!("publish with a non-UTF-8 topic dropped");
                return;
            }
        };
        let (response_topic, correlation_data) = match publish.properties {
            Some(p) => (p.response_topic, p.correlation_data),
            None => (None, None),
        };
        let message = Incoming {
            topic,
            payload: publish.payload,
            retain: publish.retain,
            response_topic,
            correlation_data,
        };
        let counters = &self.shared.counters;
        match self.incoming.try_send(message) {
            Ok(()) => {
                counters.received.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(m)) => {
                let dropped = counters.dropped_channel_full.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(topic = %m.topic, dropped, "incoming channel full, message dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                counters.dropped_channel_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_deserializes_with_defaults_and_refuses_unknown_keys() {
        let c: LinkConfig = toml_like(r#"{"host":"broker","client_id":"dev-1"}"#);
        assert_eq!(c.port, 1883);
        assert_eq!(c.keep_alive_secs, 30);
        c.validate().unwrap();
        assert!(serde_json::from_str::<LinkConfig>(r#"{"host":"b","client_id":"d","colour":1}"#).is_err());
    }

    fn toml_like(json: &str) -> LinkConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn bad_configs_are_refused() {
        let ok = LinkConfig::new("h", 1883, "c");
        let cases: [fn(&mut LinkConfig); 9] = [
            |c| c.host.clear(),
            |c| c.client_id.clear(),
            |c| c.password = Some("p".into()),
            |c| c.cert_file = Some("c.pem".into()),
            |c| {
                c.cert_file = Some("c.pem".into());
                c.key_file = Some("k.pem".into());
            },
            |c| c.keep_alive_secs = 1,
            |c| c.max_packet_bytes = 10,
            |c| c.reconnect_max_ms = 1,
            |c| c.incoming_capacity = 0,
        ];
        for (i, edit) in cases.iter().enumerate() {
            let mut c = ok.clone();
            edit(&mut c);
            assert!(matches!(c.validate(), Err(LinkError::Config(_))), "case {i}");
        }
    }

    #[test]
    fn missing_tls_files_are_a_typed_error() {
        let mut c = LinkConfig::new("h", 8883, "c");
        c.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(matches!(tls_transport(&c, &"/nonexistent/ca.pem".into()), Err(LinkError::Tls { .. })));
    }

    #[test]
    fn tracker_lines_up_writes_acks_and_losses() {
        let mut t = Tracker::default();
        let (a_tx, mut a_rx) = oneshot::channel();
        let (b_tx, mut b_rx) = oneshot::channel();
        let (c_tx, mut c_rx) = oneshot::channel();
        t.queue.push_back(Pending { qos: QoS::AtMostOnce, waiter: Some(a_tx) });
        t.queue.push_back(Pending { qos: QoS::AtLeastOnce, waiter: Some(b_tx) });
        t.queue.push_back(Pending { qos: QoS::AtLeastOnce, waiter: Some(c_tx) });
        t.on_written(0);
        assert_eq!(a_rx.try_recv().unwrap(), Ok(Delivered::Written));
        t.on_written(1);
        assert!(b_rx.try_recv().is_err());
        t.on_puback(1, PubAckReason::NoMatchingSubscribers);
        assert_eq!(b_rx.try_recv().unwrap(), Ok(Delivered::Acknowledged { no_matching_subscribers: true }));
        // c was queued in rumqttc when the connection broke.
        assert_eq!(t.on_disconnect(1), 1);
        assert_eq!(c_rx.try_recv().unwrap(), Err(DeliveryError::ConnectionLost));
        assert!(t.queue.is_empty() && t.by_pkid.is_empty());
    }
}

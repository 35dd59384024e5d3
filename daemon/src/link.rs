//! The device's MQTT link to the fleet's broker: cloud requests and their replies, judge scores,
//! and the fleet's topics (outcome acks, policy bundles, group commands), which it hands to
//! `fleet.rs`. Topic names and encodings belong to `tmo-protocol`; this module pairs requests with
//! replies and turns every way a cloud request can fail into a [`CloudFailure`] that the caller
//! answers locally.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tmo_protocol::chunk::WHOLE_HEADER_BYTES;
use tmo_protocol::link::{Delivered, DeliveryError, Link, LinkConfig, LinkError, LinkSetup, Message};
use tmo_protocol::link::{Incoming, PublishError, Publisher, QoS, Subscription};
use tmo_protocol::{
    CborMessage, CloudAnswer, CloudCapabilities, CloudErrorKind, CloudReply, CloudRequest, DeviceId, Inbox,
    JsonMessage, JudgeScore, MediaType, ReassemblyLimits, ReplyResult, RequestId, Topic,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::util::lock;

/// Largest reply or score accepted (an answer of a few thousand tokens is far below).
const MAX_REPLY_BYTES: usize = 1 << 20;

/// Why a cloud request gave no answer. Every case is answered locally by the caller.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CloudFailure {
    #[error("not connected to the broker")]
    NotConnected,
    #[error("no cloud bridge is subscribed to the request topic")]
    NoBridge,
    #[error("the request is {len} bytes, over the {max}-byte packet limit")]
    TooLarge { len: usize, max: usize },
    #[error("the connection to the broker was lost before the reply")]
    ConnectionLost,
    #[error("no reply within {0:.2} s")]
    Timeout(f64),
    #[error("the broker refused the request: {0}")]
    Refused(String),
    #[error("the cloud could not answer ({kind:?}): {message}")]
    Cloud { kind: CloudErrorKind, message: String },
    #[error("the request could not be encoded: {0}")]
    Encode(String),
    #[error("the cloud's reply was refused: {0}")]
    InvalidReply(String),
}

impl CloudFailure {
    /// A short name for the outcome log and the metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CloudFailure::NotConnected => "not_connected",
            CloudFailure::NoBridge => "no_bridge",
            CloudFailure::TooLarge { .. } => "too_large",
            CloudFailure::ConnectionLost => "connection_lost",
            CloudFailure::Timeout(_) => "timeout",
            CloudFailure::Refused(_) => "refused",
            CloudFailure::Cloud { kind, .. } => match kind {
                CloudErrorKind::DeadlineExceeded => "cloud_deadline",
                CloudErrorKind::RateLimited => "cloud_rate_limited",
                CloudErrorKind::Backend => "cloud_backend",
                CloudErrorKind::Overloaded => "cloud_overloaded",
                CloudErrorKind::BadRequest => "cloud_bad_request",
            },
            CloudFailure::Encode(_) => "encode",
            CloudFailure::InvalidReply(_) => "invalid_reply",
        }
    }
}

/// A cloud answer and what it took.
#[derive(Debug, Clone)]
pub struct CloudAnswered {
    pub answer: CloudAnswer,
    pub backend_latency_ms: u32,
}

/// What any request, answered or not, took.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestCost {
    /// Bytes of the request on the wire (0 when it was not sent).
    pub bytes: usize,
    /// From handing the request to the link to the reply or the failure.
    pub wait: Duration,
    /// From handing the request to the link to the broker's PUBACK: the time the request took
    /// to go up (the link's round trip and upload), `None` when no PUBACK came.
    pub acknowledged: Option<Duration>,
}

/// Bytes of a link probe's payload: small enough to measure the round trip, not the upload.
pub const PROBE_BYTES: usize = 200;

type Waiters = Arc<Mutex<HashMap<RequestId, oneshot::Sender<CloudReply>>>>;
/// What the cloud's backend takes, as the bridges last published it.
type Capabilities = Arc<Mutex<Option<CloudCapabilities>>>;

/// The running MQTT link of the daemon and the requests waiting for replies.
#[derive(Debug)]
pub struct DeviceLink {
    link: tokio::sync::Mutex<Option<Link>>,
    publisher: Publisher,
    connected: watch::Receiver<bool>,
    device: DeviceId,
    request_topic: String,
    reply_topic: String,
    waiters: Waiters,
    capabilities: Capabilities,
}

impl DeviceLink {
    /// Starts the link (on the current tokio runtime) for device `device`: retained
    /// availability with an `offline` last will, subscriptions to the device's reply and score
    /// topics and to `fleet_topics`. Judge scores go to `scores`, publishes on the fleet topics
    /// to `fleet`. Returns at once; the link connects and reconnects by itself.
    pub fn start(
        config: &LinkConfig,
        device: DeviceId,
        fleet_topics: Vec<String>,
        scores: mpsc::Sender<JudgeScore>,
        fleet: mpsc::Sender<Incoming>,
    ) -> Result<Self, LinkError> {
        let reply_topic = Topic::CloudReply(device.clone()).name();
        let score_topic = Topic::Score(device.clone()).name();
        let capabilities_topic = Topic::CloudCapabilities.name();
        let subscriptions = [reply_topic.clone(), score_topic.clone(), capabilities_topic.clone()]
            .into_iter()
            .chain(fleet_topics)
            .map(|topic| Subscription::new(topic, QoS::AtLeastOnce))
            .collect();
        let mut link = Link::start(
            config,
            LinkSetup { availability_topic: Some(Topic::Availability(device.clone()).name()), subscriptions },
        )?;
        let waiters = Waiters::default();
        let capabilities = Capabilities::default();
        let (_, closed) = mpsc::channel(1);
        let incoming = std::mem::replace(&mut link.incoming, closed);
        let routes = Routes {
            reply_topic: reply_topic.clone(),
            score_topic,
            capabilities_topic,
            waiters: waiters.clone(),
            capabilities: capabilities.clone(),
            scores,
            fleet,
        };
        tokio::spawn(dispatch(incoming, routes));
        Ok(DeviceLink {
            publisher: link.publisher(),
            connected: link.connected(),
            link: tokio::sync::Mutex::new(Some(link)),
            request_topic: Topic::CloudRequest(device.clone()).name(),
            device,
            reply_topic,
            waiters,
            capabilities,
        })
    }

    /// The attachment media the cloud takes, once a bridge has said (`None` before: anything
    /// may be attached).
    pub fn cloud_accepts(&self) -> Option<Vec<MediaType>> {
        lock(&self.capabilities).as_ref().map(|c| c.accepts.clone())
    }

    /// Whether the cloud takes `media`, as far as the bridges have said (yes until one has).
    pub fn cloud_takes(&self, media: MediaType) -> bool {
        lock(&self.capabilities).as_ref().is_none_or(|c| c.accepts.contains(&media))
    }

    /// Whether a request can be sent now (connected, subscriptions in place).
    pub fn reachable(&self) -> bool {
        *self.connected.borrow()
    }

    /// The link's connection state.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Publishes through the link.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// This device's id on the broker.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// Sends `request` and waits for its reply, at most `wait`. Fails early when the broker
    /// says nobody listens, when the connection drops, or when the bridge replies with an error.
    pub async fn ask(
        &self,
        request: &CloudRequest,
        wait: Duration,
    ) -> (Result<CloudAnswered, CloudFailure>, RequestCost) {
        let started = Instant::now();
        let mut cost = RequestCost::default();
        let result = self.exchange(request, wait, &mut cost).await;
        lock(&self.waiters).remove(&request.request_id);
        cost.wait = started.elapsed();
        (result, cost)
    }

    async fn exchange(
        &self,
        request: &CloudRequest,
        wait: Duration,
        cost: &mut RequestCost,
    ) -> Result<CloudAnswered, CloudFailure> {
        let deadline = tokio::time::Instant::now() + wait;
        let body = request.to_cbor().map_err(|e| CloudFailure::Encode(e.to_string()))?;
        let template = Message {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: Some(request.request_id.to_correlation_data()),
            expiry_secs: Some(wait.as_secs_f64().ceil().max(1.0) as u32),
            ..Message::new(self.request_topic.clone(), QoS::AtLeastOnce, Vec::new())
        };
        // One packet: the bridges of a shared subscription would each receive part of a
        // chunked request.
        let max = self.publisher.max_frame_bytes(&template);
        cost.bytes = body.len() + WHOLE_HEADER_BYTES;
        if cost.bytes > max {
            return Err(CloudFailure::TooLarge { len: cost.bytes, max });
        }
        let (reply_tx, mut reply_rx) = oneshot::channel();
        lock(&self.waiters).insert(request.request_id, reply_tx);
        let sent = Instant::now();
        let mut deliveries = match self.publisher.publish_body(&template, &body).await {
            Ok(d) => d,
            Err(PublishError::NotConnected | PublishError::Closed) => return Err(CloudFailure::NotConnected),
            Err(PublishError::TooLarge { len, max }) => return Err(CloudFailure::TooLarge { len, max }),
            Err(e) => return Err(CloudFailure::Refused(e.to_string())),
        };
        let Some(delivery) = deliveries.pop().filter(|_| deliveries.is_empty()) else {
            return Err(CloudFailure::TooLarge { len: cost.bytes, max });
        };
        let mut connected = self.connected.clone();
        let confirmed = delivery.confirmed();
        tokio::pin!(confirmed);
        let mut acknowledged = false;
        loop {
            tokio::select! {
                delivered = &mut confirmed, if !acknowledged => {
                    acknowledged = true;
                    if matches!(delivered, Ok(Delivered::Acknowledged { .. })) {
                        cost.acknowledged = Some(sent.elapsed());
                    }
                    match delivered {
                        Ok(Delivered::Acknowledged { no_matching_subscribers: true }) => {
                            return Err(CloudFailure::NoBridge);
                        }
                        Ok(_) => {}
                        Err(DeliveryError::ConnectionLost | DeliveryError::Closed) => {
                            return Err(CloudFailure::ConnectionLost);
                        }
                        Err(DeliveryError::Refused(reason)) => return Err(CloudFailure::Refused(reason)),
                    }
                }
                reply = &mut reply_rx => {
                    let Ok(reply) = reply else { return Err(CloudFailure::ConnectionLost) };
                    return match reply.result {
                        // Refused whole: nothing of it reaches the budget, the estimates or the log.
                        ReplyResult::Answer(answer) => match answer.check() {
                            Ok(()) => Ok(CloudAnswered { answer, backend_latency_ms: reply.backend_latency_ms }),
                            Err(reason) => Err(CloudFailure::InvalidReply(reason)),
                        },
                        ReplyResult::Error(e) => Err(CloudFailure::Cloud { kind: e.kind, message: e.message }),
                    };
                }
                changed = connected.wait_for(|up| !*up) => {
                    let _ = changed;
                    return Err(CloudFailure::ConnectionLost);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(CloudFailure::Timeout(wait.as_secs_f64()));
                }
            }
        }
    }

    /// Publishes a small QoS 1 message on the device's probe topic and returns its size and the
    /// time to its PUBACK, or `None` when the link is down or no PUBACK came within `timeout`.
    /// Nobody subscribes to the topic: the broker acknowledges with "no matching subscribers",
    /// which measures the round trip all the same.
    pub async fn probe(&self, timeout: Duration) -> Option<(usize, Duration)> {
        if !self.reachable() {
            return None;
        }
        let message = Message {
            expiry_secs: Some(1),
            ..Message::new(
                Topic::LinkProbe(self.device.clone()).name(),
                QoS::AtLeastOnce,
                vec![0; PROBE_BYTES],
            )
        };
        let sent = Instant::now();
        let delivery = self.publisher.publish(message).await.ok()?;
        match tokio::time::timeout(timeout, delivery.confirmed()).await {
            Ok(Ok(Delivered::Acknowledged { .. })) => {
                Some((PROBE_BYTES + WHOLE_HEADER_BYTES, sent.elapsed()))
            }
            _ => None,
        }
    }

    /// Publishes `offline` and disconnects, waiting at most `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        if let Some(link) = self.link.lock().await.take() {
            link.shutdown(timeout).await;
        }
    }
}

/// Where incoming publishes go.
struct Routes {
    reply_topic: String,
    score_topic: String,
    capabilities_topic: String,
    waiters: Waiters,
    capabilities: Capabilities,
    scores: mpsc::Sender<JudgeScore>,
    fleet: mpsc::Sender<Incoming>,
}

/// Routes incoming publishes: replies to the request waiting for them, scores to `scores`, the
/// rest to `fleet`. Malformed payloads are refused, counted and logged; they never stop the loop.
async fn dispatch(mut incoming: mpsc::Receiver<Incoming>, routes: Routes) {
    let mut inbox = Inbox::new(ReassemblyLimits {
        max_message_bytes: MAX_REPLY_BYTES,
        max_partial_bytes: 4 * MAX_REPLY_BYTES,
        ..ReassemblyLimits::default()
    });
    let mut expiry = tokio::time::interval(Duration::from_secs(5));
    loop {
        let message = tokio::select! {
            message = incoming.recv() => message,
            _ = expiry.tick() => {
                inbox.expire(Instant::now());
                continue;
            }
        };
        let Some(message) = message else { break };
        if message.topic == routes.reply_topic {
            let Some(reply) = inbox.receive::<CloudReply>(&message.topic, &message.payload, Instant::now())
            else {
                continue;
            };
            match lock(&routes.waiters).remove(&reply.request_id) {
                Some(waiter) => {
                    let _ = waiter.send(reply);
                }
                None => {
                    tracing::debug!(request_id = %reply.request_id, "reply to a request no longer waiting")
                }
            }
        } else if message.topic == routes.capabilities_topic {
            let taken = if message.payload.is_empty() {
                Ok(None) // the retained copy was cleared
            } else {
                CloudCapabilities::from_json(&message.payload, MAX_REPLY_BYTES).map(Some)
            };
            match taken {
                Ok(capabilities) => {
                    tracing::info!(accepts = ?capabilities.as_ref().map(|c| &c.accepts), "cloud capabilities");
                    *lock(&routes.capabilities) = capabilities;
                }
                Err(error) => tracing::warn!(topic = %message.topic, %error, "cloud capabilities refused"),
            }
        } else if message.topic == routes.score_topic {
            match JudgeScore::from_json(&message.payload, MAX_REPLY_BYTES) {
                Ok(score) => {
                    if routes.scores.try_send(score).is_err() {
                        tracing::warn!("judge score dropped: the score queue is full");
                    }
                }
                Err(error) => tracing::warn!(topic = %message.topic, %error, "judge score refused"),
            }
        } else if routes.fleet.send(message).await.is_err() {
            break;
        }
    }
}

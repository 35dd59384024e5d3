//! The device's MQTT link to the fleet's broker: cloud requests, the pieces of their streamed
//! answers and their replies, judge scores, and the fleet's topics (outcome acks, policy bundles),
//! which it hands to `fleet.rs`. Topic names and encodings belong to `tmo-protocol`; this module
//! pairs requests with their pieces and replies, passes the pieces on in order and once each, tells
//! the bridges when it stops waiting, and turns every way a cloud request can fail into a
//! [`CloudFailure`] (answered locally by the caller when nothing was shown yet).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tmo_protocol::chunk::WHOLE_HEADER_BYTES;
use tmo_protocol::link::{Delivered, DeliveryError, Link, LinkConfig, LinkError, LinkSetup, Message};
use tmo_protocol::link::{Incoming, PublishError, Publisher, QoS, Subscription};
use tmo_protocol::{
    CborMessage, CloudAnswer, CloudCancel, CloudCapabilities, CloudChunk, CloudErrorKind, CloudReply,
    CloudRequest, DeviceId, Inbox, JsonMessage, JudgeScore, MediaType, ReassemblyLimits, ReplyResult,
    RequestId, Topic,
};
use tokio::sync::{mpsc, watch};

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
    #[error("the answer's stream stalled: nothing for {0:.2} s")]
    Stalled(f64),
    #[error("the client went away")]
    Cancelled,
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
            CloudFailure::Stalled(_) => "stalled",
            CloudFailure::Cancelled => "cancelled",
        }
    }
}

/// A cloud answer and what it took.
#[derive(Debug, Clone)]
pub struct CloudAnswered {
    pub answer: CloudAnswer,
    pub backend_latency_ms: u32,
}

/// What of a streamed answer was passed on before the request ended, however it ended.
#[derive(Debug, Clone, Default)]
pub struct Shown {
    /// The text passed on, in order.
    pub text: String,
    /// From handing the request to the link to the first text passed on.
    pub first: Option<Duration>,
}

/// What any request, answered or not, took.
#[derive(Debug, Clone, Default)]
pub struct RequestCost {
    /// Bytes of the request on the wire (0 when it was not sent).
    pub bytes: usize,
    /// From handing the request to the link to the reply or the failure.
    pub wait: Duration,
    /// From handing the request to the link to the broker's PUBACK: the time the request took
    /// to go up (the link's round trip and upload), `None` when no PUBACK came.
    pub acknowledged: Option<Duration>,
    /// What of the answer was passed on as it streamed.
    pub shown: Shown,
}

/// What reaches a request waiting for its answer.
#[derive(Debug)]
enum FromBridge {
    Piece(CloudChunk),
    Reply(CloudReply),
}

/// Pieces held back while one before them is missing, at most; beyond, they wait for the reply.
const MAX_PIECES_HELD: usize = 256;

/// Puts the pieces of a streamed answer back in order: each is passed on once, in sequence;
/// duplicates are dropped and pieces after a gap are held until the gap fills (or the reply,
/// which holds the whole answer, arrives).
#[derive(Debug, Default)]
struct PieceOrder {
    next: u32,
    held: BTreeMap<u32, String>,
}

impl PieceOrder {
    /// Takes `chunk`; returns the text that is now in order, if any.
    fn accept(&mut self, chunk: CloudChunk) -> Option<String> {
        if chunk.seq < self.next || self.held.contains_key(&chunk.seq) {
            return None; // a duplicate
        }
        if chunk.seq > self.next {
            if self.held.len() < MAX_PIECES_HELD {
                self.held.insert(chunk.seq, chunk.text);
            }
            return None;
        }
        let mut text = chunk.text;
        self.next += 1;
        while let Some(more) = self.held.remove(&self.next) {
            text.push_str(&more);
            self.next += 1;
        }
        Some(text)
    }
}

/// Bytes of a link probe's payload: small enough to measure the round trip, not the upload.
pub const PROBE_BYTES: usize = 200;

type Waiters = Arc<Mutex<HashMap<RequestId, mpsc::UnboundedSender<FromBridge>>>>;
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
    cancel_topic: String,
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
        let stream_topic = Topic::CloudStream(device.clone()).name();
        let score_topic = Topic::Score(device.clone()).name();
        let capabilities_topic = Topic::CloudCapabilities.name();
        let subscriptions = [&reply_topic, &stream_topic, &score_topic, &capabilities_topic]
            .into_iter()
            .cloned()
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
            stream_topic,
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
            cancel_topic: Topic::CloudCancel(device.clone()).name(),
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

    /// Sends `request` and waits for its reply, at most `wait`, passing the text of a streamed
    /// answer to `pieces` as it comes (the reply's text past what the pieces showed at the end).
    /// Fails early when the broker says nobody listens, when the connection drops, when the
    /// bridge replies with an error, when a stream that began stays silent for `stall`, or when
    /// `pieces` is closed (the client went away); the bridges are told when the device stops
    /// waiting, so that the backend stops too. What was passed on is in the cost's `shown`.
    pub async fn ask(
        &self,
        request: &CloudRequest,
        wait: Duration,
        stall: Duration,
        pieces: &mpsc::UnboundedSender<String>,
    ) -> (Result<CloudAnswered, CloudFailure>, RequestCost) {
        let started = Instant::now();
        let mut cost = RequestCost::default();
        let result = self.exchange(request, wait, stall, pieces, &mut cost).await;
        lock(&self.waiters).remove(&request.request_id);
        if matches!(
            result,
            Err(CloudFailure::Timeout(_) | CloudFailure::Stalled(_) | CloudFailure::Cancelled)
        ) {
            self.cancel(request.request_id).await;
        }
        cost.wait = started.elapsed();
        (result, cost)
    }

    /// Tells the bridges the device no longer waits for `request_id` (best effort: a bridge that
    /// does not hear it stops at the request's deadline).
    async fn cancel(&self, request_id: RequestId) {
        let Ok(body) = (CloudCancel { request_id }).to_cbor() else { return };
        let template = Message {
            expiry_secs: Some(60),
            ..Message::new(self.cancel_topic.clone(), QoS::AtLeastOnce, Vec::new())
        };
        if let Err(error) = self.publisher.publish_body(&template, &body).await {
            tracing::debug!(%request_id, %error, "cancel not sent");
        }
    }

    async fn exchange(
        &self,
        request: &CloudRequest,
        wait: Duration,
        stall: Duration,
        pieces: &mpsc::UnboundedSender<String>,
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
        let (to_request, mut from_bridge) = mpsc::unbounded_channel();
        lock(&self.waiters).insert(request.request_id, to_request);
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
        let mut order = PieceOrder::default();
        // Silence is measured from the last piece once the stream began.
        let mut stalls_at: Option<tokio::time::Instant> = None;
        let shown = &mut cost.shown;
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
                message = from_bridge.recv() => match message {
                    None => return Err(CloudFailure::ConnectionLost),
                    Some(FromBridge::Piece(chunk)) => {
                        if let Some(text) = order.accept(chunk) {
                            shown.first.get_or_insert_with(|| sent.elapsed());
                            shown.text.push_str(&text);
                            if pieces.send(text).is_err() {
                                return Err(CloudFailure::Cancelled);
                            }
                        }
                        stalls_at = Some(tokio::time::Instant::now() + stall);
                    }
                    Some(FromBridge::Reply(reply)) => return finish(reply, shown, pieces, sent),
                },
                () = pieces.closed() => return Err(CloudFailure::Cancelled),
                changed = connected.wait_for(|up| !*up) => {
                    let _ = changed;
                    return Err(CloudFailure::ConnectionLost);
                }
                () = tokio::time::sleep_until(stalls_at.unwrap_or(deadline).min(deadline)) => {
                    return Err(match stalls_at {
                        Some(at) if at < deadline => CloudFailure::Stalled(stall.as_secs_f64()),
                        _ => CloudFailure::Timeout(wait.as_secs_f64()),
                    });
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

/// The answer of `reply`: a streamed answer's text past what was shown goes to `pieces`.
fn finish(
    reply: CloudReply,
    shown: &mut Shown,
    pieces: &mpsc::UnboundedSender<String>,
    sent: Instant,
) -> Result<CloudAnswered, CloudFailure> {
    match reply.result {
        // Refused whole: nothing of it reaches the budget, the estimates or the log.
        ReplyResult::Answer(answer) => {
            answer.check().map_err(CloudFailure::InvalidReply)?;
            match answer.answer.strip_prefix(shown.text.as_str()) {
                Some("") => {}
                Some(rest) => {
                    shown.first.get_or_insert_with(|| sent.elapsed());
                    shown.text.push_str(rest);
                    let _ = pieces.send(rest.to_owned());
                }
                None => tracing::warn!(
                    request_id = %reply.request_id,
                    "the streamed text is not the start of the reply's answer: the log keeps the reply's"
                ),
            }
            Ok(CloudAnswered { answer, backend_latency_ms: reply.backend_latency_ms })
        }
        ReplyResult::Error(e) => Err(CloudFailure::Cloud { kind: e.kind, message: e.message }),
    }
}

/// Where incoming publishes go.
struct Routes {
    reply_topic: String,
    stream_topic: String,
    score_topic: String,
    capabilities_topic: String,
    waiters: Waiters,
    capabilities: Capabilities,
    scores: mpsc::Sender<JudgeScore>,
    fleet: mpsc::Sender<Incoming>,
}

impl Routes {
    /// Hands a piece or a reply to the request waiting for it (late ones are dropped).
    fn to_waiter(&self, request_id: RequestId, message: FromBridge) {
        let waiters = lock(&self.waiters);
        match waiters.get(&request_id) {
            Some(waiter) => {
                let _ = waiter.send(message);
            }
            None => tracing::debug!(%request_id, "reply or piece for a request no longer waiting"),
        }
    }
}

/// Routes incoming publishes: replies and pieces to the request waiting for them, scores to `scores`, the
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
            routes.to_waiter(reply.request_id, FromBridge::Reply(reply));
        } else if message.topic == routes.stream_topic {
            let Some(chunk) = inbox.receive::<CloudChunk>(&message.topic, &message.payload, Instant::now())
            else {
                continue;
            };
            routes.to_waiter(chunk.request_id, FromBridge::Piece(chunk));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(seq: u32, text: &str) -> CloudChunk {
        CloudChunk { request_id: RequestId(7), seq, text: text.into() }
    }

    #[test]
    fn pieces_pass_on_in_order_once_each() {
        let mut order = PieceOrder::default();
        assert_eq!(order.accept(piece(0, "a")).as_deref(), Some("a"));
        assert_eq!(order.accept(piece(0, "a")), None, "a duplicate");
        assert_eq!(order.accept(piece(2, "c")), None, "held until 1 comes");
        assert_eq!(order.accept(piece(3, "d")), None);
        assert_eq!(order.accept(piece(2, "c")), None, "a duplicate of a held piece");
        assert_eq!(order.accept(piece(1, "b")).as_deref(), Some("bcd"), "the gap filled");
        assert_eq!(order.accept(piece(1, "b")), None, "late");
        assert_eq!(order.accept(piece(4, "e")).as_deref(), Some("e"));
    }

    #[test]
    fn pieces_after_a_long_gap_are_not_held_without_bound() {
        let mut order = PieceOrder::default();
        for seq in 1..=(MAX_PIECES_HELD as u32 + 50) {
            assert_eq!(order.accept(piece(seq, "x")), None);
        }
        assert_eq!(order.held.len(), MAX_PIECES_HELD);
    }

    #[test]
    fn the_reply_completes_what_the_pieces_showed() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let reply = |text: &str| CloudReply {
            request_id: RequestId(7),
            backend_latency_ms: 5,
            bridge_latency_ms: 6,
            result: ReplyResult::Answer(CloudAnswer {
                answer: text.into(),
                model: "m".into(),
                prompt_tokens: 1,
                completion_tokens: 2,
                cost_usd: 0.001,
            }),
        };
        let mut shown = Shown { text: "Hello ".into(), first: Some(Duration::from_millis(3)) };
        let answered = finish(reply("Hello world"), &mut shown, &tx, Instant::now()).expect("answer");
        assert_eq!(answered.answer.answer, "Hello world");
        assert_eq!(rx.try_recv().ok().as_deref(), Some("world"), "the missing end is passed on");
        assert_eq!(shown.text, "Hello world");
        // A reply that does not start with what was shown is kept whole; nothing more is shown.
        let mut shown = Shown { text: "Bye".into(), ..Shown::default() };
        finish(reply("Hello"), &mut shown, &tx, Instant::now()).expect("answer");
        assert!(rx.try_recv().is_err());
        // Nothing shown: the whole answer goes at once.
        let mut shown = Shown::default();
        finish(reply("Hi"), &mut shown, &tx, Instant::now()).expect("answer");
        assert_eq!(rx.try_recv().ok().as_deref(), Some("Hi"));
        assert!(shown.first.is_some());
    }
}

//! The bridge loop: requests in from the shared subscription, backend calls within each
//! request's deadline, the pieces of streamed answers on the device's stream topic as they come,
//! replies out on the device's reply topic. A device's cancel (heard by every bridge) stops the
//! backend call of the bridge serving it, which then replies nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tmo_protocol::link::{Incoming, Link, LinkSetup, Message, Publisher, QoS, Subscription};
use tmo_protocol::topic::filter;
use tmo_protocol::{
    CborMessage, CloudAnswer, CloudCancel, CloudCapabilities, CloudChunk, CloudError, CloudErrorKind,
    CloudReply, CloudRequest, DeviceId, Inbox, JsonMessage, ReassemblyLimits, ReplyResult, ReplyRoute,
    RequestId, Topic,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backend::Backend;
use crate::config::{Config, PerDeviceLimits, Price};
use crate::judge::Judge;

/// The bridge's counters.
#[derive(Debug, Default)]
pub struct BridgeCounters {
    /// Requests decoded.
    pub requests: AtomicU64,
    /// Answers published.
    pub answers: AtomicU64,
    /// Error replies published.
    pub errors: AtomicU64,
    /// Requests refused before any reply (bad route).
    pub refused: AtomicU64,
    /// Replies that could not be published.
    pub publish_failures: AtomicU64,
    /// Requests their device cancelled while they were served (no reply sent).
    pub cancelled: AtomicU64,
    /// Redeliveries of a request already being served, dropped.
    pub duplicates: AtomicU64,
    /// Pieces of streamed answers published.
    pub chunks: AtomicU64,
    /// Judge scores published.
    pub scores: AtomicU64,
    /// Sampled answers the judge could not score.
    pub score_failures: AtomicU64,
}

/// Everything a request task needs.
struct Shared {
    backend: Backend,
    judge: Option<Judge>,
    price: Price,
    system_prompt: String,
    reply_margin: Duration,
    stream_batch: Duration,
    slots: Semaphore,
    counters: BridgeCounters,
    limits: PerDeviceLimits,
    /// What each device is using of its limits.
    usage: Mutex<HashMap<DeviceId, DeviceUse>>,
    /// The requests being served, to cancel when their device says so.
    in_progress: Mutex<HashMap<(DeviceId, RequestId), CancellationToken>>,
}

/// A request's place among those in progress, removed when dropped.
struct InProgress {
    shared: Arc<Shared>,
    key: (DeviceId, RequestId),
    cancel: CancellationToken,
}

impl Shared {
    /// Registers a request as in progress, or `None` when it already is (a redelivery).
    fn start(self: &Arc<Self>, request: &CloudRequest) -> Option<InProgress> {
        let key = (request.device_id.clone(), request.request_id);
        let mut in_progress = self.in_progress.lock().unwrap_or_else(PoisonError::into_inner);
        if in_progress.contains_key(&key) {
            return None;
        }
        let cancel = CancellationToken::new();
        in_progress.insert(key.clone(), cancel.clone());
        Some(InProgress { shared: self.clone(), key, cancel })
    }

    /// Cancels `device`'s request `request_id` if this bridge is serving it.
    fn cancel(&self, device: DeviceId, request_id: RequestId) -> bool {
        let in_progress = self.in_progress.lock().unwrap_or_else(PoisonError::into_inner);
        in_progress.get(&(device, request_id)).map(CancellationToken::cancel).is_some()
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.shared.in_progress.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

/// One device's requests in flight and its request bucket.
#[derive(Debug)]
struct DeviceUse {
    in_flight: usize,
    /// Requests it may send now (refilled at `requests_per_minute`, up to as many).
    tokens: f64,
    refilled: Instant,
}

/// Devices whose use is remembered before the idle ones are forgotten.
const DEVICES_REMEMBERED: usize = 10_000;

impl Shared {
    /// Takes a place among `device`'s requests, or says which limit it is over.
    fn admit(self: &Arc<Self>, device: &DeviceId) -> Result<DevicePermit, CloudError> {
        let limits = self.limits;
        let now = Instant::now();
        let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        if usage.len() >= DEVICES_REMEMBERED {
            // A device idle for a minute has its whole bucket back: forgetting it changes nothing.
            usage.retain(|_, u| u.in_flight > 0 || now.duration_since(u.refilled) < Duration::from_secs(60));
        }
        let used = usage.entry(device.clone()).or_insert(DeviceUse {
            in_flight: 0,
            tokens: limits.requests_per_minute,
            refilled: now,
        });
        let refill = now.duration_since(used.refilled).as_secs_f64() * limits.requests_per_minute / 60.0;
        used.tokens = (used.tokens + refill).min(limits.requests_per_minute);
        used.refilled = now;
        if used.in_flight >= limits.in_flight {
            return Err(CloudError {
                kind: CloudErrorKind::Overloaded,
                message: format!(
                    "device {device} has {} requests in flight, the most this bridge serves at once per device",
                    used.in_flight
                ),
            });
        }
        if used.tokens < 1.0 {
            return Err(CloudError {
                kind: CloudErrorKind::RateLimited,
                message: format!(
                    "device {device} is over its {} requests per minute at this bridge",
                    limits.requests_per_minute
                ),
            });
        }
        used.tokens -= 1.0;
        used.in_flight += 1;
        Ok(DevicePermit { shared: self.clone(), device: device.clone() })
    }
}

/// A device's place among its requests in flight, given back when dropped.
struct DevicePermit {
    shared: Arc<Shared>,
    device: DeviceId,
}

impl Drop for DevicePermit {
    fn drop(&mut self) {
        let mut usage = self.shared.usage.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(used) = usage.get_mut(&self.device) {
            used.in_flight = used.in_flight.saturating_sub(1);
        }
    }
}

/// Unix time in ms now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Runs the bridge until `shutdown` is cancelled, then drains requests in progress.
pub async fn run(
    config: Config,
    backend: Backend,
    judge: Option<Judge>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let subscriptions = vec![
        Subscription::new(filter::cloud_requests_shared(&config.share_group), QoS::AtLeastOnce),
        Subscription::new(filter::all_cloud_cancels(), QoS::AtLeastOnce),
    ];
    let mut link = Link::start(&config.file.mqtt, LinkSetup { availability_topic: None, subscriptions })?;
    let publisher = link.publisher();
    let capabilities = CloudCapabilities {
        v: tmo_protocol::MESSAGE_VERSION,
        model: config.file.backend.model().to_owned(),
        accepts: config.file.backend.accepts(),
        max_tokens: config.file.per_device.max_tokens,
        updated_unix_ms: unix_ms_now(),
        extra: serde_json::Map::new(),
    };
    tokio::spawn(publish_capabilities(capabilities, link.connected(), publisher.clone(), shutdown.clone()));
    let shared = Arc::new(Shared {
        backend,
        judge,
        price: config.price,
        system_prompt: config.file.system_prompt.clone(),
        reply_margin: Duration::from_millis(config.file.reply_margin_ms),
        stream_batch: Duration::from_millis(config.file.stream_batch_ms),
        slots: Semaphore::new(config.file.max_concurrent_requests),
        counters: BridgeCounters::default(),
        limits: config.file.per_device,
        usage: Mutex::new(HashMap::new()),
        in_progress: Mutex::new(HashMap::new()),
    });
    let mut inbox = Inbox::new(ReassemblyLimits {
        max_message_bytes: config.file.max_request_bytes,
        max_partial_bytes: config.file.max_request_bytes.saturating_mul(4),
        ..ReassemblyLimits::default()
    });
    let tracker = TaskTracker::new();
    let mut expire_tick = tokio::time::interval(Duration::from_secs(1));
    info!(
        share_group = %config.share_group,
        model = shared.backend.model(),
        max_concurrent = config.file.max_concurrent_requests,
        "tmo-cloud bridge started"
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = expire_tick.tick() => {
                let expired = inbox.expire(std::time::Instant::now());
                if expired > 0 {
                    warn!(expired, "partial requests expired");
                }
            }
            incoming = link.incoming.recv() => {
                let Some(incoming) = incoming else { break };
                handle_incoming(&mut inbox, incoming, &shared, &publisher, &tracker);
            }
        }
    }
    info!(in_progress = tracker.len(), "draining");
    tracker.close();
    if tokio::time::timeout(Duration::from_millis(config.file.drain_timeout_ms), tracker.wait())
        .await
        .is_err()
    {
        warn!(abandoned = tracker.len(), "drain timeout: requests abandoned");
    }
    let rejected = inbox.rejected();
    let c = &shared.counters;
    info!(
        requests = c.requests.load(Ordering::Relaxed),
        answers = c.answers.load(Ordering::Relaxed),
        errors = c.errors.load(Ordering::Relaxed),
        refused = c.refused.load(Ordering::Relaxed),
        publish_failures = c.publish_failures.load(Ordering::Relaxed),
        cancelled = c.cancelled.load(Ordering::Relaxed),
        duplicates = c.duplicates.load(Ordering::Relaxed),
        chunks = c.chunks.load(Ordering::Relaxed),
        scores = c.scores.load(Ordering::Relaxed),
        score_failures = c.score_failures.load(Ordering::Relaxed),
        malformed_payloads = rejected.total(),
        "tmo-cloud bridge stopped"
    );
    link.shutdown(Duration::from_secs(2)).await;
    Ok(())
}

fn handle_incoming(
    inbox: &mut Inbox,
    incoming: Incoming,
    shared: &Arc<Shared>,
    publisher: &Publisher,
    tracker: &TaskTracker,
) {
    let received = Instant::now();
    if let Ok(Topic::CloudCancel(device)) = Topic::parse(&incoming.topic) {
        if let Some(cancel) = inbox.receive::<CloudCancel>(&incoming.topic, &incoming.payload, received)
            && shared.cancel(device, cancel.request_id)
        {
            info!(request_id = %cancel.request_id, "cancelled by its device");
        }
        return;
    }
    let Some(mut request) = inbox.receive::<CloudRequest>(&incoming.topic, &incoming.payload, received)
    else {
        return;
    };
    let route = match ReplyRoute::for_request(
        &request,
        &incoming.topic,
        incoming.response_topic.as_deref(),
        incoming.correlation_data.as_deref(),
    ) {
        Ok(route) => route,
        Err(error) => {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            warn!(%error, request_id = %request.request_id, "request refused");
            return;
        }
    };
    let Some(in_progress) = shared.start(&request) else {
        shared.counters.duplicates.fetch_add(1, Ordering::Relaxed);
        debug!(request_id = %request.request_id, "redelivery of a request in progress dropped");
        return;
    };
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    let admitted = shared.admit(&request.device_id);
    request.max_tokens = request.max_tokens.min(shared.limits.max_tokens);
    let shared = shared.clone();
    let publisher = publisher.clone();
    let judge_tracker = tracker.clone();
    tracker.spawn(async move {
        let cancel = in_progress.cancel.clone();
        let reply = tokio::select! {
            reply = serve(&shared, &publisher, &request, received, admitted) => reply,
            // Dropping `serve` stops the backend call (and the pieces still to publish).
            () = cancel.cancelled() => {
                shared.counters.cancelled.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        drop(in_progress);
        publish_reply(&shared, &publisher, &route, &reply).await;
        if let ReplyResult::Answer(answer) = reply.result
            && shared.judge.as_ref().is_some_and(|j| j.sampled(&request))
        {
            judge_tracker
                .spawn(async move { judge_and_publish(&shared, &publisher, &request, &answer.answer).await });
        }
    });
}

/// Publishes the pieces of a streamed answer on `device`'s stream topic as they come, numbered
/// from 0: the first at once, later ones gathered while the last went out less than `batch`
/// ago. Ends when the backend call drops its sender. Returns the number of pieces published.
async fn forward_pieces(
    mut pieces: mpsc::UnboundedReceiver<String>,
    publisher: &Publisher,
    device: &DeviceId,
    request_id: RequestId,
    batch: Duration,
) -> u32 {
    let template = Message::new(Topic::CloudStream(device.clone()).name(), QoS::AtLeastOnce, Vec::new());
    let mut seq = 0u32;
    let mut last_sent: Option<tokio::time::Instant> = None;
    let mut open = true;
    while open {
        let Some(mut text) = pieces.recv().await else { break };
        if let Some(due) = last_sent.map(|at| at + batch) {
            loop {
                tokio::select! {
                    piece = pieces.recv() => match piece {
                        Some(piece) => text.push_str(&piece),
                        None => { open = false; break }
                    },
                    () = tokio::time::sleep_until(due) => break,
                }
            }
        }
        let body = match (CloudChunk { request_id, seq, text }).to_cbor() {
            Ok(body) => body,
            Err(error) => {
                warn!(%error, "answer piece not encoded");
                continue;
            }
        };
        last_sent = Some(tokio::time::Instant::now());
        if let Err(error) = publisher.publish_body(&template, &body).await {
            // The reply still carries the whole answer.
            debug!(%error, %request_id, seq, "answer piece not published");
        }
        seq += 1;
    }
    seq
}

async fn judge_and_publish(shared: &Shared, publisher: &Publisher, request: &CloudRequest, answer: &str) {
    let Some(judge) = &shared.judge else {
        return;
    };
    let score = match judge.score(request, answer).await {
        Ok(score) => score,
        Err(error) => {
            shared.counters.score_failures.fetch_add(1, Ordering::Relaxed);
            warn!(%error, request_id = %request.request_id, "answer not scored");
            return;
        }
    };
    let payload = match score.to_json() {
        Ok(p) => p,
        Err(error) => {
            shared.counters.score_failures.fetch_add(1, Ordering::Relaxed);
            warn!(%error, "score not encoded");
            return;
        }
    };
    let topic = Topic::Score(request.device_id.clone()).name();
    match publisher.publish(Message::new(topic, QoS::AtLeastOnce, payload)).await {
        Ok(_) => {
            shared.counters.scores.fetch_add(1, Ordering::Relaxed);
            info!(request_id = %request.request_id, score = score.score, "answer scored");
        }
        Err(error) => {
            shared.counters.score_failures.fetch_add(1, Ordering::Relaxed);
            warn!(%error, "score not published");
        }
    }
}

/// Publishes what the backend takes (retained) at every connection: a broker that restarted
/// without persistence has lost the retained copy.
async fn publish_capabilities(
    capabilities: CloudCapabilities,
    mut connected: tokio::sync::watch::Receiver<bool>,
    publisher: Publisher,
    shutdown: CancellationToken,
) {
    let topic = Topic::CloudCapabilities.name();
    let payload = match capabilities.to_json() {
        Ok(p) => p,
        Err(error) => return warn!(%error, "capabilities not encoded"),
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            up = connected.wait_for(|up| *up) => if up.is_err() { return },
        }
        let message = Message::new(topic.clone(), QoS::AtLeastOnce, payload.clone()).retained(true);
        match publisher.publish(message).await {
            Ok(_) => info!(accepts = ?capabilities.accepts, "capabilities published"),
            Err(error) => warn!(%error, "capabilities not published"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            down = connected.wait_for(|up| !*up) => if down.is_err() { return },
        }
    }
}

/// The deadline as an instant, less the reply margin.
fn reply_deadline(request: &CloudRequest, received: Instant, margin: Duration) -> Instant {
    let remaining_ms = request.deadline_unix_ms.saturating_sub(unix_ms_now());
    (received + Duration::from_millis(remaining_ms)).checked_sub(margin).unwrap_or(received)
}

/// Answers `request` (holding its device's place, `admitted`, until then), or says why not. A
/// request that streams has its answer's pieces published while the backend generates them.
async fn serve(
    shared: &Shared,
    publisher: &Publisher,
    request: &CloudRequest,
    received: Instant,
    admitted: Result<DevicePermit, CloudError>,
) -> CloudReply {
    let deadline = reply_deadline(request, received, shared.reply_margin);
    let error = |kind, message: String| ReplyResult::Error(CloudError { kind, message });
    let mut backend_latency = Duration::ZERO;
    let (_permit, refusal) = match admitted {
        Ok(permit) => (Some(permit), None),
        Err(refusal) => (None, Some(refusal)),
    };
    let result = if let Some(refusal) = refusal {
        // Over the device's limits: refused at once, the backend never called.
        ReplyResult::Error(refusal)
    } else if request.expired(unix_ms_now()) || Instant::now() >= deadline {
        error(CloudErrorKind::DeadlineExceeded, "the request arrived after its deadline".into())
    } else {
        let deadline_tokio = tokio::time::Instant::from_std(deadline);
        match tokio::time::timeout_at(deadline_tokio, shared.slots.acquire()).await {
            Err(_) => error(CloudErrorKind::Overloaded, "no free slot before the deadline".into()),
            Ok(Err(_)) => error(CloudErrorKind::Overloaded, "the bridge is stopping".into()),
            Ok(Ok(_permit)) => {
                let started = Instant::now();
                let (pieces, streamed) = mpsc::unbounded_channel();
                let call = async move {
                    // Owns the sender: the forwarder ends when the call does.
                    let pieces = request.stream.then_some(pieces);
                    let answer =
                        shared.backend.answer(request, &shared.system_prompt, deadline, pieces.as_ref());
                    tokio::time::timeout_at(deadline_tokio, answer).await
                };
                let forward = forward_pieces(
                    streamed,
                    publisher,
                    &request.device_id,
                    request.request_id,
                    shared.stream_batch,
                );
                let (answered, chunks) = tokio::join!(call, forward);
                shared.counters.chunks.fetch_add(u64::from(chunks), Ordering::Relaxed);
                backend_latency = started.elapsed();
                match answered {
                    Err(_) => error(
                        CloudErrorKind::DeadlineExceeded,
                        format!("the backend did not answer within {} ms", backend_latency.as_millis()),
                    ),
                    Ok(Err(e)) => error(e.kind(), e.to_string()),
                    Ok(Ok(a)) => {
                        let cost_usd =
                            shared.price.cost_usd(a.prompt_tokens, a.completion_tokens, a.images_sent);
                        let model =
                            if a.model.is_empty() { shared.backend.model().to_owned() } else { a.model };
                        ReplyResult::Answer(CloudAnswer {
                            answer: a.text,
                            model,
                            prompt_tokens: a.prompt_tokens,
                            completion_tokens: a.completion_tokens,
                            cost_usd,
                        })
                    }
                }
            }
        }
    };
    let counter = match &result {
        ReplyResult::Answer(_) => &shared.counters.answers,
        ReplyResult::Error(e) => {
            info!(request_id = %request.request_id, kind = ?e.kind, message = %e.message, "error reply");
            &shared.counters.errors
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
    CloudReply {
        request_id: request.request_id,
        backend_latency_ms: backend_latency.as_millis().try_into().unwrap_or(u32::MAX),
        bridge_latency_ms: received.elapsed().as_millis().try_into().unwrap_or(u32::MAX),
        result,
    }
}

async fn publish_reply(shared: &Shared, publisher: &Publisher, route: &ReplyRoute, reply: &CloudReply) {
    let body = match reply.to_cbor() {
        Ok(b) => b,
        Err(error) => {
            shared.counters.publish_failures.fetch_add(1, Ordering::Relaxed);
            warn!(%error, "reply not encoded");
            return;
        }
    };
    let template = Message {
        correlation_data: route.correlation_data.clone(),
        ..Message::new(route.topic.clone(), QoS::AtLeastOnce, Vec::new())
    };
    match publisher.publish_body(&template, &body).await {
        Ok(_) => debug!(request_id = %reply.request_id, topic = %route.topic, "reply published"),
        Err(error) => {
            shared.counters.publish_failures.fetch_add(1, Ordering::Relaxed);
            warn!(%error, request_id = %reply.request_id, "reply not published");
        }
    }
}

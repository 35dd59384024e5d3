//! The bridge loop: requests in from the shared subscription, backend calls within each
//! request's deadline, replies out on the device's reply topic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tmo_protocol::link::{Incoming, Link, LinkSetup, Message, Publisher, QoS, Subscription};
use tmo_protocol::topic::filter;
use tmo_protocol::{
    CborMessage, CloudAnswer, CloudError, CloudErrorKind, CloudReply, CloudRequest, Inbox, JsonMessage,
    ReassemblyLimits, ReplyResult, ReplyRoute, Topic,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backend::Backend;
use crate::config::{Config, Price};
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
    slots: Semaphore,
    counters: BridgeCounters,
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
    let subscription =
        Subscription::new(filter::cloud_requests_shared(&config.share_group), QoS::AtLeastOnce);
    let mut link = Link::start(
        &config.file.mqtt,
        LinkSetup { availability_topic: None, subscriptions: vec![subscription] },
    )?;
    let publisher = link.publisher();
    let shared = Arc::new(Shared {
        backend,
        judge,
        price: config.price,
        system_prompt: config.file.system_prompt.clone(),
        reply_margin: Duration::from_millis(config.file.reply_margin_ms),
        slots: Semaphore::new(config.file.max_concurrent_requests),
        counters: BridgeCounters::default(),
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
    let Some(request) = inbox.receive::<CloudRequest>(&incoming.topic, &incoming.payload, received) else {
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
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    let shared = shared.clone();
    let publisher = publisher.clone();
    let judge_tracker = tracker.clone();
    tracker.spawn(async move {
        let reply = serve(&shared, &request, received).await;
        publish_reply(&shared, &publisher, &route, &reply).await;
        if let ReplyResult::Answer(answer) = reply.result
            && shared.judge.as_ref().is_some_and(|j| j.sampled(&request))
        {
            judge_tracker
                .spawn(async move { judge_and_publish(&shared, &publisher, &request, &answer.answer).await });
        }
    });
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

/// The deadline as an instant, less the reply margin.
fn reply_deadline(request: &CloudRequest, received: Instant, margin: Duration) -> Instant {
    let remaining_ms = request.deadline_unix_ms.saturating_sub(unix_ms_now());
    (received + Duration::from_millis(remaining_ms)).checked_sub(margin).unwrap_or(received)
}

async fn serve(shared: &Shared, request: &CloudRequest, received: Instant) -> CloudReply {
    let deadline = reply_deadline(request, received, shared.reply_margin);
    let error = |kind, message: String| ReplyResult::Error(CloudError { kind, message });
    let mut backend_latency = Duration::ZERO;
    let result = if request.expired(unix_ms_now()) || Instant::now() >= deadline {
        error(CloudErrorKind::DeadlineExceeded, "the request arrived after its deadline".into())
    } else {
        let deadline_tokio = tokio::time::Instant::from_std(deadline);
        match tokio::time::timeout_at(deadline_tokio, shared.slots.acquire()).await {
            Err(_) => error(CloudErrorKind::Overloaded, "no free slot before the deadline".into()),
            Ok(Err(_)) => error(CloudErrorKind::Overloaded, "the bridge is stopping".into()),
            Ok(Ok(_permit)) => {
                let started = Instant::now();
                let answered = tokio::time::timeout_at(
                    deadline_tokio,
                    shared.backend.answer(request, &shared.system_prompt, deadline),
                )
                .await;
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

//! The local HTTP API (axum): routes, JSON errors, server-sent events. The contract is in
//! the `tmod-api` crate.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use tmod_api::{AskRequest, AskResponse, ErrorBody, FeedbackRequest};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::dialogues::DialogueError;
use crate::service::{AskError, DecidedTurn, Service};
use tmod_api::{DecisionEvent, OutcomeEvent};

/// The router over a running service: tmod's own API, and OpenAI's chat completions
/// (`openai.rs`), whose bodies carry whole conversations (`max_chat_body_bytes`).
pub fn router(service: Arc<Service>, max_body_bytes: usize, max_chat_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/ask", post(ask))
        .route("/v1/dialogues", post(new_dialogue))
        .route("/v1/feedback", post(feedback))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(service.clone())
        .merge(crate::openai::router(service, max_chat_body_bytes))
}

/// The bearer token in `path` (surrounding whitespace trimmed), or `None` for an empty path.
pub fn read_token(path: &str) -> anyhow::Result<Option<Arc<str>>> {
    if path.trim().is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?;
    let token = text.trim();
    if token.len() < 16 {
        anyhow::bail!("{path} holds {} characters: a token needs at least 16", token.len());
    }
    Ok(Some(token.into()))
}

/// `router`, answering 401 to a request without `Authorization: Bearer <token>`.
pub fn require_bearer(router: Router, token: Arc<str>) -> Router {
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                let presented = request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
                    return next.run(request).await;
                }
                let mut response =
                    error(StatusCode::UNAUTHORIZED, "a bearer token is required on this listener".into());
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                response
            }
        },
    ))
}

/// Equality whose time does not depend on where the bytes differ (only on the lengths).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(ErrorBody { error: message })).into_response()
}

/// The HTTP status a refused request gets, on tmod's API and OpenAI's alike.
pub(crate) fn status_of(e: &AskError) -> StatusCode {
    match e {
        AskError::BadRequest(_) => StatusCode::BAD_REQUEST,
        AskError::Dialogue(DialogueError::Unknown(_) | DialogueError::UnknownTurn { .. }) => {
            StatusCode::NOT_FOUND
        }
        AskError::Dialogue(DialogueError::Busy(_)) => StatusCode::CONFLICT,
        AskError::Busy { .. } | AskError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        AskError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for AskError {
    fn into_response(self) -> Response {
        let mut response = error(status_of(&self), self.to_string());
        if let AskError::Busy { retry_after_secs } = self {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}

/// Parses a JSON body with a message that says what is wrong and where.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, AskError> {
    serde_json::from_slice(body).map_err(|e| AskError::BadRequest(format!("malformed JSON body: {e}")))
}

/// What a turn's task tells the handler that waits for it.
pub(crate) enum TurnEvent {
    Decided(DecisionEvent),
    Token(String),
    Finished(Result<OutcomeEvent, AskError>),
}

async fn ask(State(service): State<Arc<Service>>, body: Bytes) -> Result<Response, AskError> {
    let received = Instant::now();
    let request: AskRequest = parse(&body)?;
    let decode_ms = received.elapsed().as_secs_f64() * 1e3;
    let stream = request.stream;
    // Admission before any work: a burst beyond what can be decided at once is refused with
    // 503 and Retry-After, rather than piling up classifier work on the blocking pool.
    let admitted = service.admit_turn()?;
    let (decision, mut turn) = start_turn(service, request, received, decode_ms, admitted, None).await?;

    if !stream {
        while let Some(event) = turn.recv().await {
            if let Ok(TurnEvent::Finished(outcome)) = event {
                return Ok(axum::Json(AskResponse { decision, outcome: outcome? }).into_response());
            }
        }
        return Err(AskError::Internal("the turn ended without its outcome".into()));
    }

    let first = tokio_stream::once(Ok::<_, Infallible>(event("decision", &decision)));
    let rest = ReceiverStream::new(turn).filter_map(|e| match e {
        Ok(TurnEvent::Token(piece)) => Some(Ok(event("token", &piece))),
        Ok(TurnEvent::Finished(Ok(outcome))) => Some(Ok(event("outcome", &outcome))),
        Ok(TurnEvent::Finished(Err(e))) => Some(Ok(event("error", &ErrorBody { error: e.to_string() }))),
        Ok(TurnEvent::Decided(_)) | Err(_) => None,
    });
    Ok(Sse::new(first.chain(rest)).keep_alive(KeepAlive::default()).into_response())
}

/// The events of a turn after its decision.
pub(crate) type TurnEvents = tokio::sync::mpsc::Receiver<Result<TurnEvent, AskError>>;

/// Starts a turn in its own task ([`run_turn`]) and waits for its decision. Cancelling `stop`
/// ends the generation early (a stop sequence seen) while the turn is still finished and logged.
pub(crate) async fn start_turn(
    service: Arc<Service>,
    request: AskRequest,
    received: Instant,
    decode_ms: f64,
    admitted: tokio::sync::OwnedSemaphorePermit,
    stop: Option<CancellationToken>,
) -> Result<(DecisionEvent, TurnEvents), AskError> {
    let (events, mut turn) = tokio::sync::mpsc::channel::<Result<TurnEvent, AskError>>(64);
    let stop = stop.unwrap_or_default();
    tokio::spawn(run_turn(service, request, received, decode_ms, events, admitted, stop));
    match turn.recv().await {
        Some(Ok(TurnEvent::Decided(decision))) => Ok((decision, turn)),
        Some(Err(e)) => Err(e),
        _ => Err(AskError::Internal("the turn ended before its decision".into())),
    }
}

/// One turn from its decision to its log row, in its own task: a client that goes away (its
/// handler or event stream dropped, so `events` is closed) cancels the generation, never the
/// turn's accounting and logging, and the dialogue is free for its next turn.
async fn run_turn(
    service: Arc<Service>,
    request: AskRequest,
    received: Instant,
    decode_ms: f64,
    events: tokio::sync::mpsc::Sender<Result<TurnEvent, AskError>>,
    admitted: tokio::sync::OwnedSemaphorePermit,
    stop: CancellationToken,
) {
    let decide_service = service.clone();
    // Classification and scoring are CPU work of a few milliseconds: off the reactor.
    let decided = tokio::task::spawn_blocking(move || decide_service.decide(request, received, decode_ms))
        .await
        .map_err(|e| AskError::Internal(e.to_string()))
        .and_then(|d| d);
    drop(admitted);
    let DecidedTurn { decision, mut tokens, pending } = match decided {
        Ok(decided) => decided,
        Err(e) => {
            let _ = events.send(Err(e)).await;
            return;
        }
    };
    let mut listening = events.send(Ok(TurnEvent::Decided(decision.clone()))).await.is_ok();
    while listening {
        let piece = tokio::select! {
            piece = tokens.recv() => piece,
            () = stop.cancelled() => None,
        };
        let Some(piece) = piece else { break };
        listening = events.send(Ok(TurnEvent::Token(piece))).await.is_ok();
    }
    // Dropping the receiver cancels a generation nobody listens to any more.
    drop(tokens);
    let outcome = service.finish(&decision, pending).await;
    let _ = events.send(Ok(TurnEvent::Finished(outcome))).await;
}

/// A server-sent event with a JSON body.
fn event<T: serde::Serialize>(name: &str, body: &T) -> Event {
    let data = serde_json::to_string(body).unwrap_or_else(|e| format!("{{\"error\":\"serialising: {e}\"}}"));
    Event::default().event(name).data(data)
}

async fn new_dialogue(State(service): State<Arc<Service>>) -> Response {
    axum::Json(service.new_dialogue()).into_response()
}

async fn feedback(State(service): State<Arc<Service>>, body: Bytes) -> Result<Response, AskError> {
    let request: FeedbackRequest = parse(&body)?;
    let update = service.feedback(&request.dialogue_id, request.turn, request.score).await?;
    Ok(axum::Json(
        serde_json::json!({ "stored": matches!(update, outcome_log::ScoreUpdate::Updated { .. }) }),
    )
    .into_response())
}

async fn status(State(service): State<Arc<Service>>) -> Response {
    axum::Json(service.status().await).into_response()
}

async fn metrics(State(service): State<Arc<Service>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        service.metrics.encode(),
    )
        .into_response()
}

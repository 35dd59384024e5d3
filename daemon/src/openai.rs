//! OpenAI's Chat Completions on tmod's API, so that apps and SDKs written for OpenAI switch to
//! the device by changing a base URL: `POST /v1/chat/completions` (plain, or streamed as
//! `data:` chunks ending with `data: [DONE]`) and `GET /v1/models`, in OpenAI's shapes and
//! error objects. A completion is one turn of a device dialogue, run as `/v1/ask` runs it
//! (`api::start_turn`): the policy decides (model `tmo`; `tmo-local` and `tmo-cloud` force the
//! route, logged as forced), the answer streams, the turn is logged.
//!
//! Stateless clients resend the whole conversation every turn. A request continues the dialogue
//! whose conversation (every message up to and including tmod's last answer, exactly as sent)
//! it extends; otherwise it starts a new one, with its system messages as the dialogue's system
//! prompt. `dialogue_id` in the body (or the `x-tmo-dialogue-id` header) names the dialogue
//! instead. Every response and chunk carries what happened in a `tmo` object and `x-tmo-*`
//! headers; `model` names the model that answered.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tmod_api::{AskRequest, DecisionEvent, ForcedRoute, Generation, OutcomeEvent};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::api::{TurnEvent, TurnEvents, start_turn};
use crate::dialogues::DialogueError;
use crate::service::{AskError, Service};
use crate::util::{lock, unix_ms_now};

/// The model ids apps ask for: `tmo` (the device's policy decides where each turn is answered),
/// `tmo-local` and `tmo-cloud` (the app forces the route; such turns are logged as forced).
pub const MODELS: [(&str, Option<ForcedRoute>); 3] =
    [("tmo", None), ("tmo-local", Some(ForcedRoute::Local)), ("tmo-cloud", Some(ForcedRoute::Cloud))];
/// Conversations remembered for mapping resent conversations to dialogues.
const CONVERSATIONS_KEPT: usize = 4096;
/// OpenAI's limit on stop sequences.
const MAX_STOP_SEQUENCES: usize = 4;

struct ChatState {
    service: Arc<Service>,
    conversations: Mutex<ConversationIndex>,
}

/// The routes, with their own body limit (conversations and data-URL images are large).
pub fn router(service: Arc<Service>, max_body_bytes: usize) -> Router {
    let state = Arc::new(ChatState { service, conversations: Mutex::new(ConversationIndex::default()) });
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// An error as OpenAI returns them: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
            retry_after_secs: None,
        }
    }

    fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

impl From<AskError> for ApiError {
    fn from(e: AskError) -> Self {
        let message = e.to_string();
        let status = crate::api::status_of(&e);
        let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
        let code = match &e {
            AskError::Dialogue(DialogueError::Unknown(_) | DialogueError::UnknownTurn { .. }) => {
                Some("dialogue_not_found")
            }
            AskError::Dialogue(DialogueError::Busy(_)) => Some("dialogue_busy"),
            AskError::Busy { .. } => Some("overloaded"),
            AskError::Unavailable(_) => Some("route_unavailable"),
            AskError::BadRequest(_) | AskError::Internal(_) => None,
        };
        let retry_after_secs = match e {
            AskError::Busy { retry_after_secs } => Some(retry_after_secs),
            _ => None,
        };
        Self { status, message, kind, param: None, code, retry_after_secs }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

async fn models() -> Response {
    axum::Json(json!({
        "object": "list",
        "data": MODELS
            .iter()
            .map(|(id, _)| json!({ "id": id, "object": "model", "created": 0, "owned_by": "tmo-edge" }))
            .collect::<Vec<_>>(),
    }))
    .into_response()
}

/// The request, as OpenAI defines it; members tmod does not use are ignored.
#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    stop: Option<Stop>,
    seed: Option<i64>,
    n: Option<u32>,
    // Clients send `null` for what they leave unset, as OpenAI accepts.
    tools: Option<Vec<Value>>,
    logprobs: Option<bool>,
    response_format: Option<Value>,
    /// tmo: continue this dialogue.
    dialogue_id: Option<String>,
    /// tmo: the task category, when the app knows it.
    task: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    image_url: Option<ImageUrl>,
}

#[derive(Debug, Clone, Deserialize)]
struct ImageUrl {
    url: String,
}

impl Message {
    /// The message as (kind, value) items: its text pieces and image URLs, the same whether
    /// the content came as a string or as parts.
    fn items(&self) -> Vec<(&'static str, &str)> {
        match &self.content {
            None => Vec::new(),
            Some(Content::Text(text)) => vec![("text", text.as_str())],
            Some(Content::Parts(parts)) => parts
                .iter()
                .filter_map(|p| match (p.kind.as_str(), &p.text, &p.image_url) {
                    ("text", Some(text), _) => Some(("text", text.as_str())),
                    ("image_url", _, Some(image)) => Some(("image", image.url.as_str())),
                    _ => None,
                })
                .collect(),
        }
    }

    fn text(&self) -> String {
        self.items()
            .iter()
            .filter(|(kind, _)| *kind == "text")
            .map(|(_, t)| *t)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// What a valid request asks of the device.
struct Chat {
    stream: bool,
    include_usage: bool,
    route: Option<ForcedRoute>,
    question: String,
    /// Images of the question: data URLs go with a cloud request, other URLs never (the
    /// device does not fetch them).
    images: usize,
    image_data_urls: Vec<String>,
    system_prompt: Option<String>,
    generation: Generation,
    stops: Vec<String>,
    dialogue_id: Option<String>,
    task: Option<String>,
    messages: Vec<Message>,
}

fn check(request: ChatRequest, headers: &HeaderMap) -> Result<Chat, ApiError> {
    let Some((_, route)) = MODELS.iter().find(|(id, _)| *id == request.model) else {
        let served: Vec<&str> = MODELS.iter().map(|(id, _)| *id).collect();
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..ApiError::invalid(
                Some("model"),
                format!(
                    "The model `{}` does not exist; this device serves {}",
                    request.model,
                    served.join(", ")
                ),
            )
        });
    };
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(Some("n"), "this device makes one choice per request: `n` must be 1"));
    }
    if request.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid(Some("tools"), "tools are not supported by this device"));
    }
    if request.logprobs == Some(true) {
        return Err(ApiError::invalid(Some("logprobs"), "logprobs are not supported by this device"));
    }
    if let Some(format) = &request.response_format
        && format.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(ApiError::invalid(Some("response_format"), "only `{\"type\": \"text\"}` is supported"));
    }
    let Some(last) = request.messages.last() else {
        return Err(ApiError::invalid(Some("messages"), "[] is too short - 'messages'"));
    };
    for message in &request.messages {
        if !matches!(message.role.as_str(), "system" | "developer" | "user" | "assistant") {
            return Err(ApiError::invalid(
                Some("messages"),
                format!("messages with role `{}` are not supported by this device", message.role),
            ));
        }
    }
    if last.role != "user" {
        return Err(ApiError::invalid(
            Some("messages"),
            "the last message must be the user's (the question to answer)",
        ));
    }
    let question = last.text();
    if question.trim().is_empty() {
        return Err(ApiError::invalid(Some("messages"), "the last message has no text"));
    }
    let image_urls: Vec<&str> =
        last.items().iter().filter(|(kind, _)| *kind == "image").map(|(_, url)| *url).collect();
    let images = image_urls.len();
    let image_data_urls = image_urls
        .iter()
        .filter(|u| u.starts_with("data:image/jpeg;base64,"))
        .map(|u| (*u).to_owned())
        .collect();
    // System (and developer) messages before the first user message are the system prompt.
    let leading: Vec<String> = request
        .messages
        .iter()
        .take_while(|m| matches!(m.role.as_str(), "system" | "developer"))
        .map(Message::text)
        .collect();
    let system_prompt = (!leading.is_empty()).then(|| leading.join("\n"));
    let stops = match request.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(many)) => many,
    };
    if stops.len() > MAX_STOP_SEQUENCES || stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(Some("stop"), "up to 4 stop sequences, none empty"));
    }
    let generation = Generation {
        max_tokens: request.max_completion_tokens.or(request.max_tokens),
        temperature: request.temperature,
        top_p: request.top_p,
        seed: request.seed.map(|s| s as u64),
    };
    if let Err((field, why)) = generation.check() {
        let param = match field {
            "max_tokens" => "max_tokens",
            "temperature" => "temperature",
            _ => "top_p",
        };
        return Err(ApiError::invalid(Some(param), format!("`{param}` {why}")));
    }
    let header_dialogue = headers.get("x-tmo-dialogue-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    Ok(Chat {
        stream: request.stream.unwrap_or(false),
        include_usage: request.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        route: *route,
        question,
        images,
        image_data_urls,
        system_prompt,
        generation,
        stops,
        dialogue_id: request.dialogue_id.or(header_dialogue),
        task: request.task,
        messages: request.messages,
    })
}

/// Conversations tmod answered, by a hash of their messages, to the dialogue they belong to.
#[derive(Debug, Default)]
struct ConversationIndex {
    hasher: RandomState,
    dialogues: HashMap<u64, String>,
    order: VecDeque<u64>,
}

impl ConversationIndex {
    fn key<'m>(&self, messages: impl IntoIterator<Item = (&'m str, Vec<(&'static str, &'m str)>)>) -> u64 {
        let mut h = self.hasher.build_hasher();
        for (role, items) in messages {
            role.hash(&mut h);
            items.hash(&mut h);
        }
        h.finish()
    }

    fn of_messages(&self, messages: &[Message]) -> u64 {
        self.key(messages.iter().map(|m| (m.role.as_str(), m.items())))
    }

    /// The conversation `messages`, then tmod's `answer`.
    fn with_answer(&self, messages: &[Message], answer: &str) -> u64 {
        self.key(
            messages
                .iter()
                .map(|m| (m.role.as_str(), m.items()))
                .chain([("assistant", vec![("text", answer)])]),
        )
    }

    fn remember(&mut self, key: u64, dialogue_id: String) {
        if self.dialogues.insert(key, dialogue_id).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > CONVERSATIONS_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.dialogues.remove(&old);
            }
        }
    }
}

async fn chat_completions(
    State(state): State<Arc<ChatState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let request: ChatRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(None, format!("We could not parse the JSON body of your request: {e}"))
    })?;
    let decode_ms = received.elapsed().as_secs_f64() * 1e3;
    let chat = check(request, &headers)?;
    let service = state.service.clone();
    let admitted = service.admit_turn()?;

    // The dialogue: named, or the one whose conversation this request extends, or a new one.
    let earlier = &chat.messages[..chat.messages.len() - 1];
    let continues = earlier.iter().any(|m| matches!(m.role.as_str(), "user" | "assistant"));
    let dialogue_id = match chat.dialogue_id.clone() {
        Some(id) => Some(id),
        None if continues => {
            let conversations = lock(&state.conversations);
            conversations.dialogues.get(&conversations.of_messages(earlier)).cloned()
        }
        None => None,
    };
    let system_prompt = if dialogue_id.is_none() { chat.system_prompt.clone() } else { None };
    let ask = AskRequest {
        dialogue_id,
        text: chat.question.clone(),
        task: chat.task.clone(),
        stream: chat.stream,
        system_prompt,
        generation: chat.generation.clone(),
        route: chat.route,
        images: chat.image_data_urls.clone(),
    };
    let stop = CancellationToken::new();
    let (decision, turn) =
        start_turn(service.clone(), ask, received, decode_ms, admitted, Some(stop.clone())).await?;
    let reply = Reply {
        id: format!("chatcmpl-{}-{}", decision.dialogue_id, decision.turn),
        created: unix_ms_now() / 1000,
        local_model: service.local_model_name(),
        images_left_out: chat.images.saturating_sub(decision.app_images_sent as usize),
        decision,
    };
    let headers = reply.headers();
    let mut response = if chat.stream {
        stream(reply, chat, turn, stop, state)
    } else {
        whole(reply, chat, turn, stop, &state).await?.into_response()
    };
    response.headers_mut().extend(headers);
    Ok(response)
}

/// What every response and chunk of one completion shares.
struct Reply {
    id: String,
    created: u64,
    local_model: String,
    images_left_out: usize,
    decision: DecisionEvent,
}

impl Reply {
    fn headers(&self) -> HeaderMap {
        let d = &self.decision;
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-tmo-route", d.route.clone()),
            ("x-tmo-action", d.action.clone()),
            ("x-tmo-dialogue-id", d.dialogue_id.clone()),
            ("x-tmo-turn", d.turn.to_string()),
            ("x-tmo-propensity", d.propensity.to_string()),
            ("x-tmo-policy-version", d.policy_version.clone()),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        headers
    }

    /// The model expected to answer (before the outcome), or the one that did.
    fn model(&self, outcome: Option<&OutcomeEvent>) -> String {
        let route = outcome.map_or(self.decision.route.as_str(), |o| o.route.as_str());
        if route == "cloud" {
            let cloud_model = outcome.and_then(|o| o.cloud_attempt.as_ref()).and_then(|a| a.get("model"));
            return cloud_model.and_then(Value::as_str).unwrap_or("tmo-cloud").to_owned();
        }
        self.local_model.clone()
    }

    /// The `tmo` object: the decision, and with the outcome what the turn cost.
    fn tmo(&self, outcome: Option<&OutcomeEvent>) -> Value {
        let d = &self.decision;
        let route = outcome.map_or(d.route.as_str(), |o| o.route.as_str());
        let mut tmo = json!({
            "dialogue_id": d.dialogue_id,
            "turn": d.turn,
            "task": d.task,
            "route": route,
            "action": d.action,
            "action_index": d.action_index,
            "modalities": d.modalities,
            "propensity": d.propensity,
            "forced": d.forced,
            "policy_version": d.policy_version,
            "images_left_out": self.images_left_out,
        });
        if let Some(o) = outcome {
            tmo["latency_secs"] = json!(o.latency_secs);
            tmo["energy_j"] = json!(o.energy_j);
            tmo["cost_usd"] = json!(o.cost_usd);
            tmo["budget_left"] = json!(o.budget_left);
            tmo["finish"] = json!(o.finish);
            tmo["timings"] = json!(o.timings);
        }
        tmo
    }

    fn usage(outcome: &OutcomeEvent) -> Value {
        json!({
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.generated_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.generated_tokens,
        })
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>, outcome: Option<&OutcomeEvent>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model(outcome),
            "system_fingerprint": null,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason }],
            "tmo": self.tmo(outcome),
        })
    }
}

/// OpenAI's reason for the end: `length` when the answer was cut short, else `stop`.
fn finish_reason(outcome: &OutcomeEvent, stopped: bool) -> &'static str {
    match outcome.finish.as_str() {
        "max_tokens" | "context_full" | "deadline" | "cloud_partial" if !stopped => "length",
        _ => "stop",
    }
}

/// Passes the answer's text on until a stop sequence, holding back what could begin one.
struct StopScanner {
    stops: Vec<String>,
    held: String,
    hit: bool,
}

impl StopScanner {
    fn new(stops: Vec<String>) -> Self {
        Self { stops, held: String::new(), hit: false }
    }

    /// The text that can be shown now.
    fn push(&mut self, piece: &str) -> String {
        if self.hit {
            return String::new();
        }
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.hit = true;
            self.held.truncate(at);
            return std::mem::take(&mut self.held);
        }
        // Keep the longest tail that is a prefix of a stop sequence.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|n| s.is_char_boundary(*n)).map(move |n| &s[..n]))
            .filter(|prefix| self.held.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let shown = self.held[..cut].to_owned();
        self.held.drain(..cut);
        shown
    }

    /// What was held back, once the answer is over.
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The next thing a turn has for the client.
enum Next {
    /// Text to show.
    Text(String),
    /// The end: the text held back until then, and the outcome.
    Done(String, Box<Result<OutcomeEvent, AskError>>),
}

/// Reads the turn until it has text to show (cut at a stop sequence) or has ended.
async fn next(turn: &mut TurnEvents, scanner: &mut StopScanner, stop: &CancellationToken) -> Next {
    while let Some(event) = turn.recv().await {
        match event {
            Ok(TurnEvent::Token(piece)) => {
                let shown = scanner.push(&piece);
                if scanner.hit {
                    stop.cancel();
                }
                if !shown.is_empty() {
                    return Next::Text(shown);
                }
            }
            Ok(TurnEvent::Finished(outcome)) => return Next::Done(scanner.finish(), Box::new(outcome)),
            Ok(TurnEvent::Decided(_)) => {}
            Err(e) => return Next::Done(String::new(), Box::new(Err(e))),
        }
    }
    Next::Done(String::new(), Box::new(Err(AskError::Internal("the turn ended without its outcome".into()))))
}

async fn whole(
    reply: Reply,
    chat: Chat,
    mut turn: TurnEvents,
    stop: CancellationToken,
    state: &ChatState,
) -> Result<axum::Json<Value>, ApiError> {
    let mut scanner = StopScanner::new(chat.stops);
    let mut text = String::new();
    let outcome = loop {
        match next(&mut turn, &mut scanner, &stop).await {
            Next::Text(piece) => text.push_str(&piece),
            Next::Done(rest, outcome) => {
                text.push_str(&rest);
                break (*outcome)?;
            }
        }
    };
    remember(state, &chat.messages, &text, &reply.decision.dialogue_id);
    Ok(axum::Json(json!({
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model(Some(&outcome)),
        "system_fingerprint": null,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text, "refusal": null },
            "logprobs": null,
            "finish_reason": finish_reason(&outcome, scanner.hit),
        }],
        "usage": Reply::usage(&outcome),
        "tmo": reply.tmo(Some(&outcome)),
    })))
}

fn remember(state: &ChatState, messages: &[Message], answer: &str, dialogue_id: &str) {
    let mut conversations = lock(&state.conversations);
    let key = conversations.with_answer(messages, answer);
    conversations.remember(key, dialogue_id.to_owned());
}

fn stream(
    reply: Reply,
    chat: Chat,
    mut turn: TurnEvents,
    stop: CancellationToken,
    state: Arc<ChatState>,
) -> Response {
    let (chunks, body) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let data = |value: &Value| Ok(Event::default().data(value.to_string()));
        let first = reply.chunk(json!({ "role": "assistant", "content": "" }), None, None);
        if chunks.send(data(&first)).await.is_err() {
            return; // gone: dropping `turn` cancels the generation; the turn is still logged
        }
        let mut scanner = StopScanner::new(chat.stops);
        let mut text = String::new();
        let outcome = loop {
            let (piece, end) = match next(&mut turn, &mut scanner, &stop).await {
                Next::Text(piece) => (piece, None),
                Next::Done(rest, outcome) => (rest, Some(*outcome)),
            };
            if !piece.is_empty() {
                let chunk = reply.chunk(json!({ "content": piece }), None, None);
                text.push_str(&piece);
                if chunks.send(data(&chunk)).await.is_err() {
                    return; // gone: dropping `turn` cancels the generation; the turn is still logged
                }
            }
            if let Some(outcome) = end {
                break outcome;
            }
        };
        match outcome {
            Ok(outcome) => {
                remember(&state, &chat.messages, &text, &reply.decision.dialogue_id);
                let last = reply.chunk(json!({}), Some(finish_reason(&outcome, scanner.hit)), Some(&outcome));
                let _ = chunks.send(data(&last)).await;
                if chat.include_usage {
                    let mut usage = reply.chunk(json!({}), None, Some(&outcome));
                    usage["choices"] = json!([]);
                    usage["usage"] = Reply::usage(&outcome);
                    let _ = chunks.send(data(&usage)).await;
                }
            }
            Err(e) => {
                let _ = chunks.send(data(&ApiError::from(e).body())).await;
            }
        }
        let _ = chunks.send(Ok(Event::default().data("[DONE]"))).await;
    });
    let body: ReceiverStream<Result<Event, std::convert::Infallible>> = ReceiverStream::new(body);
    Sse::new(body).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut scanner = StopScanner::new(stops.iter().map(|s| (*s).to_owned()).collect());
        let mut text: String = pieces.iter().map(|p| scanner.push(p)).collect();
        text.push_str(&scanner.finish());
        (text, scanner.hit)
    }

    #[test]
    fn stop_sequences_cut_the_answer_even_across_pieces() {
        assert_eq!(shown(&[], &["Boil ", "nine ", "minutes."]), ("Boil nine minutes.".into(), false));
        assert_eq!(shown(&["\n\n"], &["Boil.", "\n", "\nThen"]), ("Boil.".into(), true));
        assert_eq!(shown(&["END", "ENOUGH"], &["a E", "N", "OUGH b"]), ("a ".into(), true));
        // A held-back prefix that turns out not to be a stop is shown after all.
        assert_eq!(shown(&["STOP"], &["ST", "ILL going"]), ("STILL going".into(), false));
        assert_eq!(shown(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
    }

    fn message(role: &str, content: Value) -> Message {
        serde_json::from_value(json!({ "role": role, "content": content })).unwrap()
    }

    #[test]
    fn members_left_unset_as_null_are_taken_as_absent() {
        let body = json!({
            "model": "tmo", "messages": [{ "role": "user", "content": "Hi" }],
            "stream": null, "stream_options": { "include_usage": null }, "tools": null, "logprobs": null,
            "max_tokens": null, "temperature": null, "top_p": null, "stop": null, "seed": null, "n": null,
            "response_format": null, "user": "kitchen-app",
        });
        let request: ChatRequest = serde_json::from_value(body).expect("parses");
        let chat = check(request, &HeaderMap::new()).expect("valid");
        assert!(!chat.stream && !chat.include_usage && chat.stops.is_empty());
        assert!(chat.generation.is_default());
    }

    #[test]
    fn a_resent_conversation_matches_whatever_shape_its_text_comes_in() {
        let index = ConversationIndex::default();
        let asked = vec![message("system", json!("Be brief.")), message("user", json!("Eggs?"))];
        let answered = index.with_answer(&asked, "Nine minutes.");
        let resent = vec![
            message("system", json!([{ "type": "text", "text": "Be brief." }])),
            message("user", json!("Eggs?")),
            message("assistant", json!("Nine minutes.")),
        ];
        assert_eq!(index.of_messages(&resent), answered);
        let edited = vec![resent[0].clone(), resent[1].clone(), message("assistant", json!("Ten minutes."))];
        assert_ne!(index.of_messages(&edited), answered);
    }
}

//! The OpenAI-compatible chat-completions backend (`POST {base_url}/v1/chat/completions`).
//!
//! Images go as `image_url` parts with `data:image/jpeg;base64,...` URLs, audio as
//! `input_audio` parts (`format: "wav"`) when the model takes audio. HTTP 429 and 5xx (and
//! connection failures) are retried with exponential backoff, honouring `Retry-After`
//! (seconds), as long as the deadline allows and no text of the answer has been passed on yet.
//!
//! A request whose answer streams asks for `stream: true` (with `stream_options.include_usage`)
//! and reads the server-sent events as they come; a server that answers with a whole JSON
//! completion instead is read as one piece.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use eventsource_stream::Eventsource as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{Value, json};
use tmo_protocol::{CloudRequest, MediaType};
use tokio_stream::StreamExt as _;
use tracing::{debug, info, warn};

use crate::backend::{BackendAnswer, BackendError, Pieces, count_media, describe_attachments};
use crate::config::OpenAiConfig;

/// Largest response body read.
const MAX_RESPONSE_BYTES: usize = 8 << 20;

/// The backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OpenAiSetupError {
    /// The base URL is not usable.
    #[error("backend.base_url {0:?} is not a valid http(s) URL")]
    BaseUrl(String),
    /// The API key variable is not set.
    #[error("backend.api_key_env: environment variable {0} is not set")]
    MissingKey(String),
    /// The key holds characters a header cannot.
    #[error("backend.api_key_env: the key in {0} is not a valid header value")]
    BadKey(String),
    /// TLS roots could not be loaded.
    #[error("TLS roots: {0}")]
    Tls(String),
}

/// An OpenAI-compatible endpoint with a pooled HTTP/1.1 client (rustls for https).
pub struct OpenAiBackend {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: Uri,
    authorization: Option<HeaderValue>,
    config: OpenAiConfig,
}

impl std::fmt::Debug for OpenAiBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiBackend")
            .field("endpoint", &self.endpoint)
            .field("model", &self.config.model)
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn tls_config(config: &OpenAiConfig) -> Result<rustls::ClientConfig, OpenAiSetupError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| OpenAiSetupError::Tls(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| OpenAiSetupError::Tls(format!("backend.ca_file {}: {e}", path.display())))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| OpenAiSetupError::Tls(format!("{}: {e}", path.display())))?;
                roots.add(cert).map_err(|e| OpenAiSetupError::Tls(format!("{}: {e}", path.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                warn!(%error, "system certificate not loaded");
            }
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            debug!(added, "system TLS roots");
        }
    }
    if roots.is_empty() && config.base_url.starts_with("https") {
        return Err(OpenAiSetupError::Tls("no trusted CA certificate (install ca-certificates)".into()));
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

impl OpenAiBackend {
    /// Builds the client; reads the API key from the environment.
    pub fn new(config: &OpenAiConfig) -> Result<Self, OpenAiSetupError> {
        let base = config.base_url.trim_end_matches('/');
        let endpoint: Uri = format!("{base}/v1/chat/completions")
            .parse()
            .map_err(|_| OpenAiSetupError::BaseUrl(config.base_url.clone()))?;
        let authorization = match &config.api_key_env {
            Some(var) => {
                let key = std::env::var(var)
                    .ok()
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| OpenAiSetupError::MissingKey(var.clone()))?;
                let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| OpenAiSetupError::BadKey(var.clone()))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        // Small writes go out at once (no Nagle wait for the previous one's ACK).
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(config)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(Self { client, endpoint, authorization, config: config.clone() })
    }

    /// The configured model.
    pub fn model(&self) -> &str {
        &self.config.model
    }

    /// The JSON request body for `request`, and the number of images in it (`stream` asks for
    /// server-sent events).
    pub fn request_body(&self, request: &CloudRequest, system_prompt: &str, stream: bool) -> (Value, u32) {
        build_request_body(&self.config, request, system_prompt, stream)
    }

    /// Answers `request`, retrying within `deadline` until text has been passed to `pieces`.
    pub async fn answer(
        &self,
        request: &CloudRequest,
        system_prompt: &str,
        deadline: Instant,
        pieces: Option<&Pieces>,
    ) -> Result<BackendAnswer, BackendError> {
        let (body, images_sent) = self.request_body(request, system_prompt, pieces.is_some());
        let body =
            Bytes::from(serde_json::to_vec(&body).map_err(|e| BackendError::BadRequest(e.to_string()))?);
        let deadline_tokio = tokio::time::Instant::from_std(deadline);
        let mut attempts = 0u32;
        let mut last_failure: Option<String>;
        let mut passed_on = false;
        loop {
            attempts += 1;
            let outcome =
                tokio::time::timeout_at(deadline_tokio, self.attempt(body.clone(), pieces, &mut passed_on))
                    .await;
            let retry = match outcome {
                Err(_) => return Err(BackendError::Deadline { attempts, last: None }),
                Ok(Attempt::Done(mut answer)) => {
                    answer.images_sent = images_sent;
                    answer.attempts = attempts;
                    return Ok(answer);
                }
                Ok(Attempt::Fatal(error)) => return Err(error),
                Ok(Attempt::Retry(retry)) => retry,
            };
            last_failure = Some(retry.describe());
            let give_up = |attempts| match &retry.kind {
                RetryKind::RateLimited => BackendError::RateLimited { attempts },
                RetryKind::Server(detail) | RetryKind::Connection(detail) => {
                    BackendError::Unavailable { attempts, detail: detail.clone() }
                }
            };
            if attempts > self.config.max_retries || passed_on {
                // Text already shown cannot be taken back: a stream broken midway is not retried.
                return Err(give_up(attempts));
            }
            let backoff = backoff_delay(
                attempts,
                Duration::from_millis(self.config.initial_backoff_ms),
                Duration::from_millis(self.config.max_backoff_ms),
            );
            let wait = retry.retry_after.unwrap_or(backoff);
            if Instant::now() + wait >= deadline {
                // Waiting would run past the deadline: the device gets the real reason now.
                info!(attempts, wait_ms = wait.as_millis() as u64, "no time left to retry");
                return Err(give_up(attempts));
            }
            warn!(attempts, wait_ms = wait.as_millis() as u64, failure = ?last_failure, "retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// One HTTP request; `passed_on` becomes true once text has gone to `pieces`.
    async fn attempt(&self, body: Bytes, pieces: Option<&Pieces>, passed_on: &mut bool) -> Attempt {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(self.endpoint.clone())
            .header(CONTENT_TYPE, "application/json");
        if let Some(auth) = &self.authorization {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        let http_request = match builder.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => return Attempt::Fatal(BackendError::BadRequest(e.to_string())),
        };
        let response = match self.client.request(http_request).await {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retry(Retry {
                    kind: RetryKind::Connection(format!("{e:#}")),
                    retry_after: None,
                });
            }
        };
        let status = response.status();
        let retry_after = response.headers().get(RETRY_AFTER).and_then(parse_retry_after);
        let event_stream = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if status.is_success() && event_stream {
            return read_events(response.into_body(), pieces, passed_on).await;
        }
        let bytes = match Limited::new(response.into_body(), MAX_RESPONSE_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return Attempt::Retry(Retry {
                    kind: RetryKind::Connection(format!("reading the response: {e}")),
                    retry_after: None,
                });
            }
        };
        let attempt = classify(status, retry_after, bytes);
        if let (Attempt::Done(answer), Some(pieces)) = (&attempt, pieces) {
            // A server that does not stream: its whole answer is the one piece.
            *passed_on = true;
            let _ = pieces.send(answer.text.clone());
        }
        attempt
    }
}

/// Reads a streamed chat completion: each delta's text goes to `pieces` as it arrives; usage
/// and model from the chunks that carry them.
async fn read_events(body: hyper::body::Incoming, pieces: Option<&Pieces>, passed_on: &mut bool) -> Attempt {
    let mut events = body.into_data_stream().eventsource();
    let mut answer = BackendAnswer {
        text: String::new(),
        model: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        images_sent: 0,
        attempts: 1,
    };
    let mut usage = false;
    let mut deltas = 0u32;
    let broken =
        |detail: String| Attempt::Retry(Retry { kind: RetryKind::Connection(detail), retry_after: None });
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => return broken(format!("reading the event stream: {e}")),
        };
        if event.data.trim() == "[DONE]" {
            break;
        }
        let chunk: StreamChunk = match serde_json::from_str(&event.data) {
            Ok(chunk) => chunk,
            Err(e) => return Attempt::Fatal(BackendError::Malformed(format!("stream chunk: {e}"))),
        };
        if let Some(error) = chunk.error {
            // A server that fails after the stream began says so in the stream.
            return Attempt::Retry(Retry {
                kind: RetryKind::Server(format!("error in the stream: {error}")),
                retry_after: None,
            });
        }
        if let Some(model) = chunk.model.filter(|m| !m.is_empty()) {
            answer.model = model;
        }
        if let Some(u) = chunk.usage {
            (answer.prompt_tokens, answer.completion_tokens, usage) =
                (u.prompt_tokens, u.completion_tokens, true);
        }
        let text = chunk.choices.into_iter().next().and_then(|c| c.delta.content).unwrap_or_default();
        if text.is_empty() {
            continue;
        }
        if answer.text.len() + text.len() > MAX_RESPONSE_BYTES {
            return Attempt::Fatal(BackendError::Malformed(format!(
                "streamed answer longer than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        deltas += 1;
        answer.text.push_str(&text);
        if let Some(pieces) = pieces {
            *passed_on = true;
            let _ = pieces.send(text);
        }
    }
    if !usage {
        warn!(deltas, "streamed completion without usage: completion tokens counted as its deltas");
        answer.completion_tokens = deltas;
    }
    Attempt::Done(answer)
}

fn classify(status: StatusCode, retry_after: Option<Duration>, body: Bytes) -> Attempt {
    let snippet = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    if status.is_success() {
        match parse_completion(&body) {
            Ok(answer) => Attempt::Done(answer),
            Err(error) => Attempt::Fatal(error),
        }
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        Attempt::Retry(Retry { kind: RetryKind::RateLimited, retry_after })
    } else if status.is_server_error() && refuses_a_capability(&body) {
        // llama.cpp's server answers 500 "image input is not supported" to a text-only model's
        // images: asking again cannot succeed.
        Attempt::Fatal(BackendError::Refused { status: status.as_u16(), body: snippet() })
    } else if status.is_server_error() {
        Attempt::Retry(Retry {
            kind: RetryKind::Server(format!("HTTP {status}: {}", snippet())),
            retry_after,
        })
    } else {
        Attempt::Fatal(BackendError::Refused { status: status.as_u16(), body: snippet() })
    }
}

/// Whether an error body says the model cannot take what was sent (images, audio).
fn refuses_a_capability(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]).to_ascii_lowercase();
    ["not supported", "unsupported", "does not support"].iter().any(|m| text.contains(m))
        && ["image", "audio", "multimodal", "modality"].iter().any(|m| text.contains(m))
}

enum Attempt {
    Done(BackendAnswer),
    Retry(Retry),
    Fatal(BackendError),
}

enum RetryKind {
    RateLimited,
    Server(String),
    Connection(String),
}

struct Retry {
    kind: RetryKind,
    retry_after: Option<Duration>,
}

impl Retry {
    fn describe(&self) -> String {
        match &self.kind {
            RetryKind::RateLimited => "HTTP 429".into(),
            RetryKind::Server(d) | RetryKind::Connection(d) => d.clone(),
        }
    }
}

/// `initial * 2^(attempt-1)`, at most `max`.
pub fn backoff_delay(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(max)
}

/// `Retry-After` as delay-seconds (an HTTP date is not honoured: the backoff applies).
pub fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    let secs: f64 = text.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

/// One `data:` event of a streamed completion.
#[derive(Deserialize)]
struct StreamChunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<StreamChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: Delta,
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// Reads a chat-completion response body.
pub fn parse_completion(body: &[u8]) -> Result<BackendAnswer, BackendError> {
    let completion: Completion =
        serde_json::from_slice(body).map_err(|e| BackendError::Malformed(e.to_string()))?;
    let choice =
        completion.choices.into_iter().next().ok_or_else(|| BackendError::Malformed("no choices".into()))?;
    let text =
        choice.message.content.ok_or_else(|| BackendError::Malformed("choice without content".into()))?;
    let (prompt_tokens, completion_tokens) = match completion.usage {
        Some(u) => (u.prompt_tokens, u.completion_tokens),
        None => {
            warn!("chat completion without usage: tokens counted as 0");
            (0, 0)
        }
    };
    Ok(BackendAnswer {
        text,
        model: completion.model.unwrap_or_default(),
        prompt_tokens,
        completion_tokens,
        images_sent: 0,
        attempts: 1,
    })
}

fn build_request_body(
    config: &OpenAiConfig,
    request: &CloudRequest,
    system_prompt: &str,
    stream: bool,
) -> (Value, u32) {
    let mut messages = vec![json!({"role": "system", "content": system_prompt})];
    for turn in &request.history {
        messages.push(json!({"role": "user", "content": turn.question}));
        messages.push(json!({"role": "assistant", "content": turn.answer}));
    }
    let (images, audio) = count_media(request);
    let mut text = request.question.clone();
    let described = describe_attachments(
        if config.accepts_images { 0 } else { images },
        if config.accepts_audio { 0 } else { audio },
    );
    if let Some(d) = described {
        text.push_str("\n\n");
        text.push_str(&d);
        if !config.accepts_audio && audio > 0 {
            text.push_str(" (not sent: this model takes no audio)");
            info!(audio, model = %config.model, "audio dropped: the model takes no audio");
        }
    }
    let mut parts = vec![json!({"type": "text", "text": text})];
    let mut images_sent = 0;
    for attachment in &request.attachments {
        match attachment.media_type {
            MediaType::ImageJpeg if config.accepts_images => {
                images_sent += 1;
                let url = format!(
                    "data:{};base64,{}",
                    attachment.media_type.mime(),
                    BASE64.encode(&attachment.data)
                );
                parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            MediaType::AudioWav if config.accepts_audio => {
                parts.push(json!({
                    "type": "input_audio",
                    "input_audio": {"data": BASE64.encode(&attachment.data), "format": "wav"}
                }));
            }
            _ => {}
        }
    }
    let content = if parts.len() == 1 { json!(text) } else { Value::Array(parts) };
    messages.push(json!({"role": "user", "content": content}));
    let mut body = json!({
        "model": config.model,
        "messages": messages,
        "max_tokens": request.max_tokens,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if let Some(t) = config.temperature {
        body["temperature"] = json!(t);
    }
    (body, images_sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tmo_protocol::{Attachment, DeviceId, HistoryTurn, RequestId};

    #[test]
    fn a_server_error_that_refuses_a_capability_is_not_retried() {
        let status = StatusCode::INTERNAL_SERVER_ERROR;
        let body = |text: &str| Bytes::from(text.to_owned());
        let llama = r#"{"error":{"code":500,"message":"image input is not supported - hint: if this is unexpected, you may need to provide the mmproj","type":"server_error"}}"#;
        assert!(matches!(
            classify(status, None, body(llama)),
            Attempt::Fatal(BackendError::Refused { status: 500, .. })
        ));
        assert!(matches!(classify(status, None, body("boom")), Attempt::Retry(_)));
        assert!(matches!(classify(status, None, body("feature not supported yet")), Attempt::Retry(_)));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, None, body("audio input is unsupported")),
            Attempt::Fatal(_)
        ));
    }

    fn config(accepts_audio: bool) -> OpenAiConfig {
        OpenAiConfig {
            base_url: "http://127.0.0.1:1".into(),
            model: "m".into(),
            api_key_env: None,
            accepts_audio,
            accepts_images: true,
            max_retries: 2,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            ca_file: None,
            temperature: None,
        }
    }

    fn request() -> CloudRequest {
        CloudRequest {
            request_id: RequestId(1),
            device_id: DeviceId::new("d").unwrap(),
            dialogue_id: "x".into(),
            turn: 1,
            task: "Query".into(),
            question: "What is this?".into(),
            history: vec![HistoryTurn { question: "Hi".into(), answer: "Hello".into() }],
            attachments: vec![
                Attachment {
                    modality: 0,
                    name: "cam".into(),
                    media_type: MediaType::ImageJpeg,
                    data: vec![1, 2, 3],
                },
                Attachment {
                    modality: 3,
                    name: "audio".into(),
                    media_type: MediaType::AudioWav,
                    data: vec![4, 5],
                },
            ],
            deadline_unix_ms: 0,
            max_tokens: 64,
            stream: false,
        }
    }

    #[test]
    fn body_has_history_images_and_audio_when_taken() {
        let (body, images) = build_request_body(&config(true), &request(), "sys", false);
        assert_eq!(images, 1);
        let messages = body["messages"].as_array().unwrap();
        let roles: Vec<&str> = messages.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        let parts = messages[3]["content"].as_array().unwrap();
        assert_eq!(parts[0]["text"], "What is this?");
        assert_eq!(parts[1]["image_url"]["url"], "data:image/jpeg;base64,AQID");
        assert_eq!(parts[2]["input_audio"]["data"], "BAU=");
        assert_eq!(parts[2]["input_audio"]["format"], "wav");
        assert_eq!(body["max_tokens"], 64);
    }

    #[test]
    fn audio_is_dropped_with_a_note_when_not_taken() {
        let (body, _) = build_request_body(&config(false), &request(), "sys", false);
        let parts = body["messages"][3]["content"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        let text = parts[0]["text"].as_str().unwrap();
        assert!(text.contains("[1 audio clip attached] (not sent"), "{text}");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (i, m) = (Duration::from_millis(100), Duration::from_millis(500));
        let d: Vec<u64> = (1..=5).map(|a| backoff_delay(a, i, m).as_millis() as u64).collect();
        assert_eq!(d, [100, 200, 400, 500, 500]);
        assert_eq!(backoff_delay(100, i, m), m);
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(parse_retry_after(&HeaderValue::from_static("2")), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(&HeaderValue::from_static(" 0.5 ")), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(parse_retry_after(&HeaderValue::from_static("-1")), None);
    }

    #[test]
    fn completions_parse_or_fail_typed() {
        let ok = br#"{"id":"c","object":"chat.completion","model":"m-2024","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}}"#;
        let a = parse_completion(ok).unwrap();
        assert_eq!(
            (a.text.as_str(), a.model.as_str(), a.prompt_tokens, a.completion_tokens),
            ("Hi", "m-2024", 10, 2)
        );
        assert!(matches!(parse_completion(b"{not json"), Err(BackendError::Malformed(_))));
        assert!(matches!(parse_completion(br#"{"choices":[]}"#), Err(BackendError::Malformed(_))));
        assert!(matches!(
            parse_completion(br#"{"choices":[{"message":{"content":null}}]}"#),
            Err(BackendError::Malformed(_))
        ));
    }

    #[test]
    fn statuses_are_classified() {
        assert!(matches!(
            classify(
                StatusCode::OK,
                None,
                Bytes::from_static(br#"{"choices":[{"message":{"content":"x"}}]}"#)
            ),
            Attempt::Done(_)
        ));
        assert!(matches!(classify(StatusCode::OK, None, Bytes::new()), Attempt::Fatal(_)));
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(1)), Bytes::new()),
            Attempt::Retry(Retry { kind: RetryKind::RateLimited, retry_after: Some(_) })
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, None, Bytes::new()),
            Attempt::Retry(Retry { kind: RetryKind::Server(_), .. })
        ));
        assert!(matches!(
            classify(StatusCode::UNAUTHORIZED, None, Bytes::from_static(b"bad key")),
            Attempt::Fatal(BackendError::Refused { status: 401, .. })
        ));
    }
}

//! End to end: a real Mosquitto, the real `tmo-cloud` binary, a device-side link, and either a
//! chat-completions server written here (axum, speaking the documented request and response
//! shapes) or the candle backend with SmolLM2-135M.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use tmo_cloud::bridge::unix_ms_now;
use tmo_cloud::testing::{ChatServer, Ended, LONG_WORDS, SHORT_WORDS, answer_text};
use tmo_protocol::link::{Link, LinkConfig, LinkSetup, Message, QoS, Subscription};
use tmo_protocol::testing::MosquittoBroker;
use tmo_protocol::{
    Attachment, CborMessage, CloudAnswer, CloudCancel, CloudCapabilities, CloudChunk, CloudErrorKind,
    CloudReply, CloudRequest, DeviceId, HistoryTurn, Inbox, JsonMessage, MediaType, ReassemblyLimits,
    ReplyResult, RequestId, Topic,
};

const API_KEY: &str = "test-key-123";
const KEY_VAR: &str = "TMO_CLOUD_TEST_API_KEY";
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- the chat-completions server

#[derive(Debug, Clone)]
struct Recorded {
    scenario: String,
    authorization: Option<String>,
    body: Value,
    at: Instant,
}

#[derive(Default)]
struct ServerState {
    attempts: Mutex<HashMap<String, u32>>,
    recorded: Mutex<Vec<Recorded>>,
}

/// The text of the last user message (a string or the first text part).
fn question_of(body: &Value) -> String {
    let last = &body["messages"].as_array().and_then(|m| m.last()).cloned().unwrap_or(Value::Null);
    match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .find(|p| p["type"] == "text")
            .and_then(|p| p["text"].as_str())
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

fn completion(body: &Value, question: &str) -> Response {
    Json(json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": body["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": format!("answer to: {question}")},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 20, "total_tokens": 1020}
    }))
    .into_response()
}

async fn chat_completions(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let question = question_of(&body);
    if body["model"] == "judge-model" {
        state.recorded.lock().unwrap().push(Recorded {
            scenario: "judge".into(),
            authorization: None,
            body: body.clone(),
            at: Instant::now(),
        });
        return Json(json!({
            "model": "judge-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "8"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51}
        }))
        .into_response();
    }
    // The scenario is the first word of the question: `ok`, `rate-limited`, ...
    let scenario = question.split_whitespace().next().unwrap_or_default().to_owned();
    let attempt = {
        let mut attempts = state.attempts.lock().unwrap();
        let n = attempts.entry(question.clone()).or_insert(0);
        *n += 1;
        *n
    };
    state.recorded.lock().unwrap().push(Recorded {
        scenario: scenario.clone(),
        authorization: headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned),
        body: body.clone(),
        at: Instant::now(),
    });
    match (scenario.as_str(), attempt) {
        ("rate-limited", 1) => {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], "slow down").into_response()
        }
        ("server-error", 1) => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        ("slow", _) => {
            tokio::time::sleep(Duration::from_secs(4)).await;
            completion(&body, &question)
        }
        ("malformed", _) => {
            (StatusCode::OK, [("content-type", "application/json")], r#"{"choices": [{"message": "#)
                .into_response()
        }
        _ => completion(&body, &question),
    }
}

struct TestServer {
    base_url: String,
    state: Arc<ServerState>,
}

async fn start_server() -> TestServer {
    let state = Arc::new(ServerState::default());
    let app =
        axum::Router::new().route("/v1/chat/completions", post(chat_completions)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    TestServer { base_url: format!("http://{addr}"), state }
}

// ---------------------------------------------------------------- the bridge process

struct Bridge {
    child: Child,
    client_id: String,
    _dir: tempfile::TempDir,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openai_backend(base_url: &str, model: &str) -> String {
    format!(
        "[backend]\nkind = \"openai\"\nbase_url = \"{base_url}\"\nmodel = \"{model}\"\napi_key_env = \"{KEY_VAR}\"\n\
         max_retries = 3\ninitial_backoff_ms = 50\nmax_backoff_ms = 400\n\
         [prices.\"{model}\"]\nprompt_per_million_usd = 2.5\ncompletion_per_million_usd = 10.0\nper_image_usd = 0.001\n"
    )
}

fn candle_backend(model: &str) -> String {
    format!(
        "[backend]\nkind = \"candle\"\nmodel = \"{model}\"\n\
         [prices.\"{model}\"]\nprompt_per_million_usd = 0.05\ncompletion_per_million_usd = 0.1\n"
    )
}

/// Bounds per device that the tests' bursts from one device stay under.
const ROOMY: &str = "[per_device]\nin_flight = 64\nrequests_per_minute = 100000\n";

fn write_config(dir: &Path, port: u16, client_id: &str, backend: &str, per_device: &str) -> PathBuf {
    let text = format!(
        "share_group = \"bridges\"\nmax_concurrent_requests = 8\nreply_margin_ms = 100\n{per_device}\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"{client_id}\"\nmax_packet_bytes = 1048576\n\
         reconnect_initial_ms = 50\nreconnect_max_ms = 500\n{backend}"
    );
    let path = dir.join("tmo-cloud.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn_bridge(broker: &MosquittoBroker, client_id: &str, backend: &str) -> Bridge {
    spawn_bridge_bounded(broker, client_id, backend, ROOMY)
}

fn spawn_bridge_bounded(
    broker: &MosquittoBroker,
    client_id: &str,
    backend: &str,
    per_device: &str,
) -> Bridge {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port(), client_id, backend, per_device);
    let log = std::fs::File::create(dir.path().join("bridge.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tmo-cloud"))
        .arg("--config")
        .arg(&config)
        .env(KEY_VAR, API_KEY)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Bridge { child, client_id: client_id.to_owned(), _dir: dir }
}

impl Bridge {
    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("bridge.log")).unwrap_or_default()
    }
}

/// Waits until the broker has acknowledged the bridge's shared subscription.
async fn wait_subscribed(broker: &MosquittoBroker, bridge: &mut Bridge) {
    let started = Instant::now();
    let needle = format!("Sending SUBACK to {}", bridge.client_id);
    while !broker.log().contains(&needle) {
        if let Ok(Some(status)) = bridge.child.try_wait() {
            panic!("bridge exited with {status}: {}", bridge.log());
        }
        assert!(started.elapsed() < Duration::from_secs(60), "bridge did not subscribe: {}", bridge.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- the device side

struct DeviceSide {
    link: Link,
    inbox: Inbox,
    device: DeviceId,
}

async fn device_side(broker: &MosquittoBroker, name: &str) -> DeviceSide {
    let device = DeviceId::new(name).unwrap();
    let mut config = LinkConfig::new("127.0.0.1", broker.port(), name);
    config.max_packet_bytes = 1 << 20;
    let reply = Topic::CloudReply(device.clone()).name();
    let stream = Topic::CloudStream(device.clone()).name();
    let link = Link::start(
        &config,
        LinkSetup {
            availability_topic: None,
            subscriptions: vec![
                Subscription::new(reply, QoS::AtLeastOnce),
                Subscription::new(stream, QoS::AtLeastOnce),
            ],
        },
    )
    .unwrap();
    assert!(link.wait_connected(WAIT).await);
    DeviceSide { link, inbox: Inbox::new(ReassemblyLimits::default()), device }
}

/// A real JPEG of about 50 KB (a noisy gradient, as a camera frame).
fn camera_jpeg(seed: u32) -> Vec<u8> {
    let (w, h) = (320u16, 240u16);
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    let mut pixels = Vec::with_capacity(usize::from(w) * usize::from(h) * 3);
    for row in 0..h {
        for col in 0..w {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let noise = (x % 48) as u8;
            pixels.push((col as u8).wrapping_add(noise));
            pixels.push((row as u8).wrapping_add(noise));
            pixels.push(noise.wrapping_mul(3));
        }
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 85).encode(&pixels, w, h, jpeg_encoder::ColorType::Rgb).unwrap();
    out
}

fn request(device: &DeviceId, question: &str, deadline_ms_from_now: u64, images: &[Vec<u8>]) -> CloudRequest {
    CloudRequest {
        request_id: RequestId::generate(),
        device_id: device.clone(),
        dialogue_id: "dlg-1".into(),
        turn: 1,
        task: "Query".into(),
        question: question.into(),
        history: vec![HistoryTurn { question: "I am making soup.".into(), answer: "Lovely.".into() }],
        attachments: images
            .iter()
            .enumerate()
            .map(|(i, data)| Attachment {
                modality: i as u8,
                name: format!("camera-{i}"),
                media_type: MediaType::ImageJpeg,
                data: data.clone(),
            })
            .collect(),
        deadline_unix_ms: unix_ms_now() + deadline_ms_from_now,
        max_tokens: 24,
        stream: false,
    }
}

impl DeviceSide {
    async fn send(&self, request: &CloudRequest) {
        let template = Message {
            response_topic: Some(Topic::CloudReply(self.device.clone()).name()),
            correlation_data: Some(request.request_id.to_correlation_data()),
            ..Message::new(request.topic().name(), QoS::AtLeastOnce, Vec::new())
        };
        let body = request.to_cbor().unwrap();
        let deliveries = self.link.publisher().publish_body(&template, &body).await.unwrap();
        assert_eq!(deliveries.len(), 1, "the request fits one packet");
        for d in deliveries {
            d.confirmed().await.unwrap();
        }
    }

    /// The next reply, with the unix ms it arrived at; checks the correlation data. Pieces of
    /// streamed answers before it are skipped.
    async fn reply(&mut self) -> (CloudReply, u64) {
        loop {
            let m = tokio::time::timeout(WAIT, self.link.incoming.recv())
                .await
                .expect("a reply in time")
                .unwrap();
            if m.topic.ends_with("/cloud/stream") {
                continue;
            }
            if let Some(reply) = self.inbox.receive::<CloudReply>(&m.topic, &m.payload, Instant::now()) {
                let correlated = m.correlation_data.as_deref().and_then(RequestId::from_correlation_data);
                assert_eq!(correlated, Some(reply.request_id), "correlation data echoed");
                return (reply, unix_ms_now());
            }
        }
    }

    /// The pieces of a streamed answer, each with when it arrived, and then its reply.
    async fn streamed(&mut self) -> (Vec<(CloudChunk, Instant)>, CloudReply, Instant) {
        let mut pieces = Vec::new();
        loop {
            let m = tokio::time::timeout(WAIT, self.link.incoming.recv())
                .await
                .expect("a piece or the reply in time")
                .unwrap();
            let now = Instant::now();
            if m.topic.ends_with("/cloud/stream") {
                pieces.push((
                    self.inbox.receive::<CloudChunk>(&m.topic, &m.payload, now).expect("a piece"),
                    now,
                ));
            } else if let Some(reply) = self.inbox.receive::<CloudReply>(&m.topic, &m.payload, now) {
                return (pieces, reply, now);
            }
        }
    }

    /// The first piece of a streamed answer.
    async fn first_piece(&mut self) -> CloudChunk {
        loop {
            let m = tokio::time::timeout(WAIT, self.link.incoming.recv()).await.expect("a piece").unwrap();
            if let Some(piece) = self.inbox.receive::<CloudChunk>(&m.topic, &m.payload, Instant::now()) {
                return piece;
            }
        }
    }

    /// Says the device no longer waits for `request_id`, on `device`'s cancel topic.
    async fn cancel(&self, device: &DeviceId, request_id: RequestId) {
        let body = CloudCancel { request_id }.to_cbor().unwrap();
        let template = Message::new(Topic::CloudCancel(device.clone()).name(), QoS::AtLeastOnce, Vec::new());
        for d in self.link.publisher().publish_body(&template, &body).await.unwrap() {
            d.confirmed().await.unwrap();
        }
    }

    async fn ask(&mut self, request: &CloudRequest) -> (CloudReply, u64) {
        self.send(request).await;
        let (reply, at) = self.reply().await;
        assert_eq!(reply.request_id, request.request_id);
        (reply, at)
    }
}

fn answer(reply: &CloudReply) -> &CloudAnswer {
    match &reply.result {
        ReplyResult::Answer(a) => a,
        ReplyResult::Error(e) => panic!("error reply: {e:?}"),
    }
}

fn error_kind(reply: &CloudReply) -> (CloudErrorKind, String) {
    match &reply.result {
        ReplyResult::Error(e) => (e.kind, e.message.clone()),
        ReplyResult::Answer(a) => panic!("answer instead of an error: {a:?}"),
    }
}

fn recorded(server: &TestServer, scenario: &str) -> Vec<Recorded> {
    server.state.recorded.lock().unwrap().iter().filter(|r| r.scenario == scenario).cloned().collect()
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_bridge_openai_backend_end_to_end() {
    let broker = MosquittoBroker::start().unwrap();
    let server = start_server().await;
    let mut bridge = spawn_bridge(&broker, "bridge-openai", &openai_backend(&server.base_url, "gpt-test"));
    wait_subscribed(&broker, &mut bridge).await;
    let mut device = device_side(&broker, "kitchen-1").await;

    // Three ~50 KB camera frames, answered with the request shape checked.
    let frames: Vec<Vec<u8>> = (1..=3).map(camera_jpeg).collect();
    for f in &frames {
        assert!((30_000..90_000).contains(&f.len()), "jpeg of {} bytes", f.len());
        assert_eq!(&f[..2], &[0xFF, 0xD8]);
    }
    let req = request(&device.device, "ok which pan is hot?", 10_000, &frames);
    let (reply, _) = device.ask(&req).await;
    let a = answer(&reply);
    assert_eq!(a.answer, "answer to: ok which pan is hot?");
    assert_eq!(a.model, "gpt-test");
    assert_eq!((a.prompt_tokens, a.completion_tokens), (1000, 20));
    let expected_cost = 1000.0 * 2.5 / 1e6 + 20.0 * 10.0 / 1e6 + 3.0 * 0.001;
    assert!((a.cost_usd - expected_cost).abs() < 1e-12, "{} vs {expected_cost}", a.cost_usd);
    assert!(reply.bridge_latency_ms >= reply.backend_latency_ms);
    let seen = recorded(&server, "ok");
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert_eq!(r.authorization.as_deref(), Some("Bearer test-key-123"));
    assert_eq!(r.body["model"], "gpt-test");
    assert_eq!(r.body["max_tokens"], 24);
    let messages = r.body["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert_eq!(messages[1]["content"], "I am making soup.");
    let parts = messages[3]["content"].as_array().unwrap();
    assert_eq!(parts[0], json!({"type": "text", "text": "ok which pan is hot?"}));
    assert_eq!(parts.len(), 4);
    for (part, frame) in parts[1..].iter().zip(&frames) {
        assert_eq!(part["type"], "image_url");
        let url = part["image_url"]["url"].as_str().unwrap();
        let b64 = url.strip_prefix("data:image/jpeg;base64,").expect("a JPEG data URL");
        assert_eq!(&BASE64.decode(b64).unwrap(), frame);
    }

    // 429 with Retry-After: 1, then 200: answered, and the retry waited the second.
    let (reply, _) = device.ask(&request(&device.device, "rate-limited please", 10_000, &[])).await;
    assert_eq!(answer(&reply).answer, "answer to: rate-limited please");
    let seen = recorded(&server, "rate-limited");
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(990), "retried after {gap:?}, Retry-After said 1 s");
    // The text-only request has a plain string content.
    assert_eq!(seen[0].body["messages"][3]["content"], "rate-limited please");

    // 500, then 200.
    let (reply, _) = device.ask(&request(&device.device, "server-error once", 10_000, &[])).await;
    assert_eq!(answer(&reply).answer, "answer to: server-error once");
    assert_eq!(recorded(&server, "server-error").len(), 2);

    // A reply slower than the deadline: the bridge answers with a deadline error in time.
    let slow = request(&device.device, "slow answer", 1_500, &[]);
    let (reply, arrived) = device.ask(&slow).await;
    let (kind, message) = error_kind(&reply);
    assert_eq!(kind, CloudErrorKind::DeadlineExceeded, "{message}");
    assert!(
        arrived <= slow.deadline_unix_ms,
        "reply {} ms after the deadline",
        arrived - slow.deadline_unix_ms
    );

    // A malformed body: a typed backend error.
    let (reply, _) = device.ask(&request(&device.device, "malformed body", 10_000, &[])).await;
    let (kind, message) = error_kind(&reply);
    assert_eq!(kind, CloudErrorKind::Backend);
    assert!(message.contains("malformed"), "{message}");
    assert_eq!(recorded(&server, "malformed").len(), 1, "a malformed body is not retried");

    // Garbage and a request claiming another device are refused; the bridge keeps serving.
    let p = device.link.publisher();
    let topic = Topic::CloudRequest(device.device.clone()).name();
    p.publish(Message::new(topic.clone(), QoS::AtLeastOnce, b"not a frame".to_vec())).await.unwrap();
    p.publish(Message::new(topic.clone(), QoS::AtLeastOnce, b"TM\x01W\x83\x01\x01\xff".to_vec()))
        .await
        .unwrap();
    let mut other = request(&DeviceId::new("kitchen-2").unwrap(), "ok spoofed", 10_000, &[]);
    other.device_id = DeviceId::new("kitchen-2").unwrap();
    let body = tmo_protocol::split(&other.to_cbor().unwrap(), 1 << 20, 7).unwrap().remove(0);
    p.publish(Message::new(topic, QoS::AtLeastOnce, body)).await.unwrap().confirmed().await.unwrap();
    let (reply, _) = device.ask(&request(&device.device, "ok still there?", 10_000, &[])).await;
    assert_eq!(answer(&reply).answer, "answer to: ok still there?");
    assert!(recorded(&server, "ok").iter().all(|r| question_of(&r.body) != "ok spoofed"));
    assert!(bridge.child.try_wait().unwrap().is_none(), "bridge alive");
    let log = bridge.log();
    assert!(log.contains("payload refused"), "{log}");
    assert!(log.contains("request refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_bridge_says_what_its_backend_takes_and_bounds_each_device() {
    let broker = MosquittoBroker::start().unwrap();
    let server = start_server().await;
    // A text-only model, one request at a time per device, three a minute, answers of 10 tokens.
    let backend = openai_backend(&server.base_url, "text-only")
        .replace("max_retries", "accepts_images = false\nmax_retries");
    let limits = "[per_device]\nin_flight = 1\nrequests_per_minute = 3\nmax_tokens = 10\n";
    let mut bridge = spawn_bridge_bounded(&broker, "bridge-bounded", &backend, limits);
    wait_subscribed(&broker, &mut bridge).await;

    // What the backend takes, retained for devices that come later.
    let mut watcher = Link::start(
        &LinkConfig::new("127.0.0.1", broker.port(), "capabilities-watcher"),
        LinkSetup {
            availability_topic: None,
            subscriptions: vec![Subscription::new(Topic::CloudCapabilities.name(), QoS::AtLeastOnce)],
        },
    )
    .unwrap();
    let m = tokio::time::timeout(WAIT, watcher.incoming.recv()).await.expect("capabilities").unwrap();
    assert!(m.retain, "capabilities are retained");
    let capabilities = CloudCapabilities::from_json(&m.payload, 1 << 16).unwrap();
    assert_eq!(
        (capabilities.model.as_str(), capabilities.accepts.len(), capabilities.max_tokens),
        ("text-only", 0, 10)
    );

    // One in flight: a second request of the same device while the first is slow is refused
    // at once, without reaching the backend; another device is not held back.
    let mut device = device_side(&broker, "kitchen-busy").await;
    let slow = request(&device.device, "slow but fine", 10_000, &[]);
    device.send(&slow).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (reply, _) = device.ask(&request(&device.device, "ok meanwhile", 10_000, &[])).await;
    let (kind, message) = error_kind(&reply);
    assert_eq!(kind, CloudErrorKind::Overloaded, "{message}");
    assert!(message.contains("in flight"), "{message}");
    let mut other = device_side(&broker, "kitchen-calm").await;
    let (reply, _) = other.ask(&request(&other.device, "ok other device", 10_000, &[])).await;
    assert_eq!(answer(&reply).answer, "answer to: ok other device");
    let (reply, _) = device.reply().await;
    assert_eq!(
        (reply.request_id, answer(&reply).answer.as_str()),
        (slow.request_id, "answer to: slow but fine")
    );

    // Three a minute: the slow one and two more go through, the fourth is refused. Answers
    // are cut to 10 tokens whatever the device asked (24).
    for n in 0..2 {
        let (reply, _) = device.ask(&request(&device.device, &format!("ok number {n}"), 10_000, &[])).await;
        assert_eq!(answer(&reply).answer, format!("answer to: ok number {n}"));
    }
    let (reply, _) = device.ask(&request(&device.device, "ok one too many", 10_000, &[])).await;
    let (kind, message) = error_kind(&reply);
    assert_eq!(kind, CloudErrorKind::RateLimited, "{message}");
    assert!(recorded(&server, "ok").iter().all(|r| r.body["max_tokens"] == 10));
    assert!(
        recorded(&server, "ok")
            .iter()
            .all(|r| question_of(&r.body) != "ok meanwhile" && question_of(&r.body) != "ok one too many")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_two_bridges_split_twenty_requests() {
    let broker = MosquittoBroker::start().unwrap();
    let server = start_server().await;
    let mut a = spawn_bridge(&broker, "bridge-a", &openai_backend(&server.base_url, "model-a"));
    let mut b = spawn_bridge(&broker, "bridge-b", &openai_backend(&server.base_url, "model-b"));
    wait_subscribed(&broker, &mut a).await;
    wait_subscribed(&broker, &mut b).await;
    let mut device = device_side(&broker, "kitchen-9").await;
    let requests: Vec<CloudRequest> =
        (0..20).map(|i| request(&device.device, &format!("ok question {i}"), 20_000, &[])).collect();
    for r in &requests {
        device.send(r).await;
    }
    let mut by_model: HashMap<String, usize> = HashMap::new();
    let mut answered = HashSet::new();
    while answered.len() < requests.len() {
        let (reply, _) = device.reply().await;
        let a = answer(&reply).clone();
        assert!(answered.insert(reply.request_id), "request answered twice");
        let sent = requests.iter().find(|r| r.request_id == reply.request_id).expect("a request we sent");
        assert_eq!(a.answer, format!("answer to: {}", sent.question));
        *by_model.entry(a.model).or_default() += 1;
    }
    assert_eq!(by_model.values().sum::<usize>(), 20);
    assert!(by_model.get("model-a").is_some_and(|n| *n > 0), "{by_model:?}");
    assert!(by_model.get("model-b").is_some_and(|n| *n > 0), "{by_model:?}");
    // Each request reached the backend once.
    assert_eq!(recorded(&server, "ok").len(), 20);
    eprintln!("two bridges split 20 requests: {by_model:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_bridge_streams_an_answer_before_its_reply_and_a_cancel_stops_the_backend() {
    let broker = MosquittoBroker::start().unwrap();
    let pace = Duration::from_millis(100);
    let server = ChatServer::start(pace).await.unwrap();
    let mut bridge = spawn_bridge(&broker, "bridge-stream", &openai_backend(&server.base_url, "gpt-test"));
    wait_subscribed(&broker, &mut bridge).await;
    let mut device = device_side(&broker, "kitchen-6").await;

    // Streamed: the pieces, numbered from 0, come as the backend writes, well before the reply,
    // and make up the reply's answer.
    let mut streamed = request(&device.device, "ok stream it", 20_000, &[]);
    streamed.stream = true;
    device.send(&streamed).await;
    let (pieces, reply, replied) = device.streamed().await;
    let whole = answer(&reply);
    assert_eq!(whole.answer, answer_text(SHORT_WORDS));
    assert_eq!(whole.completion_tokens, SHORT_WORDS as u32, "from the stream's usage chunk");
    let seqs: Vec<u32> = pieces.iter().map(|(p, _)| p.seq).collect();
    assert_eq!(seqs, (0..pieces.len() as u32).collect::<Vec<_>>());
    assert!(
        pieces.len() >= SHORT_WORDS / 2,
        "{} pieces for {SHORT_WORDS} words {pace:?} apart",
        pieces.len()
    );
    let text: String = pieces.iter().map(|(p, _)| p.text.as_str()).collect();
    assert_eq!(text, whole.answer);
    let ahead = replied - pieces[0].1;
    assert!(ahead >= pace * (SHORT_WORDS as u32 - 2), "first piece only {ahead:?} before the reply");
    let served = server.served();
    assert!(served[0].stream && served[0].ended == Some(Ended::Completed));
    // The backend's first word and the device's first piece, on one clock.
    let behind = pieces[0].1 - served[0].word_times[0];
    assert!(behind < Duration::from_millis(500), "first piece {behind:?} after the backend's first word");

    // Not asked to stream (a device of before): the reply alone.
    let (pieces, reply, _) = {
        device.send(&request(&device.device, "ok whole", 20_000, &[])).await;
        device.streamed().await
    };
    assert!(pieces.is_empty());
    assert_eq!(answer(&reply).answer, answer_text(SHORT_WORDS));

    // A long answer cancelled after its first piece: the bridge drops the HTTP stream, which the
    // backend sees, and replies nothing. A cancel on another device's topic does nothing.
    let mut long = request(&device.device, "long answer please", 60_000, &[]);
    long.stream = true;
    device.send(&long).await;
    let first = device.first_piece().await;
    assert_eq!((first.request_id, first.seq), (long.request_id, 0));
    device.cancel(&DeviceId::new("kitchen-other").unwrap(), long.request_id).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server.served().iter().all(|s| s.ended.is_none() || !s.question.starts_with("long")));
    device.cancel(&device.device, long.request_id).await;
    let ended = server.wait_ended("long", Duration::from_secs(5)).await.expect("the stream ended");
    assert_eq!(ended.ended, Some(Ended::Dropped));
    assert!(ended.word_times.len() < LONG_WORDS / 4, "{} words went out", ended.word_times.len());
    let quiet = tokio::time::timeout(Duration::from_secs(1), device.reply()).await;
    assert!(quiet.is_err(), "a cancelled request got a reply");
    assert!(bridge.log().contains("cancelled by its device"), "{}", bridge.log());

    // A text-only server refusing images: one attempt, a bad-request error at once.
    let mut refused = request(&device.device, "refuse-images look", 20_000, &[camera_jpeg(9)]);
    refused.stream = true;
    let sent = Instant::now();
    let (reply, _) = device.ask(&refused).await;
    let (kind, message) = error_kind(&reply);
    assert_eq!(kind, CloudErrorKind::BadRequest, "{message}");
    assert!(message.contains("not supported"), "{message}");
    assert!(sent.elapsed() < Duration::from_secs(2), "retried: {:?}", sent.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_bridge_candle_backend_answers_with_smollm2() {
    let broker = MosquittoBroker::start().unwrap();
    let mut bridge = spawn_bridge(&broker, "bridge-candle", &candle_backend("smollm2-135m"));
    wait_subscribed(&broker, &mut bridge).await;
    let mut device = device_side(&broker, "kitchen-3").await;
    let frames: Vec<Vec<u8>> = (1..=3).map(camera_jpeg).collect();
    let mut overheads = Vec::new();
    for question in ["What soup can I make with leeks?", "How long should I boil an egg?"] {
        let sent = Instant::now();
        let (reply, _) = device.ask(&request(&device.device, question, 60_000, &frames)).await;
        let round_trip = sent.elapsed();
        let a = answer(&reply);
        assert!(!a.answer.trim().is_empty());
        assert_eq!(a.model, "smollm2-135m");
        assert!(a.prompt_tokens > 20, "{}", a.prompt_tokens);
        assert!((1..=24).contains(&a.completion_tokens), "{}", a.completion_tokens);
        let expected = f64::from(a.prompt_tokens) * 0.05 / 1e6 + f64::from(a.completion_tokens) * 0.1 / 1e6;
        assert!((a.cost_usd - expected).abs() < 1e-15);
        overheads.push((round_trip.as_millis(), reply.bridge_latency_ms, reply.backend_latency_ms));
        eprintln!(
            "candle reply: {:?} ({} + {} tokens), round trip {} ms, bridge {} ms, backend {} ms",
            a.answer,
            a.prompt_tokens,
            a.completion_tokens,
            round_trip.as_millis(),
            reply.bridge_latency_ms,
            reply.backend_latency_ms
        );
    }
    assert!(bridge.log().contains("candle model loaded"));

    // Streamed token by token, and stopped by a cancel after the first piece.
    let mut story =
        request(&device.device, "Tell me a very long story about a dragon who cooks soup.", 60_000, &[]);
    (story.stream, story.max_tokens) = (true, 1000);
    device.send(&story).await;
    let first = device.first_piece().await;
    assert_eq!(first.request_id, story.request_id);
    device.cancel(&device.device, story.request_id).await;
    let started = Instant::now();
    while !bridge.log().contains("generation cancelled") {
        assert!(started.elapsed() < WAIT, "the engine did not stop: {}", bridge.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The engine is free again: a short request is answered.
    let (reply, _) = device.ask(&request(&device.device, "What is an egg?", 60_000, &[])).await;
    assert!(!answer(&reply).answer.trim().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_judge_scores_sampled_answers_on_the_score_topic() {
    let broker = MosquittoBroker::start().unwrap();
    let server = start_server().await;
    let judge = format!(
        "[judge]\nsample_rate = 1.0\n[judge.backend]\nkind = \"openai\"\nbase_url = \"{}\"\nmodel = \"judge-model\"\n",
        server.base_url
    );
    let backend = format!("{}{judge}", openai_backend(&server.base_url, "gpt-test"));
    let mut bridge = spawn_bridge(&broker, "bridge-judge", &backend);
    wait_subscribed(&broker, &mut bridge).await;
    let mut device = device_side(&broker, "kitchen-5").await;
    let score_topic = Topic::Score(device.device.clone()).name();
    device.link.publisher().subscribe(Subscription::new(score_topic.clone(), QoS::AtLeastOnce));
    // The subscription is made on the live connection; wait for its SUBACK in the broker log.
    let started = Instant::now();
    while !broker.log().contains(&format!("{score_topic} (QoS 1)")) {
        assert!(started.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let req = request(&device.device, "ok rate me", 10_000, &[]);
    device.send(&req).await;
    let (mut reply, mut score) = (None, None);
    while reply.is_none() || score.is_none() {
        let m = tokio::time::timeout(WAIT, device.link.incoming.recv()).await.expect("in time").unwrap();
        if m.topic == score_topic {
            score = Some(
                <tmo_protocol::JudgeScore as tmo_protocol::JsonMessage>::from_json(&m.payload, 4096).unwrap(),
            );
        } else if let Some(r) = device.inbox.receive::<CloudReply>(&m.topic, &m.payload, Instant::now()) {
            reply = Some(r);
        }
    }
    assert_eq!(answer(&reply.unwrap()).answer, "answer to: ok rate me");
    let score = score.unwrap();
    assert_eq!(score.request_id, req.request_id);
    assert_eq!((score.dialogue_id.as_str(), score.turn), ("dlg-1", 1));
    assert_eq!(score.score, 0.8);
    assert_eq!(score.judge_model, "judge-model");
    // The judge saw the question and the answer.
    let judged = recorded(&server, "judge");
    assert_eq!(judged.len(), 1);
    let text = question_of(&judged[0].body);
    assert!(text.contains("ok rate me") && text.contains("answer to: ok rate me"), "{text}");
}

#[test]
fn cloud_validate_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(dir.path(), 1883, "b", &candle_backend("smollm2-135m"), ROOMY);
    let run = |path: &Path| {
        Command::new(env!("CARGO_BIN_EXE_tmo-cloud"))
            .arg("validate")
            .arg("--config")
            .arg(path)
            .output()
            .unwrap()
    };
    let out = run(&good);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&good)
        .unwrap()
        .replace("max_concurrent_requests = 8", "max_concurrent_requests = 0");
    std::fs::write(&bad, text).unwrap();
    let out = run(&bad);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_concurrent_requests"), "{stderr}");
    let no_key = dir.path().join("nokey.toml");
    std::fs::write(
        &no_key,
        std::fs::read_to_string(&good).unwrap().replace(
            &candle_backend("smollm2-135m"),
            &openai_backend("http://127.0.0.1:9", "m").replace(KEY_VAR, "TMO_CLOUD_SURELY_UNSET"),
        ),
    )
    .unwrap();
    let out = run(&no_key);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backend.api_key_env"));
}

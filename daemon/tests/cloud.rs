//! End to end, the cloud path: a real Mosquitto on a free loopback port, `tmod run` as a
//! process with MQTT enabled, and the cloud bridge (`tmo-cloud`'s library, in this process)
//! answering with the candle backend (Gemma 3 270M). Test names hold `cloud` so that
//! `cargo test --release --workspace -- cloud` selects them. They need mosquitto and the models
//! (`tmoctl model fetch smollm2-135m gemma3-270m all-minilm-l6-v2`, as `scripts/test` does).

use std::path::Path;
use std::time::{Duration, Instant};

use outcome_log::OutcomeLog;
use policy_onnx::export::{ExportOptions, mlp_to_onnx};
use policy_onnx::mlp::{Activation, Dense, Mlp};
use policy_onnx::{Action, ModalitySet, Schema};
use tmo_protocol::link::{Link, LinkConfig, LinkSetup, Message, QoS, Subscription};
use tmo_protocol::testing::MosquittoBroker;
use tmo_protocol::{
    CloudRequest, DeviceId, Inbox, JsonMessage, JudgeScore, MediaType, ReassemblyLimits, Topic,
};
use tmod_api::{AskEvent, AskRequest, AskResponse, Client};

#[path = "support/bridge.rs"]
mod bridge;
#[path = "support/daemon.rs"]
mod daemon;

use bridge::wait_cloud_reachable;
use daemon::Daemon;
use tmo_cloud::testing::{ChatServer, Ended, SHORT_WORDS, answer_text};

const DEVICE: &str = "test-device";
const WAIT: Duration = Duration::from_secs(60);

/// A real ONNX policy (contract v1, the x86-dev board's three views) that prefers the cloud
/// with every view attached, and local next: what the cloud path is tested with.
fn cloud_preferring_policy(dir: &Path) -> std::path::PathBuf {
    policy_with_biases(
        dir,
        &[(Action::Cloud { modalities: ModalitySet::all(3) }, 10.0), (Action::Local, 5.0)],
    )
}

/// A real ONNX policy scoring `actions` by their bias (-1 for the others), whatever it reads.
fn policy_with_biases(dir: &Path, actions: &[(Action, f32)]) -> std::path::PathBuf {
    let schema = Schema::new(3, 5);
    let mut bias = vec![-1.0f32; schema.action_count()];
    for (action, b) in actions {
        bias[schema.action_index(*action).expect("action")] = *b;
    }
    let layer = Dense {
        inputs: schema.observation_len(),
        outputs: schema.action_count(),
        weights: vec![0.0; schema.observation_len() * schema.action_count()],
        bias,
        activation: Activation::Identity,
    };
    let onnx = mlp_to_onnx(&Mlp::new(vec![layer]).expect("mlp"), &ExportOptions::default());
    let path = dir.join("cloud-first.onnx");
    std::fs::write(&path, onnx).expect("write policy");
    path
}

fn tmod_config(broker_port: u16, policy: &Path) -> String {
    format!(
        "[policy]\npath = {policy:?}\n\
         [model]\nmax_tokens = 24\n\
         [dialogues]\nlatency_budget_secs = 600.0\ncost_budget_usd = 5.0\n\
         [mqtt]\nenabled = true\nhost = \"127.0.0.1\"\nport = {broker_port}\n\
         reconnect_initial_ms = 50\nreconnect_max_ms = 500\n\
         [cloud]\nmax_wait_secs = 60.0\nmax_tokens = 32\n"
    )
}

/// A link that sees every cloud request on the broker (a plain subscription beside the
/// bridges' shared one), to check what the daemon sent.
async fn observer(broker_port: u16) -> Link {
    let link = Link::start(
        &LinkConfig::new("127.0.0.1", broker_port, "observer"),
        LinkSetup {
            availability_topic: None,
            subscriptions: vec![Subscription::new("tmo/v1/dev/+/cloud/req", QoS::AtLeastOnce)],
        },
    )
    .expect("observer link");
    assert!(link.wait_connected(WAIT).await, "observer did not connect");
    link
}

/// The cloud path of one test: Mosquitto, a bridge whose backend takes `accepts` (a TOML
/// array), an observer of the cloud requests, and tmod with `policy`, once it sees the cloud.
struct CloudPath {
    broker: MosquittoBroker,
    bridge: bridge::Bridge,
    observer: Link,
    daemon: Daemon,
}

impl CloudPath {
    async fn start(state: &Path, accepts: &str, policy: &Path) -> CloudPath {
        let broker = MosquittoBroker::start().expect("mosquitto (apt-get install mosquitto)");
        let port = broker.port();
        let bridge = bridge::start_bridge_taking(port, accepts).await;
        let observer = observer(port).await;
        let daemon = Daemon::start(state, &tmod_config(port, policy));
        wait_cloud_reachable(&daemon.client(), true).await;
        CloudPath { broker, bridge, observer, daemon }
    }

    /// The next cloud request seen on the broker.
    async fn next_request(&mut self) -> CloudRequest {
        let sent = tokio::time::timeout(WAIT, self.observer.incoming.recv())
            .await
            .expect("request seen")
            .expect("link");
        Inbox::new(ReassemblyLimits::default())
            .receive(&sent.topic, &sent.payload, Instant::now())
            .expect("request decodes")
    }

    async fn stop(self) {
        self.bridge.stop.cancel();
        let _ = self.bridge.task.await;
    }
}

/// What the stand-in bridge of most tests takes: views and audio, which it describes.
const MULTI_MODAL: &str = "[\"image/jpeg\", \"audio/wav\"]";

async fn ask(client: &Client, dialogue: &str, question: &str) -> AskResponse {
    let mut streamed = String::new();
    let response = client
        .ask(&AskRequest::new(Some(dialogue), question), |event| {
            if let AskEvent::Token(piece) = event {
                streamed.push_str(piece);
            }
        })
        .await
        .expect("ask");
    assert_eq!(response.outcome.answer, streamed, "the streamed text is the answer");
    assert!(!response.outcome.answer.trim().is_empty());
    response
}

fn attempt(response: &AskResponse) -> &serde_json::Value {
    response.outcome.cloud_attempt.as_ref().expect("a cloud attempt is recorded")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_answers_with_three_frames_falls_back_when_the_broker_dies_and_comes_back() {
    let state = tempfile::tempdir().expect("tempdir");
    let policy = cloud_preferring_policy(state.path());
    let mut path = CloudPath::start(state.path(), MULTI_MODAL, &policy).await;
    let client = path.daemon.client();
    let dialogue = client.new_dialogue().await.expect("dialogue").dialogue_id;

    // Turn 0: the cloud answers, with the three camera views attached.
    let first = ask(&client, &dialogue, "What can I cook with what is on the counter?").await;
    assert_eq!(first.decision.action, "cloud");
    assert_eq!(first.decision.modalities, ["view-0", "view-1", "view-2"]);
    assert_eq!(first.outcome.route, "cloud");
    assert_eq!(first.outcome.finish, "cloud");
    let answered = attempt(&first);
    assert_eq!(answered["outcome"], "answered", "{answered}");
    assert_eq!(answered["model"], "gemma3-270m");
    assert!(first.outcome.prompt_tokens > 0 && first.outcome.generated_tokens > 0);
    assert!(first.outcome.timings.cloud_ms > 0.0);
    let sent =
        tokio::time::timeout(WAIT, path.observer.incoming.recv()).await.expect("request seen").expect("link");
    let mut inbox = Inbox::new(ReassemblyLimits::default());
    let request: CloudRequest =
        inbox.receive(&sent.topic, &sent.payload, Instant::now()).expect("request decodes");
    assert_eq!((request.device_id.as_str(), request.turn), (DEVICE, 0));
    assert_eq!(request.dialogue_id, dialogue);
    assert_eq!(request.attachments.len(), 3);
    for (i, a) in request.attachments.iter().enumerate() {
        assert_eq!((a.modality as usize, a.name.clone()), (i, format!("view-{i}")));
        assert_eq!(a.media_type, MediaType::ImageJpeg);
        assert!(a.data.starts_with(&[0xFF, 0xD8, 0xFF]) && a.data.len() > 5_000, "{a:?}");
    }
    assert!(answered["request_bytes"].as_u64() > Some(15_000), "{answered}");
    assert_eq!(sent.response_topic.as_deref(), Some("tmo/v1/dev/test-device/cloud/reply"));

    // A judge's score published for turn 0 lands in the outcome log.
    let score = JudgeScore {
        v: 1,
        request_id: request.request_id,
        dialogue_id: dialogue.clone(),
        turn: 0,
        score: 0.75,
        judge_model: "judge".into(),
    };
    let publisher = path.observer.publisher();
    let score_topic = Topic::Score(DeviceId::new(DEVICE).expect("id")).name();
    // Malformed payloads on the daemon's topics are refused and change nothing.
    for (topic, payload) in [
        (score_topic.clone(), b"{not json".to_vec()),
        ("tmo/v1/dev/test-device/cloud/reply".to_owned(), vec![0xFF; 64]),
    ] {
        publisher
            .publish(Message::new(topic, QoS::AtLeastOnce, payload))
            .await
            .expect("publish")
            .confirmed()
            .await
            .expect("ack");
    }
    publisher
        .publish(Message::new(score_topic, QoS::AtLeastOnce, score.to_json().expect("json")))
        .await
        .expect("publish score")
        .confirmed()
        .await
        .expect("score acknowledged");
    let log_path = state.path().join("outcomes.sqlite");
    let started = Instant::now();
    loop {
        let row = OutcomeLog::open_read_only(&log_path).expect("log").turn(&dialogue, 0).expect("read");
        if row.as_ref().and_then(|r| r.outcome.score) == Some(0.75) {
            assert_eq!(row.expect("row").outcome.score_source.map(|s| s.as_str()), Some("judge"));
            break;
        }
        assert!(started.elapsed() < WAIT, "judge score not stored: {row:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Turn 1: the broker dies while the cloud request is out; the daemon answers locally
    // within the request's deadline and records both.
    let mut killed = false;
    let second = client
        .ask(&AskRequest::new(Some(&dialogue), "And what wine goes with it?"), |event| {
            if let AskEvent::Decision(d) = event {
                assert_eq!(d.action, "cloud");
                path.broker.stop();
                killed = true;
            }
        })
        .await
        .expect("ask during the outage");
    assert!(killed);
    assert_eq!(second.outcome.route, "local:cloud-fallback");
    let failed = attempt(&second);
    let reason = failed["outcome"].as_str().expect("outcome");
    assert!(["connection_lost", "not_connected", "timeout"].contains(&reason), "{failed}");
    let (waited, deadline) =
        (failed["wait_secs"].as_f64().expect("wait"), failed["deadline_secs"].as_f64().expect("deadline"));
    assert!(waited <= deadline + 0.5, "{failed}");
    assert!(waited < 5.0, "a lost connection is noticed at once, not at the deadline: {failed}");
    assert!(second.outcome.generated_tokens > 0 && second.outcome.finish != "cloud");

    // Turn 2: the link is down, so the cloud actions are masked and the answer is local.
    wait_cloud_reachable(&client, false).await;
    let third = ask(&client, &dialogue, "How do I keep the leftovers?").await;
    assert_eq!(third.decision.action, "local");
    assert_eq!(third.decision.route, "local:cloud-unavailable");
    assert_eq!(third.outcome.route, "local:cloud-unavailable");
    assert!(third.outcome.cloud_attempt.is_none());

    // Turn 3: the broker returns; the daemon and the bridge reconnect and the cloud answers.
    path.broker.restart().expect("broker restarts on its port");
    wait_cloud_reachable(&client, true).await;
    let started = Instant::now();
    let fourth = loop {
        // The bridge may reconnect a moment after the daemon: until then the broker says
        // nobody subscribes and the daemon falls back at once.
        let r = ask(&client, &dialogue, "Thanks! How long will it keep in the fridge?").await;
        if r.outcome.route == "cloud" || started.elapsed() > WAIT {
            break r;
        }
        assert_eq!(attempt(&r)["outcome"], "no_bridge", "{:?}", r.outcome);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(fourth.outcome.route, "cloud", "{:?}", fourth.outcome);

    // The log holds every turn with its route and attempt.
    let rows = OutcomeLog::open_read_only(&log_path).expect("log").all_rows().expect("rows");
    let routes: Vec<Option<String>> = rows.iter().map(|r| r.outcome.route.clone()).collect();
    assert_eq!(
        routes[..3],
        [None, Some("local:cloud-fallback".to_owned()), Some("local:cloud-unavailable".to_owned())]
    );
    assert!(rows[1].outcome.action.is_cloud(), "the chosen action is recorded");
    assert_eq!(rows[1].outcome.cloud_attempt.as_ref().map(|a| a.outcome.as_str()), Some(reason));
    assert_eq!(
        rows.last().and_then(|r| r.outcome.cloud_attempt.as_ref()).map(|a| a.outcome.as_str()),
        Some("answered")
    );
    assert!(rows[0].outcome.cost_usd > 0.0);

    let metrics = client.metrics().await.expect("metrics");
    assert!(metrics.contains("tmod_cloud_failures_total{reason=\""), "{metrics}");
    assert!(metrics.contains("route=\"local:cloud-fallback\""), "{metrics}");

    path.bridge.stop.cancel();
    path.bridge.task.await.expect("bridge task").expect("bridge stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_without_a_bridge_falls_back_at_once() {
    let state = tempfile::tempdir().expect("tempdir");
    let broker = MosquittoBroker::start().expect("mosquitto");
    let policy = cloud_preferring_policy(state.path());
    let daemon = Daemon::start(state.path(), &tmod_config(broker.port(), &policy));
    let client = daemon.client();
    wait_cloud_reachable(&client, true).await;
    let dialogue = client.new_dialogue().await.expect("dialogue").dialogue_id;
    let response = ask(&client, &dialogue, "How long should I boil an egg?").await;
    assert_eq!(response.decision.action, "cloud");
    assert_eq!(response.outcome.route, "local:cloud-fallback");
    let failed = attempt(&response);
    // The broker's PUBACK says nobody subscribes: no waiting for the deadline.
    assert_eq!(failed["outcome"], "no_bridge", "{failed}");
    assert!(failed["wait_secs"].as_f64() < Some(2.0), "{failed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_request_unanswered_by_its_deadline_is_answered_locally() {
    let state = tempfile::tempdir().expect("tempdir");
    let broker = MosquittoBroker::start().expect("mosquitto");
    // A bridge that takes requests and never replies (stuck backend, crashed after PUBACK).
    let silent = Link::start(
        &LinkConfig::new("127.0.0.1", broker.port(), "silent-bridge"),
        LinkSetup {
            availability_topic: None,
            subscriptions: vec![Subscription::new("$share/bridges/tmo/v1/dev/+/cloud/req", QoS::AtLeastOnce)],
        },
    )
    .expect("silent bridge");
    assert!(silent.wait_connected(WAIT).await);
    let policy = cloud_preferring_policy(state.path());
    let config = tmod_config(broker.port(), &policy) + "max_wait_secs = 1.5\nmin_wait_secs = 1.5\n";
    let daemon = Daemon::start(state.path(), &config.replace("max_wait_secs = 60.0\n", ""));
    let client = daemon.client();
    wait_cloud_reachable(&client, true).await;
    let dialogue = client.new_dialogue().await.expect("dialogue").dialogue_id;
    let response = ask(&client, &dialogue, "Which knife do I use for tomatoes?").await;
    assert_eq!(response.outcome.route, "local:cloud-fallback");
    let failed = attempt(&response);
    assert_eq!(failed["outcome"], "timeout", "{failed}");
    assert_eq!(failed["deadline_secs"].as_f64(), Some(1.5));
    let waited = failed["wait_secs"].as_f64().expect("wait");
    assert!((1.5..2.0).contains(&waited), "waited {waited} s for a 1.5 s deadline");
    // The whole turn: the wait, then a local answer.
    assert!(response.outcome.latency_secs > waited);
    assert!(response.outcome.generated_tokens > 0);
}

/// A bridge (or anyone who can publish on a device's reply topic) that answers with these
/// costs, one per request, then stops replying.
async fn bridge_replying_with_costs(broker_port: u16, costs: Vec<f64>) -> tokio::task::JoinHandle<()> {
    use tmo_protocol::{CborMessage, CloudAnswer, CloudReply, ReplyResult, ReplyRoute};
    let mut link = Link::start(
        &LinkConfig::new("127.0.0.1", broker_port, "rogue-bridge"),
        LinkSetup {
            availability_topic: None,
            subscriptions: vec![Subscription::new("$share/bridges/tmo/v1/dev/+/cloud/req", QoS::AtLeastOnce)],
        },
    )
    .expect("rogue bridge");
    assert!(link.wait_connected(WAIT).await);
    tokio::spawn(async move {
        let mut inbox = Inbox::new(ReassemblyLimits::default());
        let mut costs = costs.into_iter();
        while let Some(m) = link.incoming.recv().await {
            let Some(request) = inbox.receive::<CloudRequest>(&m.topic, &m.payload, Instant::now()) else {
                continue;
            };
            let Some(cost_usd) = costs.next() else { continue };
            let route = ReplyRoute::for_request(
                &request,
                &m.topic,
                m.response_topic.as_deref(),
                m.correlation_data.as_deref(),
            )
            .expect("route");
            let reply = CloudReply {
                request_id: request.request_id,
                backend_latency_ms: 5,
                bridge_latency_ms: 6,
                result: ReplyResult::Answer(CloudAnswer {
                    answer: "Boil it for seven minutes.".into(),
                    model: "rogue".into(),
                    prompt_tokens: 10,
                    completion_tokens: 6,
                    cost_usd,
                }),
            };
            let template = Message {
                correlation_data: route.correlation_data,
                ..Message::new(route.topic, QoS::AtLeastOnce, Vec::new())
            };
            let sent = link.publisher().publish_body(&template, &reply.to_cbor().expect("encodes")).await;
            sent.expect("reply published");
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_reply_with_a_nan_negative_or_infinite_cost_is_refused_and_answered_locally() {
    let state = tempfile::tempdir().expect("tempdir");
    let broker = MosquittoBroker::start().expect("mosquitto");
    let costs = vec![f64::NAN, -0.5, f64::INFINITY, 1e12];
    let rogue = bridge_replying_with_costs(broker.port(), costs.clone()).await;
    let policy = cloud_preferring_policy(state.path());
    let daemon = Daemon::start(state.path(), &tmod_config(broker.port(), &policy));
    let client = daemon.client();
    wait_cloud_reachable(&client, true).await;
    let dialogue = client.new_dialogue().await.expect("dialogue").dialogue_id;
    for (turn, cost) in costs.iter().enumerate() {
        let response = ask(&client, &dialogue, "How long should I boil an egg?").await;
        assert_eq!(response.decision.action, "cloud", "turn {turn}");
        assert_eq!(response.outcome.route, "local:cloud-fallback", "turn {turn} (cost {cost})");
        let refused = attempt(&response);
        assert_eq!(refused["outcome"], "invalid_reply", "turn {turn}: {refused}");
        let detail = refused["detail"].as_str().expect("detail");
        assert!(detail.contains("cost"), "turn {turn}: {detail}");
        assert_eq!(refused["cost_usd"].as_f64(), Some(0.0), "turn {turn}: {refused}");
        // Nothing of the reply reached the dialogue's budget: a local answer's energy only.
        let o = &response.outcome;
        assert!(o.cost_usd.is_finite() && (0.0..0.001).contains(&o.cost_usd), "turn {turn}: {}", o.cost_usd);
        let left = o.budget_left.cost_usd;
        assert!(left.is_finite() && left > 4.99, "turn {turn}: {left} left of 5.0");
    }
    // Every turn is in the log with its refused attempt.
    let log_path = state.path().join("outcomes.sqlite");
    let started = Instant::now();
    loop {
        let rows = OutcomeLog::open_read_only(&log_path).expect("log").all_rows().expect("rows");
        if rows.len() == costs.len() {
            for row in &rows {
                let attempt = row.outcome.cloud_attempt.as_ref().expect("attempt");
                assert_eq!(attempt.outcome, "invalid_reply", "{attempt:?}");
            }
            break;
        }
        assert!(started.elapsed() < WAIT, "{} rows logged of {}", rows.len(), costs.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rogue.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_a_text_only_backend_gets_no_views_the_device_never_pays_to_send_them() {
    let state = tempfile::tempdir().expect("tempdir");
    // The policy prefers every view, then the cloud without views, then local.
    let all = Action::Cloud { modalities: ModalitySet::all(3) };
    let bare = Action::Cloud { modalities: ModalitySet::from_indices([]) };
    let policy = policy_with_biases(state.path(), &[(all, 10.0), (bare, 7.0), (Action::Local, 5.0)]);
    // The bridge says (retained) that its backend takes no attachments.
    let mut path = CloudPath::start(state.path(), "[]", &policy).await;
    let client = path.daemon.client();
    let started = Instant::now();
    while client.status().await.expect("status")["cloud"]["accepts"] != serde_json::json!([]) {
        assert!(started.elapsed() < WAIT, "the bridge's capabilities never reached the device");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dialogue = client.new_dialogue().await.expect("dialogue").dialogue_id;
    let answered = ask(&client, &dialogue, "What can I cook with what is on the counter?").await;
    assert_eq!(answered.decision.action, "cloud");
    assert!(answered.decision.modalities.is_empty(), "{:?}", answered.decision.modalities);
    assert_eq!(answered.outcome.route, "cloud");
    let request = path.next_request().await;
    assert!(request.attachments.is_empty(), "{} attachments sent", request.attachments.len());
    path.stop().await;
}

/// A real JPEG, as an app would send a photo.
fn app_photo() -> Vec<u8> {
    let (w, h) = (64u16, 48u16);
    let pixels: Vec<u8> =
        (0..u32::from(w) * u32::from(h)).flat_map(|i| [(i % 251) as u8, (i / 7 % 256) as u8, 90]).collect();
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 80)
        .encode(&pixels, w, h, jpeg_encoder::ColorType::Rgb)
        .expect("jpeg");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_an_apps_own_image_goes_with_the_cloud_request_through_the_openai_api() {
    use base64::Engine as _;
    let state = tempfile::tempdir().expect("tempdir");
    let policy = cloud_preferring_policy(state.path());
    let mut path = CloudPath::start(state.path(), MULTI_MODAL, &policy).await;
    let client = path.daemon.client();
    let photo = app_photo();
    let url = format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(&photo));
    let body = serde_json::json!({
        "model": "tmo",
        "messages": [{ "role": "user", "content": [
            { "type": "text", "text": "What is in my photo?" },
            { "type": "image_url", "image_url": { "url": url } },
            { "type": "image_url", "image_url": { "url": "https://example.invalid/fridge.jpg" } },
        ]}],
    });
    let (status, bytes) = client
        .raw(hyper::Method::POST, "/v1/chat/completions", Some(body.to_string().into_bytes()))
        .await
        .expect("chat completion");
    let reply: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(status.as_u16(), 200, "{reply}");
    assert_eq!(reply["tmo"]["route"], "cloud", "{reply}");
    // The data URL went with the three views; the device does not fetch the https one.
    assert_eq!(reply["tmo"]["images_left_out"], 1, "{reply}");
    let request = path.next_request().await;
    let names: Vec<&str> = request.attachments.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["view-0", "view-1", "view-2", "app-image-0"]);
    assert_eq!(request.attachments[3].data, photo);

    // A malformed data URL is the app's error, said as OpenAI says it.
    let bad = body.to_string().replace(&url[30..60], "!!!!");
    let (status, bytes) = client
        .raw(hyper::Method::POST, "/v1/chat/completions", Some(bad.into_bytes()))
        .await
        .expect("request");
    assert_eq!(status.as_u16(), 400, "{}", String::from_utf8_lossy(&bytes));
    path.stop().await;
}

/// tmod's configuration for the streaming tests: a stream silent for a second has stalled
/// (`[cloud]` is `tmod_config`'s last table, so the key lands in it).
fn streaming_config(broker_port: u16, policy: &Path) -> String {
    format!("{}stall_secs = 1.0\n", tmod_config(broker_port, policy))
}

/// The log row of `dialogue`'s first turn, once it is written.
async fn logged_turn(state: &Path, dialogue: &str) -> outcome_log::LoggedOutcome {
    let log_path = state.join("outcomes.sqlite");
    let started = Instant::now();
    loop {
        if let Ok(log) = OutcomeLog::open_read_only(&log_path)
            && let Ok(Some(row)) = log.turn(dialogue, 0)
        {
            return row;
        }
        assert!(started.elapsed() < WAIT, "turn 0 of {dialogue} never logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks `question` and returns once its first token arrived, dropping the request (the client
/// goes away), with the dialogue id.
async fn ask_and_leave(client: &Client, question: &str) -> String {
    let dialogue = client.new_dialogue().await.expect("dialogue").dialogue_id;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let mut first_tx = Some(first_tx);
    let request = AskRequest::new(Some(&dialogue), question);
    let asking = client.ask(&request, |event| {
        if let AskEvent::Token(_) = event
            && let Some(tx) = first_tx.take()
        {
            let _ = tx.send(());
        }
    });
    tokio::select! {
        answered = asking => panic!("answered before the client left: {answered:?}"),
        _ = first_rx => {}
    }
    dialogue
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_answers_stream_through_tmod_and_end_cleanly_when_the_client_or_the_bridge_goes() {
    let state = tempfile::tempdir().expect("tempdir");
    let policy = cloud_preferring_policy(state.path());
    let broker = MosquittoBroker::start().expect("mosquitto (apt-get install mosquitto)");
    let pace = Duration::from_millis(100);
    let server = ChatServer::start(pace).await.expect("chat server");
    let bridge = bridge::start_bridge_openai(broker.port(), &server.base_url).await;
    let daemon = Daemon::start(state.path(), &streaming_config(broker.port(), &policy));
    let client = daemon.client();
    wait_cloud_reachable(&client, true).await;

    // The answer streams: its first token reaches the app while the backend still writes, the
    // tokens make up the answer, and the log row holds it whole.
    let dialogue = client.new_dialogue().await.expect("dialogue").dialogue_id;
    let mut tokens: Vec<(String, Instant)> = Vec::new();
    let response = client
        .ask(&AskRequest::new(Some(&dialogue), "ok what is for dinner?"), |event| {
            if let AskEvent::Token(piece) = event {
                tokens.push((piece.clone(), Instant::now()));
            }
        })
        .await
        .expect("ask");
    let done = Instant::now();
    assert_eq!(response.outcome.route, "cloud");
    assert_eq!(attempt(&response)["outcome"], "answered");
    assert_eq!(response.outcome.answer, answer_text(SHORT_WORDS));
    let streamed: String = tokens.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(streamed, response.outcome.answer);
    assert!(tokens.len() >= SHORT_WORDS / 2, "{} token events", tokens.len());
    let ahead = done - tokens[0].1;
    assert!(ahead >= pace * (SHORT_WORDS as u32 - 2), "first token only {ahead:?} before the end");
    assert!(
        response.outcome.time_to_first_token_secs < response.outcome.latency_secs - 0.5,
        "{} s to the first token of {} s",
        response.outcome.time_to_first_token_secs,
        response.outcome.latency_secs
    );
    let served = &server.served()[0];
    let behind = tokens[0].1 - served.word_times[0];
    assert!(behind < Duration::from_millis(500), "first token {behind:?} after the backend's");
    assert_eq!(logged_turn(state.path(), &dialogue).await.outcome.answer, response.outcome.answer);

    // The same through OpenAI's API: one content delta per piece, then the last chunk's account.
    let body = serde_json::json!({
        "model": "tmo-cloud", "stream": true,
        "messages": [{ "role": "user", "content": "ok and for dessert?" }],
    });
    let (status, bytes) = client
        .raw(hyper::Method::POST, "/v1/chat/completions", Some(body.to_string().into_bytes()))
        .await
        .expect("chat completion");
    assert_eq!(status.as_u16(), 200);
    let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
    let chunks: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk"))
        .collect();
    let deltas: Vec<&str> =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(deltas.len() >= SHORT_WORDS / 2, "{text}");
    assert_eq!(deltas.concat(), answer_text(SHORT_WORDS));
    let last = chunks.iter().rev().find(|c| c["tmo"]["route"].is_string()).expect("the account");
    assert_eq!(last["tmo"]["route"], "cloud", "{last}");
    assert_eq!(last["model"], "gpt-test", "{last}");

    // The client goes away after the first token: the backend's stream is dropped, and the turn
    // is logged as cancelled with what was shown.
    let dialogue = ask_and_leave(&client, "long story for the client who leaves").await;
    let ended = server.wait_ended("long story for the client", WAIT).await.expect("ended");
    assert_eq!(ended.ended, Some(Ended::Dropped));
    let row = logged_turn(state.path(), &dialogue).await;
    let cloud = row.outcome.cloud_attempt.expect("cloud attempt");
    assert_eq!(cloud.outcome, "cancelled", "{cloud:?}");
    assert!(row.outcome.answer.starts_with("w0 "), "{:?}", row.outcome.answer);

    // The bridge goes mid-stream: after a second of silence the turn ends with what arrived and
    // says so; it does not wait for its deadline, nor answer again locally.
    let dialogue = client.new_dialogue().await.expect("dialogue").dialogue_id;
    let mut first = None;
    let mut shown = String::new();
    let mut bridge = Some(bridge);
    let response = client
        .ask(&AskRequest::new(Some(&dialogue), "long story the bridge will not finish"), |event| {
            if let AskEvent::Token(piece) = event {
                shown.push_str(piece);
                if let Some(bridge) = bridge.take() {
                    first = Some(Instant::now());
                    bridge.task.abort();
                }
            }
        })
        .await
        .expect("ask");
    let took = first.expect("a first token").elapsed();
    assert_eq!(response.outcome.route, "cloud");
    assert_eq!(response.outcome.finish, "cloud_partial");
    assert_eq!(attempt(&response)["outcome"], "stalled", "{:?}", response.outcome.cloud_attempt);
    assert_eq!(response.outcome.answer, shown);
    assert!(shown.starts_with("w0 ") && shown.len() < answer_text(60).len(), "{shown:?}");
    assert!(took < Duration::from_secs(10), "ended {took:?} after the bridge went");
    assert!(response.outcome.cost_usd > 0.0, "charged the expected price");
}

//! Bench binary (prints figures): what the bridge adds to a cloud request.
//!
//! 1. MQTT path on loopback against a chat-completions server (axum, in this process) that
//!    answers at once: round trip of a request with three 640x480 JPEG frames (device publish
//!    -> bridge -> HTTP -> bridge -> device), median and p99; then pipelined text-only requests
//!    per second through one bridge process.
//! 2. Candle backend (SmolLM2-135M): the same questions answered by a direct `Engine::chat` in
//!    this process and through the bridge; the difference is the bridge's overhead.
//!
//! `cargo bench -p tmo-cloud --bench bridge_overhead` (Mosquitto and the smollm2-135m model
//! installed). Figures are noisy when other builds share the CPU: repeat.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::post;
use llm_engine::{Engine, EngineConfig, GenerationParams, resolve_model};
use serde_json::{Value, json};
use tmo_cloud::bridge::unix_ms_now;
use tmo_protocol::link::{Link, LinkConfig, LinkSetup, Message, QoS, Subscription};
use tmo_protocol::testing::MosquittoBroker;
use tmo_protocol::{
    Attachment, CborMessage, CloudReply, CloudRequest, DeviceId, Inbox, MediaType, ReassemblyLimits,
    ReplyResult, RequestId, Topic,
};

struct Bridge {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn_bridge(broker: &MosquittoBroker, client_id: &str, backend: &str) -> Bridge {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tmo-cloud.toml");
    std::fs::write(
        &config,
        format!(
            "share_group = \"bench\"\nmax_concurrent_requests = 64\n\
             [per_device]\nin_flight = 100000\nrequests_per_minute = 100000000\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {}\nclient_id = \"{client_id}\"\nmax_packet_bytes = 4194304\n\
             incoming_capacity = 2048\noutgoing_capacity = 2048\n{backend}",
            broker.port()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tmo-cloud"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let needle = format!("Sending SUBACK to {client_id}");
    let started = Instant::now();
    while !broker.log().contains(&needle) {
        assert!(started.elapsed() < Duration::from_secs(60), "bridge did not subscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Bridge { child, _dir: dir }
}

fn jpeg_640x480(seed: u32) -> Vec<u8> {
    let (w, h) = (640u16, 480u16);
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    let mut pixels = Vec::with_capacity(usize::from(w) * usize::from(h) * 3);
    for row in 0..h {
        for col in 0..w {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let noise = (x % 24) as u8;
            pixels.extend_from_slice(&[
                ((col / 3) as u8).wrapping_add(noise),
                ((row / 2) as u8).wrapping_add(noise),
                128 + noise,
            ]);
        }
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 80).encode(&pixels, w, h, jpeg_encoder::ColorType::Rgb).unwrap();
    out
}

struct Device {
    link: Link,
    inbox: Inbox,
    id: DeviceId,
}

impl Device {
    async fn start(broker: &MosquittoBroker, name: &str) -> Self {
        let id = DeviceId::new(name).unwrap();
        let mut config = LinkConfig::new("127.0.0.1", broker.port(), name);
        config.max_packet_bytes = 4 << 20;
        config.incoming_capacity = 4096;
        config.outgoing_capacity = 4096;
        let link = Link::start(
            &config,
            LinkSetup {
                availability_topic: None,
                subscriptions: vec![Subscription::new(
                    Topic::CloudReply(id.clone()).name(),
                    QoS::AtLeastOnce,
                )],
            },
        )
        .unwrap();
        assert!(link.wait_connected(Duration::from_secs(10)).await);
        Self { link, inbox: Inbox::new(ReassemblyLimits::default()), id }
    }

    fn request(&self, question: &str, frames: &[Vec<u8>], max_tokens: u32) -> CloudRequest {
        CloudRequest {
            request_id: RequestId::generate(),
            device_id: self.id.clone(),
            dialogue_id: "bench".into(),
            turn: 0,
            task: "Query".into(),
            question: question.into(),
            history: vec![],
            attachments: frames
                .iter()
                .enumerate()
                .map(|(i, d)| Attachment {
                    modality: i as u8,
                    name: format!("camera-{i}"),
                    media_type: MediaType::ImageJpeg,
                    data: d.clone(),
                })
                .collect(),
            deadline_unix_ms: unix_ms_now() + 120_000,
            max_tokens,
            stream: false,
        }
    }

    async fn send(&self, request: &CloudRequest) {
        send(&self.link.publisher(), request).await;
    }

    async fn reply(&mut self) -> CloudReply {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(120), self.link.incoming.recv())
                .await
                .expect("reply in time")
                .unwrap();
            if let Some(r) = self.inbox.receive::<CloudReply>(&m.topic, &m.payload, Instant::now()) {
                if let ReplyResult::Error(e) = &r.result {
                    panic!("error reply {e:?}");
                }
                return r;
            }
        }
    }
}

async fn send(publisher: &tmo_protocol::link::Publisher, request: &CloudRequest) {
    let template = Message {
        response_topic: Some(Topic::CloudReply(request.device_id.clone()).name()),
        correlation_data: Some(request.request_id.to_correlation_data()),
        ..Message::new(request.topic().name(), QoS::AtLeastOnce, Vec::new())
    };
    publisher.publish_body(&template, &request.to_cbor().unwrap()).await.unwrap();
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!("median {:.2} ms, p99 {:.2} ms (n = {})", percentile(&ms, 0.5), percentile(&ms, 0.99), ms.len())
}

async fn instant_server() -> String {
    async fn answer(Json(body): Json<Value>) -> Json<Value> {
        Json(json!({
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}
        }))
    }
    let app = axum::Router::new().route("/v1/chat/completions", post(answer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn mqtt_path(broker: &MosquittoBroker) {
    let base_url = instant_server().await;
    let backend = format!(
        "[backend]\nkind = \"openai\"\nbase_url = \"{base_url}\"\nmodel = \"instant\"\n\
         [prices.instant]\nprompt_per_million_usd = 1.0\ncompletion_per_million_usd = 1.0\n"
    );
    let _bridge = spawn_bridge(broker, "bench-openai", &backend).await;
    let mut device = Device::start(broker, "bench-dev").await;
    let frames: Vec<Vec<u8>> = (1..=3).map(jpeg_640x480).collect();
    let sizes: Vec<usize> = frames.iter().map(Vec::len).collect();
    let (mut round_trips, mut outside_backend) = (Vec::new(), Vec::new());
    for i in 0..220 {
        let request = device.request(&format!("question {i}"), &frames, 16);
        let started = Instant::now();
        device.send(&request).await;
        let reply = device.reply().await;
        let rt = started.elapsed().as_secs_f64() * 1e3;
        if i >= 20 {
            round_trips.push(rt);
            outside_backend.push(rt - f64::from(reply.backend_latency_ms));
        }
    }
    println!("three 640x480 JPEG frames {sizes:?} bytes, backend answering at once:");
    println!("  round trip device -> bridge -> HTTP -> device: {}", summary(round_trips));
    println!("  round trip minus backend_latency_ms (ms resolution): {}", summary(outside_backend));

    let n = 2000;
    let requests: Vec<CloudRequest> = (0..n).map(|i| device.request(&format!("t {i}"), &[], 16)).collect();
    let started = Instant::now();
    let publisher = device.link.publisher();
    let sender = async {
        for r in &requests {
            send(&publisher, r).await;
        }
    };
    let link_incoming = &mut device.link.incoming;
    let inbox = &mut device.inbox;
    let receiver = async {
        let mut got = 0;
        while got < n {
            let m =
                tokio::time::timeout(Duration::from_secs(60), link_incoming.recv()).await.unwrap().unwrap();
            if inbox.receive::<CloudReply>(&m.topic, &m.payload, Instant::now()).is_some() {
                got += 1;
            }
        }
    };
    tokio::join!(sender, receiver);
    let secs = started.elapsed().as_secs_f64();
    println!("  {n} pipelined text-only requests through one bridge: {:.0} requests/s", n as f64 / secs);
}

async fn candle_overhead(broker: &MosquittoBroker) {
    let questions = [
        "What can I cook with leeks?",
        "How long do I boil an egg?",
        "Is cast iron good for steak?",
        "How do I keep basil fresh?",
        "What goes well with salmon?",
        "How much salt for pasta water?",
    ];
    let max_tokens = 16u32;
    let system = "You are a helpful kitchen assistant. Answer briefly and concretely.";
    let device_id = DeviceId::new("bench-candle").unwrap();
    // Direct calls in this process.
    let mut direct = Vec::new();
    {
        let path = resolve_model("smollm2-135m").expect("smollm2-135m installed");
        let mut engine = Engine::load(&path, &EngineConfig::default()).unwrap();
        for q in questions {
            let request = CloudRequest {
                request_id: RequestId(1),
                device_id: device_id.clone(),
                dialogue_id: "bench".into(),
                turn: 0,
                task: "Query".into(),
                question: q.into(),
                history: vec![],
                attachments: vec![],
                deadline_unix_ms: 0,
                stream: false,
                max_tokens,
            };
            let messages = tmo_cloud::candle::chat_messages(&request, system);
            let params = GenerationParams {
                max_tokens: max_tokens as usize,
                deadline: Some(Instant::now() + Duration::from_secs(120)),
                ..GenerationParams::default()
            };
            let started = Instant::now();
            let g = engine.chat(&messages, &params, None, &mut |_| {}).unwrap();
            direct.push((started.elapsed().as_secs_f64() * 1e3, g.report.generated_tokens));
        }
    }
    let backend = "[backend]\nkind = \"candle\"\nmodel = \"smollm2-135m\"\n\
                   [prices.\"smollm2-135m\"]\nprompt_per_million_usd = 0.0\ncompletion_per_million_usd = 0.0\n";
    let _bridge = spawn_bridge(broker, "bench-candle-bridge", backend).await;
    let mut device = Device::start(broker, "bench-candle").await;
    let mut bridged = Vec::new();
    for q in questions {
        let request = device.request(q, &[], max_tokens);
        let started = Instant::now();
        device.send(&request).await;
        let reply = device.reply().await;
        let tokens = match &reply.result {
            ReplyResult::Answer(a) => a.completion_tokens as usize,
            ReplyResult::Error(_) => 0,
        };
        bridged.push((started.elapsed().as_secs_f64() * 1e3, tokens, reply.backend_latency_ms));
    }
    println!("candle smollm2-135m, {max_tokens} tokens at most, same questions (first one cold):");
    for (i, ((d, dt), (b, bt, backend_ms))) in direct.iter().zip(&bridged).enumerate() {
        println!(
            "  q{i}: direct {d:.0} ms ({dt} tokens), through the bridge {b:.0} ms ({bt} tokens, backend {backend_ms} ms): +{:.0} ms",
            b - d
        );
    }
    let warm = |v: Vec<f64>| {
        let mut v = v[1..].to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let d = warm(direct.iter().map(|x| x.0).collect());
    let b = warm(bridged.iter().map(|x| x.0).collect());
    println!("  warm medians: direct {d:.0} ms, bridge round trip {b:.0} ms, difference {:.0} ms", b - d);
    let outside: Vec<f64> = bridged.iter().map(|(rt, _, backend)| rt - f64::from(*backend)).collect();
    println!("  bridge round trip minus backend_latency_ms: {}", summary(outside));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !Path::new(tmo_protocol::testing::DEFAULT_MOSQUITTO).exists()
        && std::env::var_os("MOSQUITTO").is_none()
    {
        eprintln!("mosquitto not installed: bench skipped");
        return;
    }
    let broker = MosquittoBroker::start().unwrap();
    mqtt_path(&broker).await;
    candle_overhead(&broker).await;
}

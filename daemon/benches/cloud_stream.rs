//! Streamed cloud answers through the device, measured on a real `tmod run` process, a real
//! Mosquitto on loopback and the cloud bridge (`tmo-cloud`'s loop, in this process), against an
//! OpenAI-compatible server that writes one word every `--pace-ms` (`tmo_cloud::testing`):
//! - time to the first token: the backend's own (its stream read directly by the bridge's
//!   OpenAI client, as any client would read it) against the app's through tmod (`/v1/ask`,
//!   cloud route: the question classified and decided, the request over MQTT, the bridge, the
//!   backend, the first piece back over MQTT);
//! - the extra latency of each streamed word: when the app receives it through tmod, less when
//!   the server wrote it, against the same for the direct stream (one clock: the server, the
//!   bridge and the app are this process).
//!
//! `cargo bench -p daemon --bench cloud_stream [-- --turns N --pace-ms P --batch-ms B --named-task 1]`
//! (`--named-task 1`: the app names the task, so the device's classifier does not run;
//! `--tcp 1`: the app speaks to tmod over loopback TCP instead of its Unix socket).
//! Needs mosquitto and the models (`tmoctl model fetch smollm2-135m all-minilm-l6-v2`).

use std::path::Path;
use std::time::{Duration, Instant};

use tmo_cloud::testing::{ChatServer, SHORT_WORDS};
use tmo_protocol::testing::MosquittoBroker;
use tmo_protocol::{CloudRequest, DeviceId, RequestId};
use tmod_api::{AskEvent, AskRequest, ForcedRoute};
use tokio_util::sync::CancellationToken;

#[path = "../tests/support/daemon.rs"]
mod daemon;
#[path = "support/figures.rs"]
mod figures;

use figures::{arg, summary};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The word indices in a piece of text (`w3 w4 ` holds 3 and 4).
fn words_in(text: &str) -> Vec<usize> {
    text.split_whitespace().filter_map(|w| w.strip_prefix('w')?.parse().ok()).collect()
}

/// Each word's delay: when it arrived less when the server wrote it.
fn word_delays(arrivals: &[(String, Instant)], written: &[Instant]) -> Vec<f64> {
    arrivals
        .iter()
        .flat_map(|(text, at)| words_in(text).into_iter().map(move |w| (w, *at)))
        .filter_map(|(w, at)| written.get(w).map(|t| ms(at.saturating_duration_since(*t))))
        .collect()
}

fn bridge_config(broker_port: u16, base_url: &str, batch_ms: u64) -> tmo_cloud::config::Config {
    let text = format!(
        "share_group = \"bridges\"\nreply_margin_ms = 100\nstream_batch_ms = {batch_ms}\n\
         [per_device]\nin_flight = 4\nrequests_per_minute = 100000\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {broker_port}\nclient_id = \"bench-bridge\"\n\
         max_packet_bytes = 1048576\n\
         [backend]\nkind = \"openai\"\nbase_url = \"{base_url}\"\nmodel = \"gpt-test\"\n\
         [prices.\"gpt-test\"]\nprompt_per_million_usd = 2.5\ncompletion_per_million_usd = 10.0\n"
    );
    tmo_cloud::config::Config::parse(&text, Path::new("bridge.toml")).expect("bridge config")
}

fn main() {
    let turns = arg("--turns", 60) as usize;
    let pace = Duration::from_millis(arg("--pace-ms", 30));
    let batch_ms = arg("--batch-ms", 20);
    let named_task = arg("--named-task", 0) == 1;
    let tcp = (arg("--tcp", 0) == 1).then(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("address")
    });
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let broker = MosquittoBroker::start().expect("mosquitto (apt-get install mosquitto)");
    let server = runtime.block_on(ChatServer::start(pace)).expect("chat server");
    let config = bridge_config(broker.port(), &server.base_url, batch_ms);
    let backend = tmo_cloud::build_backend(&config.file.backend).expect("backend");
    let direct = match tmo_cloud::build_backend(&config.file.backend).expect("backend") {
        tmo_cloud::backend::Backend::OpenAi(b) => b,
        tmo_cloud::backend::Backend::Candle(_) => unreachable!("configured as openai"),
    };
    let stop = CancellationToken::new();
    let bridge = runtime.spawn(tmo_cloud::bridge::run(config, backend, None, stop.clone()));
    let state = tempfile::tempdir().expect("tempdir");
    let mut tmod = daemon::Daemon::start(
        state.path(),
        &format!(
            "[dialogues]\nmax_active = 4096\nlatency_budget_secs = 600.0\ncost_budget_usd = 5.0\n\
             [mqtt]\nenabled = true\nhost = \"127.0.0.1\"\nport = {}\n\
             [cloud]\nmax_wait_secs = 30.0\n{}",
            broker.port(),
            tcp.map(|addr| format!("[api]\ntcp = \"{addr}\"\n")).unwrap_or_default()
        ),
    );
    let client = match tcp {
        Some(addr) => tmod_api::Client::new(tmod_api::Endpoint::Tcp(addr)),
        None => tmod.client(),
    };
    let questions = [
        "ok how long do I bake a potato at 200 degrees?",
        "ok make this message friendlier: dinner is at seven.",
        "ok what goes well with grilled salmon?",
        "ok which of these spices is missing from the rack?",
    ];

    // The backend read directly, as the bridge reads it.
    let (mut direct_first, mut direct_words) = (Vec::new(), Vec::new());
    runtime.block_on(async {
        for i in 0..turns + 5 {
            let request = CloudRequest {
                request_id: RequestId::generate(),
                device_id: DeviceId::new("bench").expect("id"),
                dialogue_id: "bench".into(),
                turn: 0,
                task: "Query".into(),
                question: questions[i % questions.len()].into(),
                history: Vec::new(),
                attachments: Vec::new(),
                deadline_unix_ms: u64::MAX,
                max_tokens: 64,
                stream: true,
            };
            let (pieces, mut received) = tokio::sync::mpsc::unbounded_channel();
            let sent = Instant::now();
            let arrivals = tokio::spawn(async move {
                let mut arrivals = Vec::new();
                while let Some(piece) = received.recv().await {
                    arrivals.push((piece, Instant::now()));
                }
                arrivals
            });
            let deadline = Instant::now() + Duration::from_secs(30);
            direct.answer(&request, "You are brief.", deadline, Some(&pieces)).await.expect("answer");
            drop(pieces);
            let arrivals = arrivals.await.expect("arrivals");
            if i < 5 {
                continue; // warm-up
            }
            let written = server.served().last().expect("served").word_times.clone();
            direct_first.push(ms(arrivals[0].1 - sent));
            direct_words.extend(word_delays(&arrivals, &written));
        }
    });

    // Through tmod: the cloud route forced, so that every turn goes to the cloud.
    let (mut first, mut words, mut decided, mut gaps) = (Vec::new(), Vec::new(), Vec::new(), 0usize);
    let (mut classified, mut attached) = (Vec::new(), Vec::new());
    runtime.block_on(async {
        let mut status = client.status().await.expect("status");
        while status["cloud"]["reachable"] != true {
            tokio::time::sleep(Duration::from_millis(50)).await;
            status = client.status().await.expect("status");
        }
        for i in 0..turns + 5 {
            let mut request = AskRequest::new(None, questions[i % questions.len()]);
            request.route = Some(ForcedRoute::Cloud);
            if named_task {
                request.task = Some("Query".into());
            }
            let mut arrivals = Vec::new();
            let sent = Instant::now();
            let response = client
                .ask(&request, |event| {
                    if let AskEvent::Token(piece) = event {
                        arrivals.push((piece.clone(), Instant::now()));
                    }
                })
                .await
                .expect("ask");
            assert_eq!(response.outcome.route, "cloud", "{:?}", response.outcome.cloud_attempt);
            if i < 5 {
                continue;
            }
            let written = server.served().last().expect("served").word_times.clone();
            let delays = word_delays(&arrivals, &written);
            gaps += SHORT_WORDS - delays.len();
            first.push(ms(arrivals[0].1 - sent));
            words.extend(delays);
            let t = response.outcome.timings;
            decided.push(t.decode_ms + t.classify_ms + t.decide_ms + t.attach_ms);
            classified.push(t.classify_ms);
            attached.push(t.attach_ms);
        }
    });
    println!(
        "streamed cloud answers: {turns} turns of {SHORT_WORDS} words, one every {} ms; bridge batch {batch_ms} ms; \
         task {}",
        pace.as_millis(),
        if named_task { "named by the app" } else { "classified on the device" }
    );
    println!(
        "the app speaks to tmod over {}",
        if tcp.is_some() { "loopback TCP" } else { "its Unix socket" }
    );
    let own = summary("backend's own first token (direct stream)", direct_first);
    let through = summary("first token through tmod (/v1/ask, cloud)", first);
    summary("  of which decided on the device", decided);
    summary("    classify (the task, MiniLM)", classified);
    summary("    attach (the views captured, JPEG)", attached);
    println!("{:<44} median {:>8.3} ms", "  first token through tmod - backend's own", through - own);
    let direct_word = summary("word delay, direct stream", direct_words);
    let tmod_word = summary("word delay through MQTT and tmod", words);
    println!("{:<44} median {:>8.3} ms", "  extra per word through tmod", tmod_word - direct_word);
    if gaps > 0 {
        println!("  ({gaps} words not seen in a token event)");
    }
    stop.cancel();
    let _ = runtime.block_on(bridge);
    tmod.kill();
}

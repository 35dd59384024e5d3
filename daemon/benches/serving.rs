//! The serving figures of the issue, measured on a real `tmod run` process:
//! - API overhead per request excluding generation (decode, classify, decide, log and the
//!   HTTP/SSE round trip over the Unix socket), median and tail, for `/v1/ask` and for OpenAI's
//!   `/v1/chat/completions` (a growing conversation, as a stateless client resends it);
//! - CPU of the idle daemon with its models loaded.
//!
//! `cargo bench -p daemon --bench serving [-- --requests N --idle-secs S]`
//! Needs the models installed (`tmoctl model fetch smollm2-135m all-minilm-l6-v2`).

use std::time::{Duration, Instant};

use tmod_api::AskRequest;

#[path = "../tests/support/daemon.rs"]
mod daemon;
#[path = "support/figures.rs"]
mod figures;

use figures::{arg, summary};

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

fn main() {
    let requests = arg("--requests", 200) as usize;
    let idle_secs = arg("--idle-secs", 30);
    let state = tempfile::tempdir().expect("tempdir");
    let mut tmod =
        daemon::Daemon::start(state.path(), "[model]\nmax_tokens = 1\n[dialogues]\nmax_active = 64\n");
    let client = tmod.client();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let questions = [
        "How long do I bake a potato at 200 degrees?",
        "Make this message friendlier: dinner is at seven, do not be late.",
        "What goes well with grilled salmon?",
        "Set a timer reminder for the pasta in nine minutes.",
        "Which of these spices is missing from the rack?",
    ];
    let (mut server, mut round_trip, mut classify, mut decide, mut log) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    runtime.block_on(async {
        let mut dialogue = None;
        for i in 0..requests + 10 {
            if i % 5 == 0 {
                dialogue = Some(client.new_dialogue().await.expect("dialogue").dialogue_id);
            }
            let request = AskRequest::new(dialogue.as_deref(), questions[i % questions.len()]);
            let sent = Instant::now();
            let response = client.ask(&request, |_| {}).await.expect("ask");
            let elapsed_ms = sent.elapsed().as_secs_f64() * 1e3;
            if i < 10 {
                continue; // warm-up
            }
            let t = response.outcome.timings;
            server.push(t.overhead_ms());
            round_trip.push(elapsed_ms - t.generate_ms - t.queue_ms);
            classify.push(t.classify_ms);
            decide.push(t.decide_ms);
            log.push(t.log_ms);
        }
    });
    // The same questions through OpenAI's API: each conversation grows to five turns, resent
    // whole every time, as the SDKs do.
    let (mut chat_server, mut chat_round_trip) = (Vec::new(), Vec::new());
    runtime.block_on(async {
        let mut messages = Vec::new();
        for i in 0..requests + 10 {
            if i % 5 == 0 {
                messages.clear();
            }
            messages.push(serde_json::json!({ "role": "user", "content": questions[i % questions.len()] }));
            let body = serde_json::json!({ "model": "tmo", "messages": messages }).to_string().into_bytes();
            let sent = Instant::now();
            let (status, bytes) = client
                .raw(hyper::Method::POST, "/v1/chat/completions", Some(body))
                .await
                .expect("chat completion");
            let elapsed_ms = sent.elapsed().as_secs_f64() * 1e3;
            assert!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&bytes));
            let reply: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
            let answer = reply["choices"][0]["message"]["content"].clone();
            messages.push(serde_json::json!({ "role": "assistant", "content": answer }));
            if i < 10 {
                continue;
            }
            let t: tmod_api::Timings =
                serde_json::from_value(reply["tmo"]["timings"].clone()).expect("timings");
            chat_server.push(t.overhead_ms());
            chat_round_trip.push(elapsed_ms - t.generate_ms - t.queue_ms);
        }
    });
    println!("tmod API overhead, excluding generation ({requests} requests, 1 generated token each)");
    summary("/v1/ask on the daemon", server);
    summary("/v1/ask client round trip", round_trip);
    summary("  classify", classify);
    summary("  decide", decide);
    summary("  outcome log (durable)", log);
    summary("chat on the daemon", chat_server);
    summary("chat client round trip", chat_round_trip);

    std::thread::sleep(Duration::from_secs(5));
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let before = cpu_ticks(tmod.pid());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let used = (cpu_ticks(tmod.pid()) - before) as f64 / ticks_per_sec;
    println!(
        "idle daemon, models loaded: {:.2}% of one core over {idle_secs} s (sensing at the x86-dev profile's rates)",
        100.0 * used / idle_secs as f64
    );
    tmod.kill();
}

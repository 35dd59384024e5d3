//! End to end, decisions that follow the live link: Mosquitto on a free loopback port, the
//! bridge (candle, Gemma 3 270M) on it, and `tmod run` with the default v2 policy reaching the
//! broker through a TCP proxy that the test slows down (one-way delay, upload rate) and
//! restores. The device's expected cost table follows the link (request PUBACK times and the
//! idle probe), and its decisions follow the table: fewer attachments or local on the slow
//! link, the cloud back once it recovers, and no dialogue over its budget. The test name holds
//! `cloud` so that `cargo test -- cloud` selects it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tmo_protocol::testing::{MosquittoBroker, ShapedProxy};
use tmod_api::{AskRequest, AskResponse, Client};

#[path = "support/bridge.rs"]
mod bridge;
#[path = "support/daemon.rs"]
mod daemon;

use bridge::{start_bridge, wait_cloud_reachable};
use daemon::Daemon;

/// Attachments a turn sent (-1: answered locally by choice).
fn attached(response: &AskResponse) -> i32 {
    if response.decision.action == "cloud" { response.decision.modalities.len() as i32 } else { -1 }
}

/// Plays `dialogues` dialogues of `turns` turns; returns every turn's response.
async fn play(client: &Client, dialogues: usize, turns: usize) -> Vec<AskResponse> {
    let questions = [
        "What can I cook with what is on the counter?",
        "Is the pan hot enough yet?",
        "How long should the pasta boil?",
        "Rewrite my shopping list more clearly.",
    ];
    let mut out = Vec::new();
    for _ in 0..dialogues {
        let dialogue = client.new_dialogue().await.expect("dialogue").dialogue_id;
        for question in questions.iter().cycle().take(turns) {
            let response =
                client.ask(&AskRequest::new(Some(&dialogue), question), |_| {}).await.expect("ask");
            let left = &response.outcome.budget_left;
            assert!(left.latency_secs >= 0.0 && left.cost_usd >= 0.0, "over budget: {:?}", response.outcome);
            out.push(response);
        }
    }
    out
}

fn mean_attached(responses: &[AskResponse]) -> f64 {
    responses.iter().map(|r| f64::from(attached(r).max(0))).sum::<f64>() / responses.len().max(1) as f64
}

async fn cost_model(client: &Client) -> serde_json::Value {
    client.status().await.expect("status")["cost_model"].clone()
}

/// Waits until the estimated round trip satisfies `done` (the probe runs every 0.3 s).
async fn wait_rtt(client: &Client, done: impl Fn(f64) -> bool) -> f64 {
    let started = Instant::now();
    loop {
        let rtt = cost_model(client).await["rtt_secs"].as_f64().expect("rtt_secs");
        if done(rtt) {
            return rtt;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the estimated round trip stays at {rtt} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_decisions_follow_a_link_that_slows_down_and_recovers() {
    let state = tempfile::tempdir().expect("tempdir");
    let broker = MosquittoBroker::start().expect("mosquitto (apt-get install mosquitto)");
    let proxy = ShapedProxy::start(SocketAddr::from(([127, 0, 0, 1], broker.port()))).expect("proxy");
    let bridge = start_bridge(broker.port()).await;
    // The default policy (v2), the x86-dev board's table and its 30 s dialogue budget.
    let config = format!(
        "[model]\nmax_tokens = 16\n\
         [dialogues]\nlatency_budget_secs = 30.0\ncost_budget_usd = 0.05\n\
         [mqtt]\nenabled = true\nhost = \"127.0.0.1\"\nport = {}\n\
         reconnect_initial_ms = 50\nreconnect_max_ms = 500\n\
         [cloud]\nmax_wait_secs = 30.0\nmax_tokens = 16\nprobe_interval_secs = 0.3\n\
         [fleet]\nupload = false\n",
        proxy.port()
    );
    let daemon = Daemon::start(state.path(), &config);
    let client = daemon.client();
    wait_cloud_reachable(&client, true).await;
    let status = client.status().await.expect("status");
    assert_eq!(status["policy"]["version"].as_str().map(|v| v.starts_with("tmo-plan-")), Some(true));

    // A fast link: the bridge's real answers replace the profile's 5-7 s cloud figures.
    let fast = play(&client, 4, 3).await;
    assert!(fast.iter().all(|r| r.decision.policy_schema == "tmo-obs-v2"), "the default policy reads v2");
    let fast_tail = &fast[6..];
    let fast_attached = mean_attached(fast_tail);
    assert!(
        fast_tail.iter().any(|r| attached(r) > 0),
        "views attached on a fast link: {:?}",
        fast_tail.iter().map(attached).collect::<Vec<_>>()
    );
    let fast_rtt = wait_rtt(&client, |rtt| rtt < 0.1).await;
    let fast_costs = fast_tail.last().expect("turns").decision.expected_costs.clone();

    // Outcome uploads are off: with no collector they would be sent again and again, and a
    // batch of a dozen rows (about 20 kB) holds a 500 B/s uplink for 40 s, so the probe's PUBACK
    // would wait behind it (a real 4G uplink carries it in a fraction of a second).
    // A congested uplink: 250 ms each way, 500 B/s up. A test-pattern view is about 5 kB, so a
    // view costs about 10 s, as an image does on the paper's 4G table: the 30 s budget binds,
    // and the reward (costs min-max normalised over the classes, as the paper's) leaves the
    // budget as what moves the choice. The probe sees the round trip within a
    // second, the first requests with views the upload rate.
    proxy.set_delay(Duration::from_millis(250));
    proxy.set_upload_rate(Some(500));
    let slow_rtt = wait_rtt(&client, |rtt| rtt > 0.35).await;
    let slow = play(&client, 3, 3).await;
    let slow_tail = &slow[3..];
    let slow_costs = slow_tail.last().expect("turns").decision.expected_costs.clone();
    eprintln!(
        "attached fast {:?}, slow {:?}; expected costs fast {fast_costs:?}, slow {slow_costs:?}",
        fast.iter().map(attached).collect::<Vec<_>>(),
        slow.iter().map(attached).collect::<Vec<_>>()
    );
    // Every cloud class now expects at least the added round trip (0.5 s).
    for k in 1..slow_costs.latency_secs.len() {
        assert!(
            slow_costs.latency_secs[k] > fast_costs.latency_secs[k] + 0.4,
            "cloud class {k} follows the slower link: {fast_costs:?} -> {slow_costs:?}"
        );
    }
    let slow_attached = mean_attached(slow_tail);
    assert!(
        slow_attached < fast_attached,
        "fewer attachments on the slow link: {fast_attached} -> {slow_attached} ({:?})",
        slow_tail.iter().map(attached).collect::<Vec<_>>()
    );

    // The link recovers: the probe notices without a turn, and the cloud comes back.
    proxy.set_delay(Duration::ZERO);
    proxy.set_upload_rate(None);
    let recovered_rtt = wait_rtt(&client, |rtt| rtt < 0.1).await;
    let recovered = play(&client, 3, 3).await;
    assert!(
        recovered.iter().any(|r| r.decision.action == "cloud" && r.outcome.route == "cloud"),
        "the cloud answers again: {:?}",
        recovered.iter().map(attached).collect::<Vec<_>>()
    );
    eprintln!(
        "rtt {fast_rtt:.3} -> {slow_rtt:.3} -> {recovered_rtt:.3} s; attached fast {:?}, slow {:?}, recovered {:?}",
        fast.iter().map(attached).collect::<Vec<_>>(),
        slow.iter().map(attached).collect::<Vec<_>>(),
        recovered.iter().map(attached).collect::<Vec<_>>()
    );
    bridge.stop.cancel();
    drop(broker);
}

//! The cloud bridge in the test's process (the real `tmo-cloud` loop and candle backend on
//! Gemma 3 270M), and waiting for tmod to see the cloud.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use tmod_api::Client;
use tokio_util::sync::CancellationToken;

/// A running bridge; `stop` ends it.
pub struct Bridge {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts a bridge on the broker at `broker_port`: the stand-in for a multi-modal cloud (it
/// takes views and audio, which it describes to the model).
pub async fn start_bridge(broker_port: u16) -> Bridge {
    start_bridge_taking(broker_port, "[\"image/jpeg\", \"audio/wav\"]").await
}

/// Starts a bridge whose backend takes the attachment media `accepts` (a TOML array).
pub async fn start_bridge_taking(broker_port: u16, accepts: &str) -> Bridge {
    let text = format!(
        "share_group = \"bridges\"\nreply_margin_ms = 100\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {broker_port}\nclient_id = \"bridge-1\"\n\
         max_packet_bytes = 1048576\nreconnect_initial_ms = 50\nreconnect_max_ms = 500\n\
         [backend]\nkind = \"candle\"\nmodel = \"gemma3-270m\"\naccepts = {accepts}\n\
         [prices.\"gemma3-270m\"]\nprompt_per_million_usd = 0.05\ncompletion_per_million_usd = 0.1\n"
    );
    let config = tmo_cloud::config::Config::parse(&text, Path::new("bridge.toml")).expect("bridge config");
    let backend = tokio::task::block_in_place(|| tmo_cloud::build_backend(&config.file.backend))
        .expect("gemma3-270m loads (tmoctl model fetch gemma3-270m)");
    let stop = CancellationToken::new();
    let task = tokio::spawn(tmo_cloud::bridge::run(config, backend, None, stop.clone()));
    Bridge { stop, task }
}

/// Starts a bridge whose backend is the OpenAI-compatible server at `base_url` (images taken),
/// with the price of `gpt-test`.
pub async fn start_bridge_openai(broker_port: u16, base_url: &str) -> Bridge {
    let text = format!(
        "share_group = \"bridges\"\nreply_margin_ms = 100\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {broker_port}\nclient_id = \"bridge-openai\"\n\
         max_packet_bytes = 1048576\nreconnect_initial_ms = 50\nreconnect_max_ms = 500\n\
         [backend]\nkind = \"openai\"\nbase_url = \"{base_url}\"\nmodel = \"gpt-test\"\n\
         [prices.\"gpt-test\"]\nprompt_per_million_usd = 2.5\ncompletion_per_million_usd = 10.0\n"
    );
    let config = tmo_cloud::config::Config::parse(&text, Path::new("bridge.toml")).expect("bridge config");
    let backend = tmo_cloud::build_backend(&config.file.backend).expect("openai backend");
    let stop = CancellationToken::new();
    let task = tokio::spawn(tmo_cloud::bridge::run(config, backend, None, stop.clone()));
    Bridge { stop, task }
}

/// Waits (at most a minute) until tmod's `/v1/status` says `cloud.reachable` is `reachable`.
pub async fn wait_cloud_reachable(client: &Client, reachable: bool) {
    let started = Instant::now();
    loop {
        let status = client.status().await.expect("status");
        if status["cloud"]["reachable"] == reachable {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "cloud.reachable never became {reachable}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

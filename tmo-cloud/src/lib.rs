//! tmo-cloud: the cloud bridge of tmo-edge.
//!
//! Bridge processes subscribe to `$share/<group>/tmo/v1/dev/+/cloud/req` (tmo-protocol), so
//! that several of them split the load; each request is answered by the configured backend
//! within its deadline and the reply (answer, model, tokens, cost from the price table, or a
//! typed error) goes to the device's reply topic with the request's correlation data. A request
//! that asks for it has its answer's pieces published on the device's stream topic first, as the
//! backend generates them; a device's cancel stops the backend call.
//!
//! - [`config`]: the TOML configuration, validated with field-named errors;
//! - [`backend`]: the backend enum and its typed errors;
//! - [`openai`]: OpenAI-compatible chat completions over a pooled hyper client with rustls;
//! - [`candle`]: a local GGUF on llm-engine, on its own thread;
//! - [`judge`]: optional LLM-as-judge scores of a sample of the answers;
//! - [`bridge`]: the MQTT loop;
//! - `testing` (feature `testing`): an OpenAI-compatible chat server for tests and benches.

pub mod backend;
pub mod bridge;
pub mod candle;
pub mod config;
pub mod judge;
pub mod openai;
#[cfg(feature = "testing")]
pub mod testing;

use std::time::Duration;

use backend::Backend;
use config::{BackendConfig, Config};
use judge::Judge;

/// Builds a backend (loads the model for candle: blocking).
pub fn build_backend(config: &BackendConfig) -> anyhow::Result<Backend> {
    Ok(match config {
        BackendConfig::Openai(c) => Backend::OpenAi(Box::new(openai::OpenAiBackend::new(c)?)),
        BackendConfig::Candle(c) => Backend::Candle(candle::CandleBackend::start(c)?),
    })
}

/// Builds the configured judge, if any (blocking, like [`build_backend`]).
pub fn build_judge(config: &Config) -> anyhow::Result<Option<Judge>> {
    let Some(j) = &config.file.judge else {
        return Ok(None);
    };
    let backend = build_backend(&j.backend)?;
    Ok(Some(Judge::new(backend, j.sample_rate, j.max_tokens, Duration::from_millis(j.timeout_ms))))
}

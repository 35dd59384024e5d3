//! The bridge's configuration file (TOML), validated into typed settings.
//!
//! Every error names the field it is about (`backend.base_url`, `prices."gpt-4o-mini"`), so
//! that `tmo-cloud validate` can point at it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tmo_protocol::link::LinkConfig;
use tmo_protocol::{MediaType, ShareGroup};

/// The reference configuration, printed by `tmo-cloud print-config`.
pub const REFERENCE_CONFIG: &str = include_str!("../tmo-cloud.toml");

/// A configuration value is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid TOML for this schema (unknown key, wrong type, missing field).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and the line).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, dotted (`backend.max_retries`).
        field: String,
        /// What is wrong.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), reason: reason.into() }
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Name of the shared subscription group (`$share/<name>/...`): bridges with the same
    /// name split the requests.
    pub share_group: String,
    /// Requests answered at once; more wait for a slot until their deadline.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Largest cloud request accepted (after reassembly), bytes.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// The reply is published this long before the request's deadline at the latest (an
    /// error reply if the backend has not answered), so that it reaches the device in time.
    #[serde(default = "default_reply_margin_ms")]
    pub reply_margin_ms: u64,
    /// A streamed answer's pieces are published at most this often (the first at once, later
    /// ones gathered while the last was this recent): few messages on a slow link, and a
    /// backend slower than one token per interval streams token by token. 0: every piece.
    #[serde(default = "default_stream_batch_ms")]
    pub stream_batch_ms: u64,
    /// On SIGTERM/SIGINT, requests in progress get this long to finish.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// The system prompt given to the backend before the dialogue.
    #[serde(default = "default_system_prompt")]
    pub system_prompt: String,
    /// The MQTT connection (tmo-protocol's link settings).
    pub mqtt: LinkConfig,
    /// The backend answering the requests.
    pub backend: BackendConfig,
    /// Price per model name, used to compute the cost of each answer.
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// Optional LLM-as-judge scoring a sample of the answers.
    #[serde(default)]
    pub judge: Option<JudgeConfig>,
    /// Bounds per device, so that one misbehaving board cannot hold the bridge or run up the
    /// backend's bill.
    #[serde(default)]
    pub per_device: PerDeviceLimits,
}

/// `[per_device]`: what one device may ask of the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerDeviceLimits {
    /// Requests of one device answered at once; more are refused at once (`overloaded`).
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
    /// Requests of one device per minute, with bursts of as many (a token bucket); more are
    /// refused at once (`rate_limited`).
    #[serde(default = "default_requests_per_minute")]
    pub requests_per_minute: f64,
    /// Most tokens of an answer; a request asking more is cut to it.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
}

impl Default for PerDeviceLimits {
    fn default() -> Self {
        Self {
            in_flight: default_in_flight(),
            requests_per_minute: default_requests_per_minute(),
            max_tokens: default_max_tokens(),
        }
    }
}

fn default_in_flight() -> usize {
    2
}
fn default_requests_per_minute() -> f64 {
    60.0
}
fn default_max_tokens() -> u32 {
    1024
}

/// `[judge]`: scores a sample of the answers and publishes them on the device's score topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// Fraction of the answers scored, in [0, 1].
    pub sample_rate: f64,
    /// Most tokens the judge may write.
    #[serde(default = "default_judge_max_tokens")]
    pub max_tokens: u32,
    /// Time the judge gets per answer.
    #[serde(default = "default_judge_timeout_ms")]
    pub timeout_ms: u64,
    /// The judge's backend (same kinds as `[backend]`).
    pub backend: BackendConfig,
}

fn default_judge_max_tokens() -> u32 {
    8
}
fn default_judge_timeout_ms() -> u64 {
    30_000
}

fn default_max_concurrent_requests() -> usize {
    8
}
fn default_max_request_bytes() -> usize {
    16 << 20
}
fn default_reply_margin_ms() -> u64 {
    50
}
fn default_stream_batch_ms() -> u64 {
    20
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}
fn default_system_prompt() -> String {
    "You are a helpful kitchen assistant. Answer briefly and concretely.".into()
}

/// Prices of one model, USD.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Per million prompt tokens.
    pub prompt_per_million_usd: f64,
    /// Per million completion tokens.
    pub completion_per_million_usd: f64,
    /// Per image sent (on top of its tokens, for providers that bill images apart).
    #[serde(default)]
    pub per_image_usd: f64,
}

impl Price {
    /// The cost of one answer.
    pub fn cost_usd(&self, prompt_tokens: u32, completion_tokens: u32, images: u32) -> f64 {
        f64::from(prompt_tokens) * self.prompt_per_million_usd / 1e6
            + f64::from(completion_tokens) * self.completion_per_million_usd / 1e6
            + f64::from(images) * self.per_image_usd
    }
}

/// Which backend answers, and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendConfig {
    /// An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp server).
    Openai(OpenAiConfig),
    /// A local GGUF on candle (text only).
    Candle(CandleConfig),
}

impl BackendConfig {
    /// The attachment media the backend takes.
    pub fn accepts(&self) -> Vec<MediaType> {
        match self {
            Self::Openai(c) => {
                [(c.accepts_images, MediaType::ImageJpeg), (c.accepts_audio, MediaType::AudioWav)]
                    .into_iter()
                    .filter_map(|(yes, media)| yes.then_some(media))
                    .collect()
            }
            Self::Candle(c) => c.accepts.clone(),
        }
    }

    /// The model name the price table is looked up with.
    pub fn model(&self) -> &str {
        match self {
            Self::Openai(c) => &c.model,
            Self::Candle(c) => &c.model,
        }
    }
}

/// `[backend] kind = "openai"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Base URL; requests go to `{base_url}/v1/chat/completions`.
    pub base_url: String,
    /// The model asked for.
    pub model: String,
    /// The environment variable holding the API key (sent as `Authorization: Bearer`); none
    /// for servers without authentication.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Whether the model takes audio (`input_audio` parts); otherwise audio is dropped with a
    /// note in the prompt.
    #[serde(default)]
    pub accepts_audio: bool,
    /// Whether the model takes images (`image_url` parts); otherwise they are described.
    #[serde(default = "default_true")]
    pub accepts_images: bool,
    /// Attempts after the first on HTTP 429 and 5xx (and connection errors).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// First backoff; doubles per retry up to `max_backoff_ms`. A Retry-After header wins.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Longest backoff.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Extra PEM CA file trusted besides the system's roots (private endpoints).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Sampling temperature sent with the request, if any.
    #[serde(default)]
    pub temperature: Option<f64>,
}

fn default_true() -> bool {
    true
}
fn default_max_retries() -> u32 {
    3
}
fn default_initial_backoff_ms() -> u64 {
    200
}
fn default_max_backoff_ms() -> u64 {
    5_000
}

/// `[backend] kind = "candle"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandleConfig {
    /// A model name of llm-engine's registry (`smollm2-135m`, `gemma3-270m`) or a GGUF path.
    pub model: String,
    /// Compute threads (checked against candle's pool; see llm-engine).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Cap on the context length in tokens.
    #[serde(default)]
    pub max_context_tokens: Option<usize>,
    /// Requests waiting for the engine thread; more are refused as overloaded.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// Attachments it takes (`"image/jpeg"`, `"audio/wav"`), which it describes to the model
    /// in text: the stand-in for a multi-modal cloud. Empty (the default): a text-only cloud,
    /// and devices attach nothing.
    #[serde(default)]
    pub accepts: Vec<MediaType>,
}

fn default_queue() -> usize {
    16
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The parsed file.
    pub file: FileConfig,
    /// The share group, validated.
    pub share_group: ShareGroup,
    /// The price of the backend's model.
    pub price: Price,
}

impl Config {
    /// Reads and validates `path` (the environment is consulted for the API key variable).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` (read from `path`, named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        file.validate()
    }
}

impl FileConfig {
    /// Checks what serde cannot.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let share_group = ShareGroup::new(self.share_group.clone())
            .map_err(|e| ConfigError::invalid("share_group", e.to_string()))?;
        let limits = &self.per_device;
        if limits.in_flight == 0 {
            return Err(ConfigError::invalid("per_device.in_flight", "must be at least 1"));
        }
        if !(limits.requests_per_minute.is_finite() && limits.requests_per_minute > 0.0) {
            return Err(ConfigError::invalid("per_device.requests_per_minute", "must be above 0"));
        }
        if limits.max_tokens == 0 {
            return Err(ConfigError::invalid("per_device.max_tokens", "must be at least 1"));
        }
        if self.max_concurrent_requests == 0 {
            return Err(ConfigError::invalid("max_concurrent_requests", "must be at least 1"));
        }
        if self.max_request_bytes < 1024 {
            return Err(ConfigError::invalid("max_request_bytes", "must be at least 1024"));
        }
        self.mqtt.validate().map_err(|e| ConfigError::invalid("mqtt", e.to_string()))?;
        validate_backend(&self.backend, "backend")?;
        if let Some(judge) = &self.judge {
            if !(0.0..=1.0).contains(&judge.sample_rate) {
                return Err(ConfigError::invalid("judge.sample_rate", "must be within 0..=1"));
            }
            if judge.max_tokens == 0 {
                return Err(ConfigError::invalid("judge.max_tokens", "must be at least 1"));
            }
            if judge.timeout_ms == 0 {
                return Err(ConfigError::invalid("judge.timeout_ms", "must be positive"));
            }
            validate_backend(&judge.backend, "judge.backend")?;
        }
        for (model, price) in &self.prices {
            let values =
                [price.prompt_per_million_usd, price.completion_per_million_usd, price.per_image_usd];
            if values.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(ConfigError::invalid(
                    format!("prices.{model:?}"),
                    "prices must be finite and not negative",
                ));
            }
        }
        let model = self.backend.model().to_owned();
        let price = *self.prices.get(&model).ok_or_else(|| {
            ConfigError::invalid(
                format!("prices.{model:?}"),
                format!("no price for the backend's model {model:?} (add [prices.{model:?}])"),
            )
        })?;
        Ok(Config { file: self, share_group, price })
    }
}

fn validate_backend(backend: &BackendConfig, prefix: &str) -> Result<(), ConfigError> {
    match backend {
        BackendConfig::Openai(c) => validate_openai(c, prefix),
        BackendConfig::Candle(c) => {
            if c.model.is_empty() {
                return Err(ConfigError::invalid(format!("{prefix}.model"), "is empty"));
            }
            if c.queue_capacity == 0 {
                return Err(ConfigError::invalid(format!("{prefix}.queue_capacity"), "must be at least 1"));
            }
            if c.threads == Some(0) {
                return Err(ConfigError::invalid(format!("{prefix}.threads"), "must be at least 1"));
            }
            Ok(())
        }
    }
}

fn validate_openai(c: &OpenAiConfig, prefix: &str) -> Result<(), ConfigError> {
    let field = |name: &str| format!("{prefix}.{name}");
    let url = c.base_url.trim_end_matches('/');
    let uri: hyper::Uri =
        url.parse().map_err(|e| ConfigError::invalid(field("base_url"), format!("{url:?}: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(ConfigError::invalid(field("base_url"), format!("{url:?} is not http(s)://"))),
    }
    if uri.host().is_none() {
        return Err(ConfigError::invalid(field("base_url"), format!("{url:?} has no host")));
    }
    if c.model.is_empty() {
        return Err(ConfigError::invalid(field("model"), "is empty"));
    }
    if let Some(var) = &c.api_key_env {
        match std::env::var(var) {
            Ok(key) if !key.is_empty() => {}
            _ => {
                return Err(ConfigError::invalid(
                    field("api_key_env"),
                    format!("environment variable {var} is not set"),
                ));
            }
        }
    }
    if c.max_retries > 20 {
        return Err(ConfigError::invalid(field("max_retries"), "at most 20"));
    }
    if c.initial_backoff_ms == 0 || c.max_backoff_ms < c.initial_backoff_ms {
        return Err(ConfigError::invalid(
            field("initial_backoff_ms"),
            "need 0 < initial_backoff_ms <= max_backoff_ms",
        ));
    }
    if let Some(t) = c.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ConfigError::invalid(field("temperature"), "must be within 0..=2"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.toml"))
    }

    const CANDLE: &str = r#"
share_group = "bridges"
[mqtt]
host = "127.0.0.1"
client_id = "bridge-1"
[backend]
kind = "candle"
model = "smollm2-135m"
[prices."smollm2-135m"]
prompt_per_million_usd = 0.01
completion_per_million_usd = 0.02
"#;

    #[test]
    fn reference_config_parses() {
        // The reference names OPENAI_API_KEY; validation needs it set, so parse the schema only.
        let file: FileConfig = toml::from_str(REFERENCE_CONFIG).unwrap();
        assert!(matches!(file.backend, BackendConfig::Openai(_)));
        assert!(file.prices.contains_key(file.backend.model()));
    }

    #[test]
    fn candle_config_validates_with_defaults() {
        let c = parse(CANDLE).unwrap();
        assert_eq!(c.share_group.as_str(), "bridges");
        assert_eq!(c.file.max_concurrent_requests, 8);
        assert_eq!(c.file.mqtt.port, 1883);
        assert_eq!(c.price.prompt_per_million_usd, 0.01);
    }

    #[test]
    fn errors_name_the_field() {
        let field = |text: &str| match parse(text) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(&CANDLE.replace("\"bridges\"", "\"a/b\"")), "share_group");
        assert_eq!(
            field(&CANDLE.replace("[prices.\"smollm2-135m\"]", "[prices.other]")),
            "prices.\"smollm2-135m\""
        );
        assert_eq!(field(&CANDLE.replace("0.02", "-1.0")), "prices.\"smollm2-135m\"");
        assert_eq!(field(&format!("max_concurrent_requests = 0\n{CANDLE}")), "max_concurrent_requests");
        assert_eq!(field(&CANDLE.replace("client_id = \"bridge-1\"", "client_id = \"\"")), "mqtt");
        let openai = CANDLE.replace(
            "kind = \"candle\"",
            "kind = \"openai\"\nbase_url = \"ftp://x\"\napi_key_env = \"TMO_CLOUD_UNSET_VAR_FOR_TEST\"",
        );
        assert_eq!(field(&openai), "backend.base_url");
        let openai = openai.replace("ftp://x", "http://127.0.0.1:9");
        assert_eq!(field(&openai), "backend.api_key_env");
        match parse(&CANDLE.replace("kind = \"candle\"", "kind = \"candle\"\ncolour = 1")) {
            Err(ConfigError::Parse { message, .. }) => assert!(message.contains("colour"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn price_table_costs() {
        let p = Price { prompt_per_million_usd: 2.0, completion_per_million_usd: 8.0, per_image_usd: 0.001 };
        let cost = p.cost_usd(1_000, 500, 3);
        assert!((cost - (0.002 + 0.004 + 0.003)).abs() < 1e-12, "{cost}");
    }
}

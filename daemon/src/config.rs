//! The deployment configuration (`tmod.toml`): typed, validated with the failing field named,
//! site settings and secrets overridable from the environment. `daemon/tmod.toml` is the
//! reference and holds every default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use device_profiles::DeviceProfile;
use device_profiles::sensing::ViewSource;
use serde::Deserialize;

/// The reference configuration, with every default (`tmod print-config`).
pub const REFERENCE: &str = include_str!("../tmod.toml");

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("configuration {origin} is not valid: {message}")]
    Parse { origin: String, message: String },
    #[error("configuration {origin}: field `{field}` {reason}")]
    Invalid { origin: String, field: String, reason: String },
}

/// A validated deployment configuration, with its device profile loaded.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: ConfigFile,
    pub profile: DeviceProfile,
}

/// The file as written (after environment overrides).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub profile: String,
    pub state_dir: PathBuf,
    pub device_id: String,
    pub api: ApiConfig,
    pub policy: PolicyConfig,
    pub model: ModelConfig,
    pub classifier: ClassifierConfig,
    pub dialogues: DialogueConfig,
    pub outcomes: OutcomeConfig,
    pub energy: EnergyConfig,
    pub mqtt: MqttConfig,
    pub cloud: CloudConfig,
    pub fleet: FleetSection,
    #[serde(default)]
    pub sensing: SensingOverrides,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub socket: PathBuf,
    pub tcp: String,
    pub max_body_bytes: usize,
    pub max_chat_body_bytes: usize,
    pub max_connections: usize,
    pub header_timeout_secs: f64,
    pub idle_timeout_secs: f64,
    pub max_turns_deciding: usize,
    pub tcp_token_file: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub path: String,
    pub exploration: String,
    pub epsilon: f64,
    pub max_bytes: u64,
    pub trial_decisions: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub threads: usize,
    /// No longer used (the engine has SIMD kernels for Q4_1); accepted so that configuration
    /// files written for earlier versions still load.
    #[serde(default)]
    pub requantize: Option<String>,
    pub system_prompt: String,
    pub max_tokens: usize,
    pub max_answer_secs: f64,
    pub queue_limit: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    pub model: String,
    pub head: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialogueConfig {
    pub latency_budget_secs: f64,
    pub cost_budget_usd: f64,
    pub idle_expiry_secs: u64,
    pub max_active: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeConfig {
    pub path: PathBuf,
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnergyConfig {
    pub electricity_usd_per_kwh: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
    pub keep_alive_secs: u64,
    pub max_packet_bytes: u32,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    pub group: String,
    pub trusted_keys: Vec<String>,
    pub upload: bool,
    pub upload_batch_rows: usize,
    pub ack_timeout_secs: f64,
    pub status_interval_secs: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    pub max_wait_secs: f64,
    pub min_wait_secs: f64,
    pub max_tokens: u32,
    pub max_history_turns: usize,
    /// Seconds between link probes (0: none).
    pub probe_interval_secs: f64,
    /// Ask the bridge to stream the answer's pieces as they are generated.
    pub stream: bool,
    /// A stream that began and then stays silent this long ends with what arrived.
    pub stall_secs: f64,
}

/// Site overrides of the profile's `[sensing]` sources.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensingOverrides {
    #[serde(default)]
    pub views: BTreeMap<String, ViewSource>,
}

/// The environment variables that override a field, and the field.
const ENV_OVERRIDES: &[(&str, &[&str])] = &[
    ("TMOD_PROFILE", &["profile"]),
    ("TMOD_STATE_DIR", &["state_dir"]),
    ("TMOD_DEVICE_ID", &["device_id"]),
    ("TMOD_API_SOCKET", &["api", "socket"]),
    ("TMOD_API_TCP", &["api", "tcp"]),
    ("TMOD_MODEL", &["model", "name"]),
    ("TMOD_POLICY", &["policy", "path"]),
    ("TMOD_MQTT_HOST", &["mqtt", "host"]),
    ("TMOD_MQTT_PORT", &["mqtt", "port"]),
    ("TMOD_MQTT_USERNAME", &["mqtt", "username"]),
    ("TMOD_MQTT_PASSWORD", &["mqtt", "password"]),
];

impl Config {
    /// Reads `path`, applies the environment's overrides, and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.to_owned(), source })?;
        Self::from_toml_str(&text, &path.display().to_string(), |k| std::env::var(k).ok())
    }

    /// Parses `text` over the reference's defaults; `env` looks environment variables up.
    pub fn from_toml_str(
        text: &str,
        origin: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let parse =
            |e: toml::de::Error| ConfigError::Parse { origin: origin.to_owned(), message: e.to_string() };
        let mut merged: toml::Table = REFERENCE.parse().map_err(parse)?;
        let site: toml::Table = text.parse().map_err(parse)?;
        merge(&mut merged, site);
        for (var, field) in ENV_OVERRIDES {
            if let Some(value) = env(var) {
                set_field(&mut merged, field, &value);
            }
        }
        let file: ConfigFile = merged.try_into().map_err(parse)?;
        let profile = DeviceProfile::load(&file.profile).map_err(|e| ConfigError::Invalid {
            origin: origin.to_owned(),
            field: "profile".to_owned(),
            reason: e.to_string(),
        })?;
        let config = Config { file, profile };
        config.validate().map_err(|(field, reason)| ConfigError::Invalid {
            origin: origin.to_owned(),
            field: field.to_owned(),
            reason,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let f = &self.file;
        let positive = |field, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err((field, format!("must be a number > 0, found {v}")))
            }
        };
        let non_negative = |field, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err((field, format!("must be a number >= 0, found {v}")))
            }
        };
        if f.state_dir.as_os_str().is_empty() {
            return Err(("state_dir", "must not be empty".into()));
        }
        if f.api.socket.as_os_str().is_empty() {
            return Err(("api.socket", "must not be empty".into()));
        }
        if let Some(addr) = self.api_tcp().map_err(|e| ("api.tcp", e))?
            && !addr.ip().is_loopback()
        {
            return Err(("api.tcp", format!("must be a loopback address, found {addr}")));
        }
        positive("api.header_timeout_secs", f.api.header_timeout_secs)?;
        positive("api.idle_timeout_secs", f.api.idle_timeout_secs)?;
        if f.api.max_connections == 0 {
            return Err(("api.max_connections", "must be at least 1".into()));
        }
        if f.api.max_turns_deciding == 0 {
            return Err(("api.max_turns_deciding", "must be at least 1".into()));
        }
        if f.api.max_chat_body_bytes < f.api.max_body_bytes {
            return Err((
                "api.max_chat_body_bytes",
                format!(
                    "must be at least api.max_body_bytes ({}), found {}",
                    f.api.max_body_bytes, f.api.max_chat_body_bytes
                ),
            ));
        }
        if f.api.max_body_bytes < 256 {
            return Err((
                "api.max_body_bytes",
                format!("must be at least 256, found {}", f.api.max_body_bytes),
            ));
        }
        match f.policy.exploration.as_str() {
            "greedy" => {}
            "epsilon" if f.policy.epsilon > 0.0 && f.policy.epsilon <= 1.0 => {}
            "epsilon" => {
                return Err(("policy.epsilon", format!("must be in (0, 1], found {}", f.policy.epsilon)));
            }
            other => {
                return Err((
                    "policy.exploration",
                    format!("must be \"greedy\" or \"epsilon\", found {other:?}"),
                ));
            }
        }
        if f.model.name.is_empty() {
            return Err(("model.name", "must name a model".into()));
        }
        if f.model.threads > 256 {
            return Err(("model.threads", format!("must be at most 256, found {}", f.model.threads)));
        }
        if !(1..=4096).contains(&f.model.max_tokens) {
            return Err(("model.max_tokens", format!("must be in 1..=4096, found {}", f.model.max_tokens)));
        }
        positive("model.max_answer_secs", f.model.max_answer_secs)?;
        if f.classifier.model.is_empty() {
            return Err(("classifier.model", "must name a model".into()));
        }
        non_negative("dialogues.latency_budget_secs", f.dialogues.latency_budget_secs)?;
        non_negative("dialogues.cost_budget_usd", f.dialogues.cost_budget_usd)?;
        if f.dialogues.idle_expiry_secs == 0 {
            return Err(("dialogues.idle_expiry_secs", "must be at least 1".into()));
        }
        if f.dialogues.max_active == 0 {
            return Err(("dialogues.max_active", "must be at least 1".into()));
        }
        if f.outcomes.max_bytes < 1 << 20 {
            return Err((
                "outcomes.max_bytes",
                format!("must be at least 1 MiB, found {}", f.outcomes.max_bytes),
            ));
        }
        non_negative("energy.electricity_usd_per_kwh", f.energy.electricity_usd_per_kwh)?;
        if f.mqtt.enabled && f.mqtt.host.is_empty() {
            return Err(("mqtt.host", "must be set when mqtt.enabled".into()));
        }
        if !f.mqtt.password.is_empty() && f.mqtt.username.is_empty() {
            return Err(("mqtt.username", "a password needs a user name".into()));
        }
        if f.mqtt.enabled && !f.mqtt.ca_file.is_empty() && !Path::new(&f.mqtt.ca_file).is_file() {
            return Err(("mqtt.ca_file", format!("{} is not a readable file", f.mqtt.ca_file)));
        }
        if f.mqtt.cert_file.is_empty() != f.mqtt.key_file.is_empty() {
            return Err((
                "mqtt.key_file",
                "a client certificate needs its key, and a key its certificate".into(),
            ));
        }
        if f.mqtt.enabled {
            self.link_config().validate().map_err(|e| ("mqtt", e.to_string()))?;
        }
        positive("cloud.max_wait_secs", f.cloud.max_wait_secs)?;
        positive("cloud.min_wait_secs", f.cloud.min_wait_secs)?;
        positive("cloud.stall_secs", f.cloud.stall_secs)?;
        if !(f.cloud.probe_interval_secs.is_finite() && f.cloud.probe_interval_secs >= 0.0) {
            return Err(("cloud.probe_interval_secs", "must be a number of seconds >= 0".into()));
        }
        if f.cloud.min_wait_secs > f.cloud.max_wait_secs {
            return Err(("cloud.min_wait_secs", "must not exceed cloud.max_wait_secs".into()));
        }
        if !(1..=8192).contains(&f.cloud.max_tokens) {
            return Err(("cloud.max_tokens", format!("must be in 1..=8192, found {}", f.cloud.max_tokens)));
        }
        if !f.fleet.group.is_empty() {
            tmo_protocol::GroupName::new(f.fleet.group.clone())
                .map_err(|e| ("fleet.group", e.to_string()))?;
        }
        for key in &f.fleet.trusted_keys {
            tmo_protocol::bundle::public_key_from_hex(key)
                .map_err(|e| ("fleet.trusted_keys", format!("{key:?}: {e}")))?;
        }
        if !(1..=10_000).contains(&f.fleet.upload_batch_rows) {
            return Err((
                "fleet.upload_batch_rows",
                format!("must be in 1..=10000, found {}", f.fleet.upload_batch_rows),
            ));
        }
        positive("fleet.ack_timeout_secs", f.fleet.ack_timeout_secs)?;
        positive("fleet.status_interval_secs", f.fleet.status_interval_secs)?;
        for name in f.sensing.views.keys() {
            if !self.profile.modalities.iter().any(|m| &m.name == name) {
                return Err(("sensing.views", format!("the profile has no modality named {name:?}")));
            }
        }
        Ok(())
    }

    /// The profile with the site's capture overrides applied.
    pub fn sensing_profile(&self) -> DeviceProfile {
        let mut profile = self.profile.clone();
        for (name, source) in &self.file.sensing.views {
            profile.sensing.views.insert(name.clone(), source.clone());
        }
        profile
    }

    /// The MQTT link's settings; the client id defaults to the device id.
    pub fn link_config(&self) -> tmo_protocol::link::LinkConfig {
        let m = &self.file.mqtt;
        let client_id = if m.client_id.is_empty() { self.device_id() } else { m.client_id.clone() };
        let some = |s: &String| (!s.is_empty()).then(|| s.clone());
        let mut link = tmo_protocol::link::LinkConfig::new(m.host.clone(), m.port, client_id);
        link.username = some(&m.username);
        link.password = some(&m.password);
        link.ca_file = some(&m.ca_file).map(PathBuf::from);
        link.cert_file = some(&m.cert_file).map(PathBuf::from);
        link.key_file = some(&m.key_file).map(PathBuf::from);
        link.keep_alive_secs = m.keep_alive_secs;
        link.max_packet_bytes = m.max_packet_bytes;
        link.reconnect_initial_ms = m.reconnect_initial_ms;
        link.reconnect_max_ms = m.reconnect_max_ms;
        link
    }

    /// The optional loopback TCP address of the API.
    pub fn api_tcp(&self) -> Result<Option<SocketAddr>, String> {
        let tcp = self.file.api.tcp.trim();
        if tcp.is_empty() {
            return Ok(None);
        }
        tcp.parse().map(Some).map_err(|e| format!("{tcp:?} is not an address such as 127.0.0.1:8750: {e}"))
    }

    /// `path` resolved against the state directory when relative.
    pub fn state_path(&self, path: &Path) -> PathBuf {
        self.file.state_dir.join(path)
    }

    /// The dialogue budgets: the configuration's, else the profile's.
    pub fn budgets(&self) -> (f64, f64) {
        let d = &self.file.dialogues;
        let pick = |configured: f64, profile: f64| if configured > 0.0 { configured } else { profile };
        (
            pick(d.latency_budget_secs, self.profile.budgets.latency_secs),
            pick(d.cost_budget_usd, self.profile.budgets.cost_usd),
        )
    }

    /// This device's id: the configured one, else the host name.
    pub fn device_id(&self) -> String {
        if !self.file.device_id.is_empty() {
            return self.file.device_id.clone();
        }
        std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "tmod".to_owned())
    }
}

/// Overlays `site` on `base`, table by table.
fn merge(base: &mut toml::Table, site: toml::Table) {
    for (key, value) in site {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(site_table)) => {
                merge(base_table, site_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Sets `path` to `value`, typed as the reference's value at that place.
fn set_field(table: &mut toml::Table, path: &[&str], value: &str) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut table = table;
    for key in parents {
        let Some(toml::Value::Table(next)) = table.get_mut(*key) else { return };
        table = next;
    }
    let typed = match table.get(*last) {
        Some(toml::Value::Integer(_)) => value.parse().map(toml::Value::Integer).ok(),
        _ => None,
    };
    table.insert((*last).to_owned(), typed.unwrap_or_else(|| toml::Value::String(value.to_owned())));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, "test.toml", |_| None)
    }

    #[test]
    fn the_reference_is_valid_and_holds_the_defaults() {
        let config = parse("").expect("reference");
        assert_eq!(config.file.profile, "x86-dev");
        assert_eq!(config.budgets(), (config.profile.budgets.latency_secs, config.profile.budgets.cost_usd));
        assert_eq!(config.api_tcp(), Ok(None));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("[model]\nmax_tokens = 0", "model.max_tokens"),
            ("[api]\ntcp = \"0.0.0.0:80\"", "api.tcp"),
            ("[policy]\nexploration = \"epsilon\"", "policy.epsilon"),
            ("profile = \"no-such-board\"", "profile"),
            ("[sensing.views.kitchen]\nsource = \"test_pattern\"", "sensing.views"),
            ("[mqtt]\ncert_file = \"c.pem\"", "mqtt.key_file"),
            ("[mqtt]\nenabled = true\nkeep_alive_secs = 1", "mqtt"),
            ("[cloud]\nmin_wait_secs = 30.0", "cloud.min_wait_secs"),
            ("[cloud]\nmax_tokens = 0", "cloud.max_tokens"),
        ];
        for (text, field) in cases {
            match parse(text) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: expected an invalid {field}, got {other:?}"),
            }
        }
        let unknown = parse("[api]\nsockett = \"/x\"").expect_err("unknown field");
        assert!(unknown.to_string().contains("sockett"), "{unknown}");
        let typed = parse("[model]\nmax_tokens = \"many\"").expect_err("wrong type");
        assert!(typed.to_string().contains("max_tokens"), "{typed}");
    }

    #[test]
    fn environment_overrides_site_settings_and_secrets() {
        let env = |k: &str| match k {
            "TMOD_MQTT_PASSWORD" => Some("s3cret".to_owned()),
            "TMOD_MQTT_PORT" => Some("8883".to_owned()),
            "TMOD_API_TCP" => Some("127.0.0.1:9000".to_owned()),
            _ => None,
        };
        let config =
            Config::from_toml_str("[mqtt]\nusername = \"kitchen\"\npassword = \"in-file\"", "t", env)
                .expect("config");
        assert_eq!(config.file.mqtt.password, "s3cret");
        assert_eq!(config.file.mqtt.port, 8883);
        assert_eq!(config.api_tcp(), Ok(Some("127.0.0.1:9000".parse().expect("addr"))));
    }

    #[test]
    fn the_mqtt_section_becomes_the_link_configuration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "pem").expect("ca");
        let text = format!(
            "device_id = \"kitchen-7\"\n[mqtt]\nenabled = true\nhost = \"broker.lan\"\nport = 8883\n\
             username = \"kitchen\"\npassword = \"pw\"\nca_file = {ca:?}\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n\
             max_packet_bytes = 65536"
        );
        let link = parse(&text).expect("config").link_config();
        assert_eq!(
            (link.host.as_str(), link.port, link.client_id.as_str()),
            ("broker.lan", 8883, "kitchen-7")
        );
        assert_eq!((link.username.as_deref(), link.password.as_deref()), (Some("kitchen"), Some("pw")));
        assert_eq!(link.ca_file.as_deref(), Some(ca.as_path()));
        assert_eq!(link.cert_file.as_deref(), Some(Path::new("c.pem")));
        assert_eq!(link.key_file.as_deref(), Some(Path::new("k.pem")));
        assert_eq!(link.max_packet_bytes, 65536);
        let own_id =
            parse("device_id = \"kitchen-7\"\n[mqtt]\nclient_id = \"tmod-kitchen-7\"").expect("config");
        assert_eq!(own_id.link_config().client_id, "tmod-kitchen-7");
        // Without TLS files the link is plain TCP.
        let plain = parse("device_id = \"d\"").expect("config").link_config();
        assert_eq!((plain.ca_file, plain.username), (None, None));
    }

    #[test]
    fn site_views_override_the_profile() {
        let config =
            parse("[sensing.views.view-1]\nsource = \"directory\"\npath = \"/srv/frames\"").expect("config");
        let profile = config.sensing_profile();
        assert!(matches!(profile.sensing.views.get("view-1"), Some(ViewSource::Directory { .. })));
        assert!(matches!(profile.sensing.views.get("view-0"), Some(ViewSource::TestPattern {})));
    }
}

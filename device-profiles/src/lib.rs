//! Board profiles: the TOML files in this folder and their typed, validated form.
//!
//! A profile names the board, its modalities in policy order (camera views, then the audio clip),
//! the expected latency, cost and energy of each action class, and the per-dialogue budgets.
//! Every profile in this folder is embedded in the binary ([`BUILTIN`]), so `tmod validate` and
//! the tests can check all of them without knowing where the files were installed.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod cpu;
pub mod sensing;

pub use sensing::{
    AudioSettings, AudioSource, CameraSettings, EnergySourceKind, SensingSettings, TelemetrySettings,
    ViewSource,
};

/// Largest number of modalities a profile may name: the action space grows as 1 + 2^X.
pub const MAX_MODALITIES: usize = 8;

/// The profiles shipped in this folder, by file stem.
pub const BUILTIN: &[(&str, &str)] = &[
    ("jetson-tx2", include_str!("../jetson-tx2.toml")),
    ("jetson-orin-nano", include_str!("../jetson-orin-nano.toml")),
    ("raspberry-pi-5", include_str!("../raspberry-pi-5.toml")),
    ("rk3588", include_str!("../rk3588.toml")),
    ("x86-dev", include_str!("../x86-dev.toml")),
];

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("profile {origin} is not valid TOML for a device profile: {message}")]
    Parse { origin: String, message: String },
    #[error("profile {origin}: field `{field}` {reason}")]
    Invalid { origin: String, field: String, reason: String },
    #[error("no built-in profile named `{0}`")]
    UnknownBuiltin(String),
}

/// A validated device profile.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    pub board: Board,
    /// Modalities in policy order: modality i is `m_i` of the observation and action space.
    #[serde(rename = "modality")]
    pub modalities: Vec<Modality>,
    pub costs: CostTable,
    pub budgets: Budgets,
    /// Capture and telemetry settings (`[sensing]`); every part has defaults.
    #[serde(default)]
    pub sensing: SensingSettings,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Board {
    pub name: String,
    pub description: String,
    /// True when the cost table holds estimates rather than measurements.
    pub estimated: bool,
    #[serde(default)]
    pub notes: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Modality {
    pub name: String,
    pub kind: ModalityKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModalityKind {
    Camera,
    Audio,
}

impl fmt::Display for ModalityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModalityKind::Camera => "camera",
            ModalityKind::Audio => "audio",
        })
    }
}

/// Expected latency, cost and energy of one call of an action class.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionCost {
    pub latency_secs: f64,
    pub cost_usd: f64,
    pub energy_j: f64,
}

/// Cloud costs by number of attached modalities: index k is the cost of a cloud call carrying k
/// modalities, so each list has X + 1 entries.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudCosts {
    pub latency_secs: Vec<f64>,
    pub cost_usd: Vec<f64>,
    pub energy_j: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostTable {
    pub local: ActionCost,
    pub cloud: CloudCosts,
}

impl CostTable {
    /// Expected cost of a cloud call with `attached` modalities.
    ///
    /// # Panics
    /// If `attached` is larger than the number of modalities; validation guarantees the table
    /// covers every count from 0 to X.
    pub fn cloud(&self, attached: usize) -> ActionCost {
        ActionCost {
            latency_secs: self.cloud.latency_secs[attached],
            cost_usd: self.cloud.cost_usd[attached],
            energy_j: self.cloud.energy_j[attached],
        }
    }
}

/// Per-dialogue budgets.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budgets {
    pub latency_secs: f64,
    pub cost_usd: f64,
}

impl DeviceProfile {
    /// Parses and validates a profile; `origin` names it in errors (a path or a builtin name).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ProfileError> {
        let profile: DeviceProfile = toml::from_str(text)
            .map_err(|e| ProfileError::Parse { origin: origin.to_owned(), message: e.to_string() })?;
        profile.validate(origin)?;
        Ok(profile)
    }

    pub fn from_path(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ProfileError::Io { path: path.to_owned(), source })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// A profile shipped with the binary, by name (`jetson-tx2`, `x86-dev`, ...).
    pub fn builtin(name: &str) -> Result<Self, ProfileError> {
        let (_, text) = BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| ProfileError::UnknownBuiltin(name.to_owned()))?;
        Self::from_toml_str(text, name)
    }

    /// Loads a path if `spec` names an existing file or ends in `.toml`, else a builtin name.
    pub fn load(spec: &str) -> Result<Self, ProfileError> {
        let path = Path::new(spec);
        if path.exists() || spec.ends_with(".toml") { Self::from_path(path) } else { Self::builtin(spec) }
    }

    /// Number of modalities X.
    pub fn modality_count(&self) -> usize {
        self.modalities.len()
    }

    fn validate(&self, origin: &str) -> Result<(), ProfileError> {
        let invalid = |field: &str, reason: String| ProfileError::Invalid {
            origin: origin.to_owned(),
            field: field.to_owned(),
            reason,
        };
        if self.board.name.trim().is_empty() {
            return Err(invalid("board.name", "must not be empty".into()));
        }
        let x = self.modalities.len();
        if x == 0 || x > MAX_MODALITIES {
            return Err(invalid(
                "modality",
                format!("must list 1 to {MAX_MODALITIES} modalities, found {x}"),
            ));
        }
        for (i, m) in self.modalities.iter().enumerate() {
            if m.name.trim().is_empty() {
                return Err(invalid(&format!("modality[{i}].name"), "must not be empty".into()));
            }
            if self.modalities[..i].iter().any(|o| o.name == m.name) {
                return Err(invalid(&format!("modality[{i}].name"), format!("repeats `{}`", m.name)));
            }
        }
        let non_negative = |field: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(invalid(field, format!("must be a finite number >= 0, found {v}")))
            }
        };
        non_negative("costs.local.latency_secs", self.costs.local.latency_secs)?;
        non_negative("costs.local.cost_usd", self.costs.local.cost_usd)?;
        non_negative("costs.local.energy_j", self.costs.local.energy_j)?;
        for (name, list) in [
            ("costs.cloud.latency_secs", &self.costs.cloud.latency_secs),
            ("costs.cloud.cost_usd", &self.costs.cloud.cost_usd),
            ("costs.cloud.energy_j", &self.costs.cloud.energy_j),
        ] {
            if list.len() != x + 1 {
                return Err(invalid(
                    name,
                    format!(
                        "must have {} entries (0 to {x} attached modalities), found {}",
                        x + 1,
                        list.len()
                    ),
                ));
            }
            for (k, v) in list.iter().enumerate() {
                non_negative(&format!("{name}[{k}]"), *v)?;
            }
        }
        for (name, v) in
            [("budgets.latency_secs", self.budgets.latency_secs), ("budgets.cost_usd", self.budgets.cost_usd)]
        {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(name, format!("must be a finite number > 0, found {v}")));
            }
        }
        let cameras: Vec<&str> = self
            .modalities
            .iter()
            .filter(|m| m.kind == ModalityKind::Camera)
            .map(|m| m.name.as_str())
            .collect();
        self.sensing.check(&cameras).map_err(|(field, reason)| invalid(&field, reason))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_profile_loads_and_matches_its_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let p = e.unwrap().path();
                (p.extension()? == "toml" && p.file_name()? != "Cargo.toml")
                    .then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
            })
            .collect();
        on_disk.sort();
        let mut builtin: Vec<String> = BUILTIN.iter().map(|(n, _)| n.to_string()).collect();
        builtin.sort();
        assert_eq!(on_disk, builtin, "every profile file is embedded, and only those");
        for name in builtin {
            let from_file = DeviceProfile::from_path(&dir.join(format!("{name}.toml"))).unwrap();
            let embedded = DeviceProfile::builtin(&name).unwrap();
            assert_eq!(from_file, embedded);
            assert_eq!(from_file.board.name, name);
        }
    }

    #[test]
    fn jetson_tx2_carries_the_papers_numbers() {
        let p = DeviceProfile::builtin("jetson-tx2").unwrap();
        assert!(!p.board.estimated);
        assert_eq!(p.modality_count(), 3);
        assert_eq!(p.costs.local.latency_secs, 0.0114);
        assert_eq!(p.costs.local.cost_usd, 7.9e-9);
        assert_eq!(p.costs.cloud.latency_secs, vec![6.46030, 4.76134, 6.24569, 6.98211]);
        assert_eq!(p.costs.cloud.cost_usd, vec![0.00049, 0.00500, 0.00945, 0.01368]);
        assert_eq!(p.budgets, Budgets { latency_secs: 30.0, cost_usd: 0.05 });
        assert_eq!(p.costs.cloud(2).cost_usd, 0.00945);
    }

    #[test]
    fn estimated_profiles_say_so() {
        for name in ["raspberry-pi-5", "jetson-orin-nano", "rk3588", "x86-dev"] {
            let p = DeviceProfile::builtin(name).unwrap();
            assert!(p.board.estimated, "{name} holds estimates and must be marked so");
            assert!(!p.board.notes.is_empty(), "{name} explains its estimates");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let good = BUILTIN[0].1;
        let short = good.replace("cost_usd = [0.00049, 0.00500, 0.00945, 0.01368]", "cost_usd = [0.00049]");
        let err = DeviceProfile::from_toml_str(&short, "t").unwrap_err().to_string();
        assert!(err.contains("costs.cloud.cost_usd"), "{err}");

        let unknown = format!("{good}\n[extra]\nx = 1\n");
        let err = DeviceProfile::from_toml_str(&unknown, "t").unwrap_err().to_string();
        assert!(err.contains("extra"), "{err}");

        let negative = good.replace("latency_secs = 30.0", "latency_secs = -1.0");
        let err = DeviceProfile::from_toml_str(&negative, "t").unwrap_err().to_string();
        assert!(err.contains("budgets.latency_secs"), "{err}");

        assert!(matches!(DeviceProfile::builtin("nope"), Err(ProfileError::UnknownBuiltin(_))));
        assert!(matches!(DeviceProfile::load("/no/such.toml"), Err(ProfileError::Io { .. })));
    }
}

//! Per-board sensing settings: the optional `[sensing]` section of a device profile.
//!
//! Every part has defaults, so a profile without the section still loads: telemetry samples once
//! a second with auto-detected energy sources, each camera modality reads `/dev/video<i>` at
//! 640x480 and 15 fps, and audio (when a modality of kind audio is listed) captures the default
//! ALSA input at 16 kHz.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// The `[sensing]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensingSettings {
    /// Telemetry sampling and energy sources.
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// Capture and JPEG settings shared by every camera view.
    #[serde(default)]
    pub camera: CameraSettings,
    /// Source of each camera modality, keyed by modality name (`[sensing.views.view-0]`).
    /// A camera modality without an entry reads `/dev/video<i>` where i is its camera index.
    #[serde(default)]
    pub views: BTreeMap<String, ViewSource>,
    /// Audio capture and voice activity detection; absent means audio runs only when the
    /// profile lists a modality of kind audio, with the defaults.
    #[serde(default)]
    pub audio: Option<AudioSettings>,
    /// First delay before retrying a failed source; doubles up to `retry_max_ms`.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest delay between retries of a failed source.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
}

impl Default for SensingSettings {
    fn default() -> Self {
        SensingSettings {
            telemetry: TelemetrySettings::default(),
            camera: CameraSettings::default(),
            views: BTreeMap::new(),
            audio: None,
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
        }
    }
}

fn default_retry_initial_ms() -> u64 {
    250
}
fn default_retry_max_ms() -> u64 {
    5_000
}

/// Where the board's energy figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EnergySourceKind {
    /// Try RAPL, hwmon power monitors, the Raspberry Pi 5 PMIC, then a discharging battery.
    #[default]
    Auto,
    /// Intel/AMD RAPL powercap `energy_uj` counters (x86).
    Rapl,
    /// hwmon INA3221 / INA219 power monitor rails (Jetson and boards with a shunt monitor).
    Hwmon,
    /// A `power_supply` battery's discharge power.
    PowerSupply,
    /// Raspberry Pi 5 PMIC rails read with `vcgencmd pmic_read_adc`.
    Rpi5Pmic,
    /// No energy measurement.
    None,
}

/// The `[sensing.telemetry]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Sampling period.
    #[serde(default = "default_period_ms")]
    pub period_ms: u64,
    /// Energy source.
    #[serde(default)]
    pub energy: EnergySourceKind,
    /// Root of the sysfs tree (`/sys`); tests point it at a fixture tree.
    #[serde(default = "default_sysfs_root")]
    pub sysfs_root: PathBuf,
    /// hwmon rail label that is the board's total input (its sub-rails are then not added).
    #[serde(default = "default_total_rail")]
    pub hwmon_total_rail: String,
    /// The `vcgencmd` program used for the Raspberry Pi 5 PMIC.
    #[serde(default = "default_vcgencmd")]
    pub vcgencmd: PathBuf,
    /// Shortest interval between two PMIC reads (the PMIC is slow to query); at least 1000.
    #[serde(default = "default_pmic_interval_ms")]
    pub pmic_interval_ms: u64,
    /// How much energy history is kept for per-request integrals.
    #[serde(default = "default_history_secs")]
    pub energy_history_secs: u64,
}

fn default_period_ms() -> u64 {
    1_000
}
fn default_sysfs_root() -> PathBuf {
    PathBuf::from("/sys")
}
fn default_total_rail() -> String {
    "VDD_IN".to_owned()
}
fn default_vcgencmd() -> PathBuf {
    PathBuf::from("vcgencmd")
}
fn default_pmic_interval_ms() -> u64 {
    1_000
}
fn default_history_secs() -> u64 {
    3_600
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            period_ms: default_period_ms(),
            energy: EnergySourceKind::default(),
            sysfs_root: default_sysfs_root(),
            hwmon_total_rail: default_total_rail(),
            vcgencmd: default_vcgencmd(),
            pmic_interval_ms: default_pmic_interval_ms(),
            energy_history_secs: default_history_secs(),
        }
    }
}

/// The `[sensing.camera]` section: settings shared by every view.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraSettings {
    /// Frame width in pixels (captured frames are scaled to it).
    #[serde(default = "default_width")]
    pub width: u32,
    /// Frame height in pixels.
    #[serde(default = "default_height")]
    pub height: u32,
    /// Frames per second asked of a device or generated by a test pattern.
    #[serde(default = "default_fps")]
    pub fps: u32,
    /// JPEG quality (1 to 100) of a frame sent to the cloud.
    #[serde(default = "default_quality")]
    pub jpeg_quality: u8,
    /// Largest JPEG sent; quality is lowered (then the frame halved) until it fits.
    #[serde(default = "default_jpeg_max_bytes")]
    pub jpeg_max_bytes: usize,
    /// A frame older than this marks its view unavailable.
    #[serde(default = "default_stale_ms")]
    pub stale_after_ms: u64,
}

fn default_width() -> u32 {
    640
}
fn default_height() -> u32 {
    480
}
fn default_fps() -> u32 {
    15
}
fn default_quality() -> u8 {
    80
}
fn default_jpeg_max_bytes() -> usize {
    150_000
}
fn default_stale_ms() -> u64 {
    3_000
}

impl Default for CameraSettings {
    fn default() -> Self {
        CameraSettings {
            width: default_width(),
            height: default_height(),
            fps: default_fps(),
            jpeg_quality: default_quality(),
            jpeg_max_bytes: default_jpeg_max_bytes(),
            stale_after_ms: default_stale_ms(),
        }
    }
}

/// Where a camera view's frames come from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum ViewSource {
    /// A V4L2 device (`/dev/video0` or a stable `/dev/v4l/by-id/...` link).
    Device {
        /// Device path.
        path: PathBuf,
    },
    /// A directory of PNG/JPEG images, shown in name order, each for `hold_ms`, then cycled.
    Directory {
        /// Directory path.
        path: PathBuf,
        /// How long each image stays the latest frame.
        #[serde(default = "default_hold_ms")]
        hold_ms: u64,
    },
    /// A generated moving test pattern (no hardware).
    TestPattern {},
}

fn default_hold_ms() -> u64 {
    1_000
}

/// Where audio comes from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum AudioSource {
    /// A cpal (ALSA) input device: `default` or a device name as cpal lists it.
    Device {
        /// Device name.
        #[serde(default = "default_audio_device")]
        name: String,
    },
    /// A mono or stereo PCM WAV file replayed in real time, in a loop with `gap_ms` of silence.
    WavFile {
        /// File path; its sample rate must equal `sample_rate_hz`.
        path: PathBuf,
        /// Silence between two replays.
        #[serde(default = "default_gap_ms")]
        gap_ms: u64,
    },
}

fn default_audio_device() -> String {
    "default".to_owned()
}
fn default_gap_ms() -> u64 {
    2_000
}

impl Default for AudioSource {
    fn default() -> Self {
        AudioSource::Device { name: default_audio_device() }
    }
}

/// The `[sensing.audio]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioSettings {
    /// Input source.
    #[serde(default)]
    pub input: AudioSource,
    /// Capture rate; Silero VAD runs at 16000 Hz.
    #[serde(default = "default_rate")]
    pub sample_rate_hz: u32,
    /// Length of the rolling buffer, which also caps an utterance's length.
    #[serde(default = "default_buffer_secs")]
    pub buffer_secs: u32,
    /// Speech probability above which a frame is speech.
    #[serde(default = "default_vad_threshold")]
    pub vad_threshold: f32,
    /// Silence that ends an utterance.
    #[serde(default = "default_min_silence_ms")]
    pub min_silence_ms: u32,
    /// Shortest speech kept as an utterance.
    #[serde(default = "default_min_speech_ms")]
    pub min_speech_ms: u32,
    /// Audio kept before and after the detected speech.
    #[serde(default = "default_speech_pad_ms")]
    pub speech_pad_ms: u32,
    /// Path of `silero_vad_16k_sequence.onnx`; when absent it is looked up from
    /// `TMO_SILERO_VAD`, then from the Python `silero_vad` package's data folder.
    #[serde(default)]
    pub vad_model: Option<PathBuf>,
}

fn default_rate() -> u32 {
    16_000
}
fn default_buffer_secs() -> u32 {
    10
}
fn default_vad_threshold() -> f32 {
    0.5
}
fn default_min_silence_ms() -> u32 {
    500
}
fn default_min_speech_ms() -> u32 {
    250
}
fn default_speech_pad_ms() -> u32 {
    100
}

impl Default for AudioSettings {
    fn default() -> Self {
        AudioSettings {
            input: AudioSource::default(),
            sample_rate_hz: default_rate(),
            buffer_secs: default_buffer_secs(),
            vad_threshold: default_vad_threshold(),
            min_silence_ms: default_min_silence_ms(),
            min_speech_ms: default_min_speech_ms(),
            speech_pad_ms: default_speech_pad_ms(),
            vad_model: None,
        }
    }
}

impl SensingSettings {
    /// Checks the values; on failure returns the dotted field name and the reason.
    pub(crate) fn check(&self, camera_names: &[&str]) -> Result<(), (String, String)> {
        let bad = |f: &str, r: String| Err((format!("sensing.{f}"), r));
        let t = &self.telemetry;
        if !(10..=60_000).contains(&t.period_ms) {
            return bad("telemetry.period_ms", format!("must be 10 to 60000, found {}", t.period_ms));
        }
        if t.pmic_interval_ms < 1_000 {
            return bad(
                "telemetry.pmic_interval_ms",
                format!(
                    "must be at least 1000 (the PMIC is read at most once a second), found {}",
                    t.pmic_interval_ms
                ),
            );
        }
        if t.energy_history_secs == 0 || t.energy_history_secs > 86_400 {
            return bad(
                "telemetry.energy_history_secs",
                format!("must be 1 to 86400, found {}", t.energy_history_secs),
            );
        }
        if t.hwmon_total_rail.trim().is_empty() {
            return bad("telemetry.hwmon_total_rail", "must not be empty".into());
        }
        let c = &self.camera;
        if !(16..=4096).contains(&c.width) {
            return bad("camera.width", format!("must be 16 to 4096, found {}", c.width));
        }
        if !(16..=4096).contains(&c.height) {
            return bad("camera.height", format!("must be 16 to 4096, found {}", c.height));
        }
        if !(1..=120).contains(&c.fps) {
            return bad("camera.fps", format!("must be 1 to 120, found {}", c.fps));
        }
        if !(1..=100).contains(&c.jpeg_quality) {
            return bad("camera.jpeg_quality", format!("must be 1 to 100, found {}", c.jpeg_quality));
        }
        if c.jpeg_max_bytes < 4_096 {
            return bad(
                "camera.jpeg_max_bytes",
                format!("must be at least 4096, found {}", c.jpeg_max_bytes),
            );
        }
        if c.stale_after_ms == 0 {
            return bad("camera.stale_after_ms", "must be > 0".into());
        }
        for (name, source) in &self.views {
            if !camera_names.contains(&name.as_str()) {
                return bad(
                    &format!("views.{name}"),
                    format!(
                        "names no camera modality of this profile (cameras: {})",
                        camera_names.join(", ")
                    ),
                );
            }
            match source {
                ViewSource::Device { path } | ViewSource::Directory { path, .. }
                    if path.as_os_str().is_empty() =>
                {
                    return bad(&format!("views.{name}.path"), "must not be empty".into());
                }
                ViewSource::Directory { hold_ms: 0, .. } => {
                    return bad(&format!("views.{name}.hold_ms"), "must be > 0".into());
                }
                _ => {}
            }
        }
        if self.retry_initial_ms == 0 || self.retry_initial_ms > self.retry_max_ms {
            return bad(
                "retry_initial_ms",
                format!(
                    "must be > 0 and <= retry_max_ms ({}), found {}",
                    self.retry_max_ms, self.retry_initial_ms
                ),
            );
        }
        if let Some(a) = &self.audio {
            if a.sample_rate_hz != 16_000 {
                return bad(
                    "audio.sample_rate_hz",
                    format!(
                        "must be 16000 (the Silero VAD sequence model's rate), found {}",
                        a.sample_rate_hz
                    ),
                );
            }
            if !(1..=120).contains(&a.buffer_secs) {
                return bad("audio.buffer_secs", format!("must be 1 to 120, found {}", a.buffer_secs));
            }
            if !(a.vad_threshold > 0.0 && a.vad_threshold < 1.0) {
                return bad(
                    "audio.vad_threshold",
                    format!("must be between 0 and 1, found {}", a.vad_threshold),
                );
            }
            if a.min_silence_ms == 0 {
                return bad("audio.min_silence_ms", "must be > 0".into());
            }
            match &a.input {
                AudioSource::Device { name } if name.trim().is_empty() => {
                    return bad("audio.input.name", "must not be empty".into());
                }
                AudioSource::WavFile { path, .. } if path.as_os_str().is_empty() => {
                    return bad("audio.input.path", "must not be empty".into());
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{BUILTIN, DeviceProfile};

    use super::*;

    fn x86() -> &'static str {
        BUILTIN.iter().find(|(n, _)| *n == "x86-dev").map(|(_, t)| *t).unwrap_or_default()
    }

    #[test]
    fn a_profile_without_sensing_gets_the_defaults() {
        let text = BUILTIN[0].1;
        let cut = text.find("[sensing").map_or(text, |i| &text[..i]);
        let p = DeviceProfile::from_toml_str(cut, "t").unwrap();
        assert_eq!(p.sensing, SensingSettings::default());
        assert_eq!(p.sensing.camera.width, 640);
        assert_eq!(p.sensing.telemetry.energy, EnergySourceKind::Auto);
        assert!(p.sensing.audio.is_none());
    }

    #[test]
    fn x86_dev_uses_test_patterns_and_every_board_names_its_energy_source() {
        let p = DeviceProfile::from_toml_str(x86(), "x86-dev").unwrap();
        assert_eq!(p.sensing.views.len(), 3);
        assert!(p.sensing.views.values().all(|v| *v == ViewSource::TestPattern {}));
        assert_eq!(
            DeviceProfile::builtin("raspberry-pi-5").unwrap().sensing.telemetry.energy,
            EnergySourceKind::Rpi5Pmic
        );
        assert_eq!(
            DeviceProfile::builtin("jetson-orin-nano").unwrap().sensing.telemetry.energy,
            EnergySourceKind::Hwmon
        );
    }

    #[test]
    fn sensing_errors_name_the_field() {
        let cases = [
            ("jpeg_quality = 80", "jpeg_quality = 0", "sensing.camera.jpeg_quality"),
            ("fps = 15", "fps = 0", "sensing.camera.fps"),
            ("period_ms = 1000", "period_ms = 1", "sensing.telemetry.period_ms"),
            ("sample_rate_hz = 16000", "sample_rate_hz = 44100", "sensing.audio.sample_rate_hz"),
            ("[sensing.views.view-2]", "[sensing.views.view-9]", "sensing.views.view-9"),
        ];
        for (from, to, field) in cases {
            assert!(x86().contains(from), "{from}");
            let err =
                DeviceProfile::from_toml_str(&x86().replacen(from, to, 1), "t").unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        let pmic = DeviceProfile::builtin("raspberry-pi-5").unwrap();
        assert_eq!(pmic.sensing.telemetry.pmic_interval_ms, 1000);
        let text = BUILTIN.iter().find(|(n, _)| *n == "raspberry-pi-5").map(|(_, t)| *t).unwrap_or_default();
        let err = DeviceProfile::from_toml_str(
            &text.replace("pmic_interval_ms = 1000", "pmic_interval_ms = 10"),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sensing.telemetry.pmic_interval_ms"), "{err}");
    }

    #[test]
    fn unknown_sensing_fields_and_sources_are_rejected() {
        let extra = x86().replacen("source = \"test_pattern\"", "source = \"test_pattern\"\ncolour = 1", 1);
        let err = DeviceProfile::from_toml_str(&extra, "t").unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
        let bad = x86().replacen("source = \"test_pattern\"", "source = \"webcam\"", 1);
        let err = DeviceProfile::from_toml_str(&bad, "t").unwrap_err().to_string();
        assert!(err.contains("webcam"), "{err}");
        let dir = x86().replacen("source = \"test_pattern\"", "source = \"directory\"\npath = \"/tmp/x\"", 1);
        let p = DeviceProfile::from_toml_str(&dir, "t").unwrap();
        assert_eq!(p.sensing.views["view-0"], ViewSource::Directory { path: "/tmp/x".into(), hold_ms: 1000 });
    }
}

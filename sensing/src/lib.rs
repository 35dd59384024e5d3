//! Device sensing: telemetry and energy, camera views, audio and voice activity.
//!
//! [`Sensing::start`] spawns named worker threads from a board's [`DeviceProfile`]: one telemetry
//! sampler, one thread per camera view, and (when audio is configured) an audio capture thread and
//! a VAD thread. They publish latest values; readers use a cloneable [`SensingHandle`] whose
//! methods take short locks, never held across an await, and return owned values:
//!
//! - [`SensingHandle::telemetry`]: the latest [`TelemetrySnapshot`] (an `Arc` clone);
//! - [`SensingHandle::availability`]: one bool per modality, in the profile's policy order;
//! - [`SensingHandle::modality_jpeg`]: a JPEG of a view's latest frame, encoded on call
//!   (blocking work: call it from `spawn_blocking`);
//! - [`SensingHandle::utterance_wav`]: the latest utterance cut by VAD, as WAV bytes;
//! - [`SensingHandle::energy_between`]: joules used between two instants.
//!
//! A source that fails (a camera unplugged, a directory removed, an audio device error, a sysfs
//! file gone) is logged once with its cause, shown unavailable, and retried with backoff.

pub mod audio;
pub mod camera;
pub mod energy;
mod health;
pub mod telemetry;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use device_profiles::{AudioSettings, DeviceProfile, ModalityKind, ViewSource};
use serde::Serialize;

pub use audio::{AudioError, Utterance, VadStatus};
pub use camera::{CameraError, Jpeg, ViewStatus};
pub use energy::{EnergyError, EnergySpan};
pub use health::Health;
pub use telemetry::{TelemetrySnapshot, Temperature};

use crate::audio::AudioShared;
use crate::camera::ViewSlot;
use crate::health::{Stop, lock};
use crate::telemetry::TelemetrySampler;

/// Errors of the sensing boundary.
#[derive(Debug, thiserror::Error)]
pub enum SensingError {
    /// sysinfo could not start.
    #[error("telemetry cannot start: {0}")]
    Telemetry(#[from] sysinfo::Error),
    /// A worker thread could not be spawned.
    #[error("cannot spawn the {name} thread: {source}")]
    Spawn {
        /// Thread name.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No modality with that index.
    #[error("no modality {0}")]
    NoSuchModality(usize),
    /// The modality is not of the kind asked for.
    #[error("modality {index} is a {kind} modality")]
    WrongKind {
        /// Modality index.
        index: usize,
        /// Its kind.
        kind: ModalityKind,
    },
    /// Camera capture or encoding failed.
    #[error(transparent)]
    Camera(#[from] CameraError),
    /// Audio failed.
    #[error(transparent)]
    Audio(#[from] AudioError),
    /// No utterance has been cut yet (or audio is off).
    #[error("no utterance captured")]
    NoUtterance,
}

#[derive(Debug)]
enum Slot {
    Camera(Arc<ViewSlot>),
    Audio,
}

#[derive(Debug)]
struct Shared {
    names: Vec<String>,
    slots: Vec<Slot>,
    camera: device_profiles::CameraSettings,
    telemetry: Mutex<Arc<TelemetrySnapshot>>,
    sampler: Mutex<TelemetrySampler>,
    audio: Option<Arc<AudioShared>>,
}

/// Status of one modality.
#[derive(Debug, Clone, Serialize)]
pub struct ModalityStatus {
    /// Modality name from the profile.
    pub name: String,
    /// `camera` or `audio`.
    pub kind: String,
    /// Whether the decision may attach it now.
    pub available: bool,
    /// Age of the latest frame (camera) or utterance (audio), in milliseconds.
    pub age_ms: Option<u64>,
    /// Source health.
    pub health: Health,
}

/// Everything `tmod sense` shows.
#[derive(Debug, Clone, Serialize)]
pub struct SensingStatus {
    /// Latest telemetry.
    pub telemetry: TelemetrySnapshot,
    /// Modalities in policy order.
    pub modalities: Vec<ModalityStatus>,
    /// Audio input health, when audio runs.
    pub audio: Option<Health>,
    /// Voice activity, when audio runs.
    pub vad: Option<VadStatus>,
}

/// The frames of the camera views at one instant (a turn's arrival), from
/// [`SensingHandle::snapshot_views`]: what the device saw when it was asked, encoded while the
/// question is classified, and attached if the decision takes them.
#[derive(Debug, Clone, Default)]
pub struct ViewSnapshot {
    /// Per modality (policy order): the frame, for a camera view that was up.
    frames: Vec<Option<Arc<camera::Frame>>>,
}

/// Cheap, cloneable read access to what sensing captured.
#[derive(Debug, Clone)]
pub struct SensingHandle {
    shared: Arc<Shared>,
}

impl SensingHandle {
    /// The latest telemetry snapshot.
    pub fn telemetry(&self) -> Arc<TelemetrySnapshot> {
        lock(&self.shared.telemetry).clone()
    }

    /// Modality names in policy order.
    pub fn modality_names(&self) -> &[String] {
        &self.shared.names
    }

    /// Status of every modality, in policy order.
    pub fn modalities(&self) -> Vec<ModalityStatus> {
        let now = Instant::now();
        let stale = Duration::from_millis(self.shared.camera.stale_after_ms);
        self.shared
            .slots
            .iter()
            .zip(&self.shared.names)
            .map(|(slot, name)| match slot {
                Slot::Camera(view) => {
                    let st = view.status(now);
                    let fresh = st.frame_age_ms.is_some_and(|a| Duration::from_millis(a) <= stale);
                    ModalityStatus {
                        name: name.clone(),
                        kind: ModalityKind::Camera.to_string(),
                        available: st.health.up && fresh,
                        age_ms: st.frame_age_ms,
                        health: st.health,
                    }
                }
                Slot::Audio => {
                    let (health, utt) = match &self.shared.audio {
                        Some(a) => (a.health(), a.utterance()),
                        None => (Health::default(), None),
                    };
                    ModalityStatus {
                        name: name.clone(),
                        kind: ModalityKind::Audio.to_string(),
                        available: health.up && utt.is_some(),
                        age_ms: utt.map(|u| u.ended.elapsed().as_millis() as u64),
                        health,
                    }
                }
            })
            .collect()
    }

    /// Whether each modality can be attached now, in policy order (the decision's mask).
    pub fn availability(&self) -> Vec<bool> {
        self.modalities().into_iter().map(|m| m.available).collect()
    }

    /// JPEG of the latest frame of camera modality `index` (policy order), at the profile's
    /// resolution and quality, under its size cap. Blocking (decode + encode, a few ms, once per
    /// frame: see [`camera::Frame::jpeg`]).
    pub fn modality_jpeg(&self, index: usize) -> Result<Jpeg, SensingError> {
        self.view_jpeg(index, None)
    }

    /// The latest frame of every camera view that is up, at this instant (`None` for the
    /// others and for audio modalities).
    pub fn snapshot_views(&self) -> ViewSnapshot {
        let frames = self
            .shared
            .slots
            .iter()
            .map(|slot| match slot {
                Slot::Camera(view) => match view.latest() {
                    (Some(frame), health) if health.up => Some(frame),
                    _ => None,
                },
                Slot::Audio => None,
            })
            .collect();
        ViewSnapshot { frames }
    }

    /// Starts encoding the frames of `snapshot` on a thread of its own, one after the other
    /// (a few ms each), and returns at once: a request attaching them later finds their JPEGs
    /// made, or waits for the one being made.
    pub fn encode_snapshot(&self, snapshot: &ViewSnapshot) {
        if snapshot.frames.iter().all(Option::is_none) {
            return;
        }
        let (handle, snapshot) = (self.clone(), snapshot.clone());
        let spawned = std::thread::Builder::new().name("encode-views".into()).spawn(move || {
            for index in 0..snapshot.frames.len() {
                if snapshot.frames[index].is_some() {
                    let _ = handle.view_jpeg(index, Some(&snapshot));
                }
            }
        });
        if let Err(e) = spawned {
            tracing::debug!("views not encoded ahead: {e}");
        }
    }

    /// JPEG of camera modality `index` as `snapshot` holds it (the frame of that instant), or of
    /// its latest frame when the snapshot has none for it.
    pub fn snapshot_jpeg(&self, index: usize, snapshot: &ViewSnapshot) -> Result<Jpeg, SensingError> {
        self.view_jpeg(index, Some(snapshot))
    }

    fn view_jpeg(&self, index: usize, snapshot: Option<&ViewSnapshot>) -> Result<Jpeg, SensingError> {
        let slot = self.shared.slots.get(index).ok_or(SensingError::NoSuchModality(index))?;
        let Slot::Camera(view) = slot else {
            return Err(SensingError::WrongKind { index, kind: ModalityKind::Audio });
        };
        let taken = snapshot.and_then(|s| s.frames.get(index).cloned().flatten());
        let frame = match taken {
            Some(frame) => frame,
            None => match view.latest() {
                (Some(f), health) if health.up => f,
                (_, health) => {
                    let cause = health.cause.unwrap_or_else(|| "no frame captured yet".into());
                    return Err(CameraError::Unavailable { view: index, cause }.into());
                }
            },
        };
        let c = &self.shared.camera;
        Ok(frame.jpeg(index, c.width, c.height, c.jpeg_quality, c.jpeg_max_bytes)?)
    }

    /// The latest utterance cut by VAD.
    pub fn utterance(&self) -> Option<Arc<Utterance>> {
        self.shared.audio.as_ref()?.utterance()
    }

    /// The latest utterance as a 16-bit mono WAV file.
    pub fn utterance_wav(&self) -> Result<Vec<u8>, SensingError> {
        Ok(self.utterance().ok_or(SensingError::NoUtterance)?.to_wav()?)
    }

    /// Voice activity state, when audio runs.
    pub fn vad(&self) -> Option<VadStatus> {
        self.shared.audio.as_ref().map(|a| a.vad())
    }

    /// Energy used between two instants, integrated from the sampled meter.
    pub fn energy_between(&self, from: Instant, to: Instant) -> Result<EnergySpan, EnergyError> {
        lock(&self.shared.sampler).ledger.between(from, to)
    }

    /// Everything at once, for display.
    pub fn status(&self) -> SensingStatus {
        SensingStatus {
            telemetry: (*self.telemetry()).clone(),
            modalities: self.modalities(),
            audio: self.shared.audio.as_ref().map(|a| a.health()),
            vad: self.vad(),
        }
    }
}

/// The running sensing side; dropping it stops the workers.
#[derive(Debug)]
pub struct Sensing {
    handle: SensingHandle,
    stop: Arc<Stop>,
    threads: Vec<JoinHandle<()>>,
}

impl Sensing {
    /// Starts every worker the profile asks for. Sources that are missing do not fail the start:
    /// they show unavailable and are retried.
    pub fn start(profile: &DeviceProfile) -> Result<Self, SensingError> {
        let s = &profile.sensing;
        let mut sampler = TelemetrySampler::new(&s.telemetry)?;
        let first = Arc::new(sampler.sample());
        let audio_settings: Option<AudioSettings> = s.audio.clone().or_else(|| {
            profile.modalities.iter().any(|m| m.kind == ModalityKind::Audio).then(AudioSettings::default)
        });
        let audio = audio_settings.as_ref().map(|a| Arc::new(AudioShared::new(a)));
        let mut slots = Vec::new();
        let mut views = Vec::new();
        let mut camera_index = 0;
        for m in &profile.modalities {
            match m.kind {
                ModalityKind::Camera => {
                    let slot = Arc::new(ViewSlot::default());
                    let source = s.views.get(&m.name).cloned().unwrap_or_else(|| ViewSource::Device {
                        path: format!("/dev/video{camera_index}").into(),
                    });
                    camera_index += 1;
                    views.push((m.name.clone(), source, slot.clone()));
                    slots.push(Slot::Camera(slot));
                }
                ModalityKind::Audio => slots.push(Slot::Audio),
            }
        }
        let shared = Arc::new(Shared {
            names: profile.modalities.iter().map(|m| m.name.clone()).collect(),
            slots,
            camera: s.camera.clone(),
            telemetry: Mutex::new(first),
            sampler: Mutex::new(sampler),
            audio: audio.clone(),
        });
        let mut sensing = Sensing {
            handle: SensingHandle { shared: shared.clone() },
            stop: Arc::new(Stop::default()),
            threads: Vec::new(),
        };

        let period = Duration::from_millis(s.telemetry.period_ms);
        let (sh, stop) = (shared.clone(), sensing.stop.clone());
        sensing.spawn("sense-telemetry", move || {
            while !stop.sleep(period) {
                let snap = lock(&sh.sampler).sample();
                *lock(&sh.telemetry) = Arc::new(snap);
            }
        })?;
        for (name, source, slot) in views {
            let worker = camera::ViewWorker {
                name: name.clone(),
                source,
                camera: s.camera.clone(),
                retry_initial_ms: s.retry_initial_ms,
                retry_max_ms: s.retry_max_ms,
            };
            let stop = sensing.stop.clone();
            sensing.spawn(&format!("sense-{name}"), move || worker.run(slot, stop))?;
        }
        if let (Some(settings), Some(audio)) = (audio_settings, audio) {
            let capture = audio::CaptureWorker {
                settings: settings.clone(),
                retry_initial_ms: s.retry_initial_ms,
                retry_max_ms: s.retry_max_ms,
            };
            let (a, stop) = (audio.clone(), sensing.stop.clone());
            sensing.spawn("sense-audio", move || capture.run(a, stop))?;
            let vad = audio::VadWorker { settings };
            let stop = sensing.stop.clone();
            sensing.spawn("sense-vad", move || vad.run(audio, stop))?;
        }
        Ok(sensing)
    }

    fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), SensingError> {
        let t = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(f)
            .map_err(|source| SensingError::Spawn { name: name.to_owned(), source })?;
        self.threads.push(t);
        Ok(())
    }

    /// A handle for readers.
    pub fn handle(&self) -> SensingHandle {
        self.handle.clone()
    }

    /// Stops the workers and waits for those that finish within `deadline` (a camera thread
    /// blocked inside a stalled device read is left behind).
    pub fn shutdown(mut self, deadline: Duration) {
        self.stop.stop();
        let until = Instant::now() + deadline;
        for t in std::mem::take(&mut self.threads) {
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Sensing {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

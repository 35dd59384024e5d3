//! Audio: a rolling buffer of the last N seconds fed by a cpal (ALSA) input or a WAV file, and
//! voice activity detection with Silero VAD (the `silero_vad_16k_sequence.onnx` graph from PyPI
//! `silero_vad`, run by tract) that cuts the latest utterance.

use std::collections::VecDeque;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use device_profiles::{AudioSettings, AudioSource};
use serde::Serialize;
use tract_onnx::prelude::*;

use crate::health::{Backoff, Health, Stop, lock};

/// Samples in one VAD frame at 16 kHz.
pub const FRAME_SAMPLES: usize = 512;
/// Samples of the previous frame the model sees before each frame.
const CONTEXT_SAMPLES: usize = 64;
/// Frames per model call.
pub const FRAMES_PER_CALL: usize = 8;
/// The model file name inside the `silero_vad` package.
pub const VAD_MODEL_FILE: &str = "silero_vad_16k_sequence.onnx";
/// Environment variable naming the model file.
pub const VAD_MODEL_ENV: &str = "TMO_SILERO_VAD";

/// Audio and VAD errors.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// No model file was found.
    #[error(
        "Silero VAD model not found: set {VAD_MODEL_ENV} or `sensing.audio.vad_model` to {VAD_MODEL_FILE}, or install it with `pip install --no-deps silero_vad==6.2.3`"
    )]
    ModelNotFound,
    /// tract could not load or run the model.
    #[error("Silero VAD model {path}: {message}")]
    Model {
        /// The model file.
        path: PathBuf,
        /// tract's message.
        message: String,
    },
    /// A WAV file could not be read or written.
    #[error("WAV {what}: {source}")]
    Wav {
        /// The file or clip.
        what: String,
        /// hound's error.
        source: hound::Error,
    },
    /// A WAV file has the wrong sample rate.
    #[error("{path} is sampled at {found} Hz; the profile captures at {expected} Hz")]
    SampleRate {
        /// The file.
        path: PathBuf,
        /// Its rate.
        found: u32,
        /// The configured rate.
        expected: u32,
    },
}

/// Finds the VAD model: the profile's path, then `$TMO_SILERO_VAD`, then the data folder of the
/// Python `silero_vad` package (located without importing it).
pub fn find_vad_model(configured: Option<&Path>) -> Result<PathBuf, AudioError> {
    if let Some(p) = configured {
        return if p.is_file() { Ok(p.to_owned()) } else { Err(AudioError::ModelNotFound) };
    }
    if let Some(p) = std::env::var_os(VAD_MODEL_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(AudioError::ModelNotFound) };
    }
    let script = "import importlib.util as u; s = u.find_spec('silero_vad'); print(s.submodule_search_locations[0] if s else '')";
    for python in ["python3", "python"] {
        if let Ok(out) = std::process::Command::new(python).args(["-c", script]).output() {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !dir.is_empty() {
                let p = Path::new(&dir).join("data").join(VAD_MODEL_FILE);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
    }
    let shared = Path::new("/usr/share/tmo-edge").join(VAD_MODEL_FILE);
    if shared.is_file() { Ok(shared) } else { Err(AudioError::ModelNotFound) }
}

type Plan = Arc<TypedRunnableModel>;

/// Silero VAD, streaming: it keeps the LSTM state and the last frame's tail between calls.
#[derive(Debug)]
pub struct SileroVad {
    plan: Plan,
    path: PathBuf,
    h: Tensor,
    c: Tensor,
    zeros: Tensor,
    context: [f32; CONTEXT_SAMPLES],
    block: Vec<f32>,
}

impl SileroVad {
    /// Loads the model from `path`.
    pub fn load(path: &Path) -> Result<Self, AudioError> {
        let err = |e: TractError| AudioError::Model { path: path.to_owned(), message: format!("{e:#}") };
        let width = CONTEXT_SAMPLES + FRAME_SAMPLES;
        let plan = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(err)?
            .with_input_fact(0, f32::fact([FRAMES_PER_CALL, width]).into())
            .map_err(err)?
            .with_input_fact(1, f32::fact([1, 1, 128]).into())
            .map_err(err)?
            .with_input_fact(2, f32::fact([1, 1, 128]).into())
            .map_err(err)?
            .with_outputs_by_name(["speech_probs", "hn", "cn"])
            .map_err(err)?
            .into_optimized()
            .map_err(err)?
            .into_runnable()
            .map_err(err)?;
        let zeros = Tensor::zero::<f32>(&[1, 1, 128]).map_err(err)?;
        Ok(SileroVad {
            plan,
            path: path.to_owned(),
            h: zeros.clone(),
            c: zeros.clone(),
            zeros,
            context: [0.0; CONTEXT_SAMPLES],
            block: Vec::with_capacity(FRAMES_PER_CALL * width),
        })
    }

    /// Clears the state (a new stream).
    pub fn reset(&mut self) {
        self.h = self.zeros.clone();
        self.c = self.zeros.clone();
        self.context = [0.0; CONTEXT_SAMPLES];
    }

    /// Speech probability of each of the [`FRAMES_PER_CALL`] frames in `samples`
    /// (`FRAMES_PER_CALL * FRAME_SAMPLES` samples at 16 kHz).
    pub fn probabilities(&mut self, samples: &[f32]) -> Result<Vec<f32>, AudioError> {
        let err = |e: TractError| AudioError::Model { path: self.path.clone(), message: format!("{e:#}") };
        debug_assert_eq!(samples.len(), FRAMES_PER_CALL * FRAME_SAMPLES);
        self.block.clear();
        for frame in samples.chunks_exact(FRAME_SAMPLES) {
            self.block.extend_from_slice(&self.context);
            self.block.extend_from_slice(frame);
            self.context.copy_from_slice(&frame[FRAME_SAMPLES - CONTEXT_SAMPLES..]);
        }
        let input = Tensor::from_shape(&[FRAMES_PER_CALL, CONTEXT_SAMPLES + FRAME_SAMPLES], &self.block)
            .map_err(err)?;
        let out = self
            .plan
            .run(tvec!(input.into_tvalue(), self.h.clone().into_tvalue(), self.c.clone().into_tvalue()))
            .map_err(err)?;
        let probs = out[0].try_as_plain_ram().map_err(err)?.as_slice::<f32>().map_err(err)?.to_vec();
        self.h = out[1].clone().into_tensor();
        self.c = out[2].clone().into_tensor();
        Ok(probs)
    }
}

/// Cuts utterances out of per-frame speech probabilities (Silero's own rule: speech starts above
/// the threshold, ends after `min_silence_ms` below threshold - 0.15).
#[derive(Debug, Clone)]
pub struct Segmenter {
    threshold: f32,
    neg_threshold: f32,
    min_silence_frames: u64,
    min_speech_frames: u64,
    max_frames: u64,
    start: Option<u64>,
    silence_start: Option<u64>,
}

impl Segmenter {
    /// A segmenter for the settings at 16 kHz.
    pub fn new(s: &AudioSettings) -> Self {
        let frames = |ms: u32| u64::from(ms) * 16 / FRAME_SAMPLES as u64;
        Segmenter {
            threshold: s.vad_threshold,
            neg_threshold: (s.vad_threshold - 0.15).max(0.01),
            min_silence_frames: frames(s.min_silence_ms).max(1),
            min_speech_frames: frames(s.min_speech_ms),
            max_frames: frames(s.buffer_secs * 1000).saturating_sub(frames(2 * s.speech_pad_ms)).max(1),
            start: None,
            silence_start: None,
        }
    }

    /// True while inside speech.
    pub fn in_speech(&self) -> bool {
        self.start.is_some()
    }

    /// Feeds the probability of frame `index`; returns a finished utterance as a frame range.
    pub fn push(&mut self, index: u64, p: f32) -> Option<(u64, u64)> {
        match self.start {
            None => {
                if p >= self.threshold {
                    self.start = Some(index);
                    self.silence_start = None;
                }
                None
            }
            Some(start) => {
                if p >= self.threshold {
                    self.silence_start = None;
                } else if p < self.neg_threshold {
                    self.silence_start.get_or_insert(index);
                }
                let end = match self.silence_start {
                    Some(s) if index + 1 - s >= self.min_silence_frames => Some(s),
                    _ if index + 1 - start >= self.max_frames => Some(index + 1),
                    _ => None,
                }?;
                self.start = None;
                self.silence_start = None;
                (end - start >= self.min_speech_frames).then_some((start, end))
            }
        }
    }
}

/// Rolling buffer of the last N samples, addressed by absolute sample number.
#[derive(Debug)]
pub struct AudioRing {
    samples: VecDeque<f32>,
    capacity: usize,
    end: u64,
}

impl AudioRing {
    /// A ring holding `capacity` samples.
    pub fn new(capacity: usize) -> Self {
        AudioRing { samples: VecDeque::with_capacity(capacity), capacity, end: 0 }
    }
    /// Appends samples, dropping the oldest beyond the capacity.
    pub fn push(&mut self, s: &[f32]) {
        let s = if s.len() > self.capacity { &s[s.len() - self.capacity..] } else { s };
        let overflow = (self.samples.len() + s.len()).saturating_sub(self.capacity);
        self.samples.drain(..overflow);
        self.samples.extend(s.iter().copied());
        self.end += s.len() as u64;
    }
    /// Absolute number of the next sample.
    pub fn end(&self) -> u64 {
        self.end
    }
    /// Absolute number of the oldest sample held.
    pub fn start(&self) -> u64 {
        self.end - self.samples.len() as u64
    }
    /// Samples `[from, to)`, clamped to what is held.
    pub fn range(&self, from: u64, to: u64) -> Vec<f32> {
        let from = from.max(self.start());
        let to = to.min(self.end);
        if from >= to {
            return Vec::new();
        }
        let a = (from - self.start()) as usize;
        let b = (to - self.start()) as usize;
        self.samples.range(a..b).copied().collect()
    }
}

/// The latest utterance.
#[derive(Debug, Clone)]
pub struct Utterance {
    /// Mono samples at `sample_rate_hz`.
    pub samples: Vec<f32>,
    /// Sample rate.
    pub sample_rate_hz: u32,
    /// When speech ended.
    pub ended: Instant,
}

impl Utterance {
    /// Length in seconds.
    pub fn duration_secs(&self) -> f64 {
        self.samples.len() as f64 / f64::from(self.sample_rate_hz)
    }
    /// The clip as a 16-bit mono WAV file.
    pub fn to_wav(&self) -> Result<Vec<u8>, AudioError> {
        let err = |source| AudioError::Wav { what: "utterance".into(), source };
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: self.sample_rate_hz,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut out = Cursor::new(Vec::with_capacity(44 + self.samples.len() * 2));
        let mut w = hound::WavWriter::new(&mut out, spec).map_err(err)?;
        for s in &self.samples {
            w.write_sample((s.clamp(-1.0, 1.0) * 32767.0) as i16).map_err(err)?;
        }
        w.finalize().map_err(err)?;
        Ok(out.into_inner())
    }
}

/// Voice activity state for display.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VadStatus {
    /// `speech`, `silence`, or `off` when the model is not loaded.
    pub state: &'static str,
    /// Speech probability of the latest frame.
    pub probability: f32,
    /// Utterances cut so far.
    pub utterances: u64,
    /// Seconds since the latest utterance ended.
    pub last_utterance_age_secs: Option<f64>,
    /// Length of the latest utterance in seconds.
    pub last_utterance_secs: Option<f64>,
    /// Why VAD is off, if it is.
    pub error: Option<String>,
}

/// State shared by the audio threads and readers.
#[derive(Debug)]
pub struct AudioShared {
    pub(crate) ring: Mutex<AudioRing>,
    pub(crate) health: Mutex<Health>,
    pub(crate) vad: Mutex<VadStatus>,
    pub(crate) utterance: Mutex<Option<Arc<Utterance>>>,
    pub(crate) sample_rate_hz: u32,
}

impl AudioShared {
    pub(crate) fn new(s: &AudioSettings) -> Self {
        AudioShared {
            ring: Mutex::new(AudioRing::new(s.sample_rate_hz as usize * s.buffer_secs as usize)),
            health: Mutex::new(Health::default()),
            vad: Mutex::new(VadStatus { state: "off", ..VadStatus::default() }),
            utterance: Mutex::new(None),
            sample_rate_hz: s.sample_rate_hz,
        }
    }
    /// The latest utterance.
    pub fn utterance(&self) -> Option<Arc<Utterance>> {
        lock(&self.utterance).clone()
    }
    /// Input health.
    pub fn health(&self) -> Health {
        lock(&self.health).clone()
    }
    /// VAD state.
    pub fn vad(&self) -> VadStatus {
        let mut v = lock(&self.vad).clone();
        if let Some(u) = self.utterance() {
            v.last_utterance_age_secs = Some(u.ended.elapsed().as_secs_f64());
        }
        v
    }
}

/// Reads a WAV file as mono f32; its rate must be `rate`.
pub fn read_wav(path: &Path, rate: u32) -> Result<Vec<f32>, AudioError> {
    let err = |source| AudioError::Wav { what: path.display().to_string(), source };
    let mut r = hound::WavReader::open(path).map_err(err)?;
    let spec = r.spec();
    if spec.sample_rate != rate {
        return Err(AudioError::SampleRate {
            path: path.to_owned(),
            found: spec.sample_rate,
            expected: rate,
        });
    }
    let channels = usize::from(spec.channels.max(1));
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => r.samples::<f32>().collect::<Result<_, _>>().map_err(err)?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            r.samples::<i32>().map(|s| s.map(|v| v as f32 * scale)).collect::<Result<_, _>>().map_err(err)?
        }
    };
    Ok(interleaved.chunks(channels).map(|c| c.iter().sum::<f32>() / c.len() as f32).collect())
}

/// Capture worker: feeds the ring from the configured source, retrying with backoff.
#[derive(Debug, Clone)]
pub(crate) struct CaptureWorker {
    pub settings: AudioSettings,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
}

const SOURCE: &str = "audio";

impl CaptureWorker {
    pub(crate) fn run(self, shared: Arc<AudioShared>, stop: Arc<Stop>) {
        let mut backoff = Backoff::new(self.retry_initial_ms, self.retry_max_ms);
        while !stop.is_stopped() {
            let cause = match &self.settings.input {
                AudioSource::WavFile { path, gap_ms } => {
                    self.replay_wav(path, *gap_ms, &shared, &stop, &mut backoff)
                }
                AudioSource::Device { name } => self.capture_device(name, &shared, &stop, &mut backoff),
            };
            let Some(cause) = cause else { break };
            lock(&shared.health).fail(SOURCE, cause);
            if stop.sleep(backoff.next_delay()) {
                break;
            }
        }
    }

    /// Replays the file in real time until an error (returned) or stop (None).
    fn replay_wav(
        &self,
        path: &Path,
        gap_ms: u64,
        shared: &AudioShared,
        stop: &Stop,
        backoff: &mut Backoff,
    ) -> Option<String> {
        let rate = self.settings.sample_rate_hz;
        let chunk = rate as usize / 50;
        loop {
            let samples = match read_wav(path, rate) {
                Ok(s) => s,
                Err(e) => return Some(e.to_string()),
            };
            let gap = vec![0.0f32; (gap_ms * u64::from(rate) / 1000) as usize];
            let started = Instant::now();
            for (k, piece) in samples.chunks(chunk).chain(gap.chunks(chunk)).enumerate() {
                lock(&shared.ring).push(piece);
                if k == 0 {
                    lock(&shared.health).ok(SOURCE);
                    backoff.reset();
                }
                let due = started + Duration::from_secs_f64(((k + 1) * chunk) as f64 / f64::from(rate));
                if stop.sleep(due.saturating_duration_since(Instant::now())) {
                    return None;
                }
            }
        }
    }

    /// Captures from a cpal device until an error (returned) or stop (None).
    fn capture_device(
        &self,
        name: &str,
        shared: &Arc<AudioShared>,
        stop: &Stop,
        backoff: &mut Backoff,
    ) -> Option<String> {
        use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
        let host = cpal::default_host();
        let device = if name == "default" {
            host.default_input_device()
        } else {
            match host.input_devices() {
                Ok(mut devs) => devs.find(|d| d.to_string() == name),
                Err(e) => return Some(format!("cannot list input devices: {e}")),
            }
        };
        let Some(device) = device else {
            return Some(format!("no audio input device `{name}`"));
        };
        let config = cpal::StreamConfig {
            channels: 1,
            sample_rate: self.settings.sample_rate_hz,
            buffer_size: cpal::BufferSize::Default,
        };
        let (err_tx, err_rx) = std::sync::mpsc::channel::<String>();
        let feed = Arc::clone(shared);
        let last_data = Arc::new(Mutex::new(Instant::now()));
        let seen = Arc::clone(&last_data);
        let stream = match device.build_input_stream::<f32, _, _>(
            config,
            move |data: &[f32], _: &cpal::InputCallbackInfo| {
                lock(&feed.ring).push(data);
                *lock(&seen) = Instant::now();
            },
            move |e| {
                let _ = err_tx.send(e.to_string());
            },
            None,
        ) {
            Ok(s) => s,
            Err(e) => {
                return Some(format!(
                    "audio input `{name}` at {} Hz mono: {e}",
                    self.settings.sample_rate_hz
                ));
            }
        };
        if let Err(e) = stream.play() {
            return Some(format!("audio input `{name}`: {e}"));
        }
        lock(&shared.health).ok(SOURCE);
        backoff.reset();
        loop {
            if stop.sleep(Duration::from_millis(200)) {
                return None;
            }
            if let Ok(e) = err_rx.try_recv() {
                return Some(format!("audio input `{name}`: {e}"));
            }
            if lock(&last_data).elapsed() > Duration::from_secs(2) {
                return Some(format!("audio input `{name}` stopped delivering samples"));
            }
        }
    }
}

/// VAD worker: runs the model over new samples and publishes the state and utterances.
#[derive(Debug)]
pub(crate) struct VadWorker {
    pub settings: AudioSettings,
}

impl VadWorker {
    pub(crate) fn run(self, shared: Arc<AudioShared>, stop: Arc<Stop>) {
        let model = find_vad_model(self.settings.vad_model.as_deref()).and_then(|p| SileroVad::load(&p));
        let mut vad = match model {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(cause = %e, "voice activity detection is off");
                lock(&shared.vad).error = Some(e.to_string());
                return;
            }
        };
        lock(&shared.vad).state = "silence";
        let block = FRAMES_PER_CALL * FRAME_SAMPLES;
        let pad = u64::from(self.settings.speech_pad_ms) * u64::from(self.settings.sample_rate_hz) / 1000;
        let mut seg = Segmenter::new(&self.settings);
        let mut cursor = lock(&shared.ring).end();
        while !stop.sleep(Duration::from_millis(100)) {
            loop {
                let (chunk, ring_start) = {
                    let ring = lock(&shared.ring);
                    if ring.end() < cursor + block as u64 {
                        break;
                    }
                    (ring.range(cursor, cursor + block as u64), ring.start())
                };
                if chunk.len() < block {
                    // The ring overtook the detector (a stall): restart at the oldest sample held.
                    cursor = ring_start;
                    vad.reset();
                    seg = Segmenter::new(&self.settings);
                    continue;
                }
                let probs = match vad.probabilities(&chunk) {
                    Ok(p) => p,
                    Err(e) => {
                        lock(&shared.vad).error = Some(e.to_string());
                        return;
                    }
                };
                let first_frame = cursor / FRAME_SAMPLES as u64;
                for (k, p) in probs.iter().enumerate() {
                    if let Some((a, b)) = seg.push(first_frame + k as u64, *p) {
                        let from = (a * FRAME_SAMPLES as u64).saturating_sub(pad);
                        let to = b * FRAME_SAMPLES as u64 + pad;
                        let samples = lock(&shared.ring).range(from, to);
                        let u = Utterance {
                            samples,
                            sample_rate_hz: shared.sample_rate_hz,
                            ended: Instant::now(),
                        };
                        let secs = u.duration_secs();
                        *lock(&shared.utterance) = Some(Arc::new(u));
                        let mut v = lock(&shared.vad);
                        v.utterances += 1;
                        v.last_utterance_secs = Some(secs);
                        tracing::debug!(secs, "utterance cut");
                    }
                }
                let mut v = lock(&shared.vad);
                v.probability = probs.last().copied().unwrap_or(0.0);
                v.state = if seg.in_speech() { "speech" } else { "silence" };
                cursor += block as u64;
            }
        }
    }
}

/// Runs VAD over a whole clip at 16 kHz; returns the utterances as sample ranges.
pub fn detect_utterances(
    vad: &mut SileroVad,
    s: &AudioSettings,
    samples: &[f32],
) -> Result<Vec<(usize, usize)>, AudioError> {
    vad.reset();
    let mut seg = Segmenter::new(s);
    let block = FRAMES_PER_CALL * FRAME_SAMPLES;
    // Trailing silence lets an utterance that runs to the end of the clip finish.
    let tail = (s.min_silence_ms as usize * 16).div_ceil(block) * block + block;
    let mut padded = samples.to_vec();
    padded.resize(samples.len().div_ceil(block) * block + tail, 0.0);
    let mut out = Vec::new();
    for (b, chunk) in padded.chunks_exact(block).enumerate() {
        for (k, p) in vad.probabilities(chunk)?.into_iter().enumerate() {
            if let Some((a, e)) = seg.push((b * FRAMES_PER_CALL + k) as u64, p) {
                out.push((a as usize * FRAME_SAMPLES, (e as usize * FRAME_SAMPLES).min(samples.len())));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn speech_fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/audio/boil-an-egg-16k.wav")
    }

    fn model() -> SileroVad {
        let path = find_vad_model(None).unwrap_or_else(|e| panic!("{e}"));
        SileroVad::load(&path).unwrap()
    }

    #[test]
    fn the_ring_keeps_the_last_samples_by_absolute_number() {
        let mut r = AudioRing::new(5);
        r.push(&[1.0, 2.0, 3.0]);
        r.push(&[4.0, 5.0, 6.0, 7.0]);
        assert_eq!((r.start(), r.end()), (2, 7));
        assert_eq!(r.range(0, 4), [3.0, 4.0]);
        assert_eq!(r.range(5, 100), [6.0, 7.0]);
        r.push(&[0.0; 12]);
        assert_eq!(r.range(0, 100).len(), 5);
    }

    #[test]
    fn the_segmenter_needs_enough_silence_and_speech() {
        let s = AudioSettings { min_silence_ms: 96, min_speech_ms: 64, ..AudioSettings::default() };
        let mut seg = Segmenter::new(&s);
        let probs = [0.1, 0.9, 0.9, 0.9, 0.2, 0.9, 0.1, 0.1, 0.1, 0.1, 0.95, 0.1, 0.1, 0.1];
        let cuts: Vec<_> = probs.iter().enumerate().filter_map(|(i, p)| seg.push(i as u64, *p)).collect();
        // Frames 1..6 are speech (the dip at 4 is too short); the blip at 10 is too short to keep.
        assert_eq!(cuts, [(1, 6)]);
    }

    #[test]
    fn wav_files_are_checked_for_their_rate() {
        let wav = speech_fixture();
        let samples = read_wav(&wav, 16_000).unwrap();
        assert!(samples.len() > 16_000, "at least a second of speech");
        assert!(matches!(read_wav(&wav, 8_000), Err(AudioError::SampleRate { found: 16_000, .. })));
        assert!(matches!(read_wav(Path::new("/no/such.wav"), 16_000), Err(AudioError::Wav { .. })));
    }

    #[test]
    fn silero_finds_the_spoken_request_and_not_silence() {
        let mut vad = model();
        let s = AudioSettings::default();
        let speech = read_wav(&speech_fixture(), 16_000).unwrap();
        let mut clip = vec![0.0f32; 16_000];
        clip.extend_from_slice(&speech);
        clip.extend(std::iter::repeat_n(0.0, 16_000));
        let cuts = detect_utterances(&mut vad, &s, &clip).unwrap();
        assert!(!cuts.is_empty(), "speech found");
        let (a, b) = (cuts[0].0, cuts.last().map_or(0, |c| c.1));
        assert!((12_000..16_000 + 8_000).contains(&a), "starts near the speech: {a}");
        assert!(b > 16_000 + speech.len() / 2 && b <= clip.len(), "ends after most of it: {b}");
        let silence = vec![0.0f32; 48_000];
        assert!(detect_utterances(&mut vad, &s, &silence).unwrap().is_empty());
    }

    #[test]
    fn an_utterance_becomes_a_wav_clip() {
        let u =
            Utterance { samples: vec![0.0, 0.5, -0.5, 1.0], sample_rate_hz: 16_000, ended: Instant::now() };
        let bytes = u.to_wav().unwrap();
        let r = hound::WavReader::new(Cursor::new(bytes)).unwrap();
        assert_eq!(r.spec().sample_rate, 16_000);
        let back: Vec<i16> = r.into_samples::<i16>().map(|s| s.unwrap()).collect();
        assert_eq!(back, [0, 16383, -16383, 32767]);
    }
}

//! The running sensing side against real sources that fail and come back: a camera directory
//! removed and restored, a malformed image, an audio file that errors, a missing camera device
//! and a sysfs file that disappears. Each is shown unavailable with its cause, counted once, and
//! recovers without a restart.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use device_profiles::{AudioSettings, AudioSource, DeviceProfile, EnergySourceKind, ViewSource};
use sensing::{Sensing, SensingHandle};

fn profile(views: [ViewSource; 3]) -> DeviceProfile {
    let mut p = DeviceProfile::builtin("x86-dev").unwrap();
    for (i, v) in views.into_iter().enumerate() {
        p.sensing.views.insert(format!("view-{i}"), v);
    }
    p.sensing.audio = None;
    p.sensing.retry_initial_ms = 20;
    p.sensing.retry_max_ms = 100;
    p.sensing.telemetry.period_ms = 50;
    p.sensing.telemetry.energy = EnergySourceKind::None;
    p.sensing.camera.stale_after_ms = 1_000;
    p
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn png(path: &Path, colour: [u8; 3]) {
    image::RgbImage::from_pixel(80, 60, image::Rgb(colour)).save(path).unwrap();
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[test]
fn test_patterns_give_fresh_jpegs_and_a_missing_device_is_masked() {
    let p = profile([
        ViewSource::TestPattern {},
        ViewSource::TestPattern {},
        ViewSource::Device { path: "/dev/video-absent-7".into() },
    ]);
    let s = Sensing::start(&p).unwrap();
    let h = s.handle();
    wait_for("two live views", Duration::from_secs(5), || h.availability() == [true, true, false]);
    let jpeg = h.modality_jpeg(0).unwrap();
    assert_eq!((jpeg.width, jpeg.height), (640, 480));
    assert!(jpeg.bytes.len() <= p.sensing.camera.jpeg_max_bytes);
    assert!(jpeg.frame_age < Duration::from_secs(1));
    let m = &h.modalities()[2];
    assert!(m.health.cause.as_deref().is_some_and(|c| c.contains("/dev/video-absent-7")), "{m:?}");
    // Retried with backoff, counted as one failure.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(h.modalities()[2].health.failures, 1);
    let err = h.modality_jpeg(2).unwrap_err().to_string();
    assert!(err.contains("unavailable"), "{err}");
    assert!(h.modality_jpeg(7).is_err());

    // A snapshot keeps the frames of its instant: encoded ahead, attached later unchanged while
    // the views move on; the view that is down is still reported.
    let snapshot = h.snapshot_views();
    h.encode_snapshot(&snapshot);
    let first = h.snapshot_jpeg(1, &snapshot).unwrap();
    std::thread::sleep(Duration::from_millis(250)); // several frames at the profile's fps
    let later = h.snapshot_jpeg(1, &snapshot).unwrap();
    assert_eq!(later.bytes, first.bytes, "the snapshot's frame, not a newer one");
    assert!(later.frame_age >= first.frame_age + Duration::from_millis(200));
    assert_ne!(h.modality_jpeg(1).unwrap().bytes, first.bytes, "the view moved on");
    assert!(h.snapshot_jpeg(2, &snapshot).unwrap_err().to_string().contains("unavailable"));
    s.shutdown(Duration::from_secs(2));
}

#[test]
fn a_removed_image_directory_is_masked_and_recovers_and_bad_images_are_skipped() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("view");
    fs::create_dir(&dir).unwrap();
    png(&dir.join("a.png"), [200, 10, 10]);
    fs::write(dir.join("b.jpg"), b"\xFF\xD8 truncated jpeg").unwrap();
    png(&dir.join("c.png"), [10, 10, 200]);
    let p = profile([
        ViewSource::Directory { path: dir.clone(), hold_ms: 30 },
        ViewSource::TestPattern {},
        ViewSource::TestPattern {},
    ]);
    let s = Sensing::start(&p).unwrap();
    let h = s.handle();
    wait_for("the directory view", Duration::from_secs(5), || h.availability()[0]);
    // Frames keep coming although b.jpg is malformed.
    let seq = |h: &SensingHandle| h.modalities()[0].age_ms;
    std::thread::sleep(Duration::from_millis(200));
    assert!(seq(&h).is_some_and(|a| a < 500));
    assert!(h.modalities()[0].health.failures == 0, "a bad file is skipped, not a source failure");

    let away = root.path().join("away");
    fs::rename(&dir, &away).unwrap();
    wait_for("the view to go down", Duration::from_secs(5), || !h.availability()[0]);
    let m = h.modalities()[0].clone();
    assert!(m.health.cause.as_deref().is_some_and(|c| c.contains("view")), "{m:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.modalities()[0].health.failures, 1, "logged and counted once while it stays away");

    fs::rename(&away, &dir).unwrap();
    wait_for("the view to come back", Duration::from_secs(5), || h.availability()[0]);
    let m = h.modalities()[0].clone();
    assert_eq!((m.health.failures, m.health.recoveries), (1, 1));
    assert!(h.modality_jpeg(0).is_ok());
    s.shutdown(Duration::from_secs(2));
}

#[test]
fn a_failing_audio_file_is_masked_and_recovers_and_speech_becomes_a_wav_clip() {
    let root = tempfile::tempdir().unwrap();
    let wav = root.path().join("request.wav");
    fs::copy(fixtures().join("audio/boil-an-egg-16k.wav"), &wav).unwrap();
    let mut p = profile([ViewSource::TestPattern {}, ViewSource::TestPattern {}, ViewSource::TestPattern {}]);
    p.modalities
        .push(device_profiles::Modality { name: "clip".into(), kind: device_profiles::ModalityKind::Audio });
    p.sensing.audio = Some(AudioSettings {
        input: AudioSource::WavFile { path: wav.clone(), gap_ms: 1_200 },
        ..AudioSettings::default()
    });
    let s = Sensing::start(&p).unwrap();
    let h = s.handle();
    assert_eq!(h.availability().len(), 4);
    wait_for("an utterance", Duration::from_secs(15), || h.availability()[3]);
    let vad = h.vad().unwrap();
    assert!(vad.error.is_none(), "{vad:?}");
    assert!(vad.utterances >= 1);
    let secs = vad.last_utterance_secs.unwrap_or(0.0);
    assert!((0.8..3.0).contains(&secs), "the spoken request lasts about 1.7 s: {secs}");
    let bytes = h.utterance_wav().unwrap();
    let r = hound::WavReader::new(std::io::Cursor::new(bytes)).unwrap();
    assert_eq!((r.spec().sample_rate, r.spec().channels), (16_000, 1));

    // The file turns unreadable: shown down once, then back when it is restored.
    let saved = root.path().join("saved.wav");
    fs::rename(&wav, &saved).unwrap();
    wait_for("audio to go down", Duration::from_secs(10), || !h.availability()[3]);
    let m = h.modalities()[3].clone();
    assert!(m.health.cause.as_deref().is_some_and(|c| c.contains("request.wav")), "{m:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.modalities()[3].health.failures, 1);
    fs::rename(&saved, &wav).unwrap();
    wait_for("audio to come back", Duration::from_secs(10), || h.availability()[3]);
    assert_eq!(h.modalities()[3].health.recoveries, 1);
    s.shutdown(Duration::from_secs(2));
}

#[test]
fn a_missing_audio_device_is_masked_without_blocking() {
    let mut p = profile([ViewSource::TestPattern {}, ViewSource::TestPattern {}, ViewSource::TestPattern {}]);
    p.modalities
        .push(device_profiles::Modality { name: "clip".into(), kind: device_profiles::ModalityKind::Audio });
    p.sensing.audio = Some(AudioSettings {
        input: AudioSource::Device { name: "no-such-input-device".into() },
        ..AudioSettings::default()
    });
    let started = Instant::now();
    let s = Sensing::start(&p).unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "start does not wait for devices");
    let h = s.handle();
    wait_for("audio marked down", Duration::from_secs(10), || h.modalities()[3].health.failures == 1);
    assert!(!h.availability()[3]);
    assert!(h.utterance_wav().is_err());
    s.shutdown(Duration::from_secs(2));
}

#[test]
fn a_disappearing_sysfs_file_marks_energy_down_and_it_recovers() {
    let root = tempfile::tempdir().unwrap();
    let hw = root.path().join("class/hwmon/hwmon0");
    fs::create_dir_all(&hw).unwrap();
    let src = fixtures().join("sysfs/ina219/class/hwmon/hwmon0");
    for f in fs::read_dir(&src).unwrap().flatten() {
        fs::copy(f.path(), hw.join(f.file_name())).unwrap();
    }
    let mut p = profile([ViewSource::TestPattern {}, ViewSource::TestPattern {}, ViewSource::TestPattern {}]);
    p.sensing.telemetry.energy = EnergySourceKind::Hwmon;
    p.sensing.telemetry.sysfs_root = root.path().to_owned();
    let s = Sensing::start(&p).unwrap();
    let h = s.handle();
    let t0 = Instant::now();
    wait_for("power", Duration::from_secs(5), || h.telemetry().power_watts == Some(4.2));
    let power = hw.join("power1_input");
    fs::remove_file(&power).unwrap();
    wait_for("energy down", Duration::from_secs(5), || !h.telemetry().energy_health.up);
    let snap = h.telemetry();
    assert!(snap.energy_health.cause.as_deref().is_some_and(|c| c.contains("power1_input")), "{snap:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(h.telemetry().energy_health.failures, 1);
    fs::write(&power, "4200000\n").unwrap();
    wait_for("energy back", Duration::from_secs(5), || h.telemetry().energy_health.up);
    std::thread::sleep(Duration::from_millis(200));
    let span = h.energy_between(t0, Instant::now()).unwrap();
    assert!(span.covered_secs < span.span_secs, "the gap is not integrated: {span:?}");
    assert!((span.joules - 4.2 * span.covered_secs).abs() < 1e-6, "{span:?}");
    s.shutdown(Duration::from_secs(2));
}

//! Sensing figures, printed: JPEG encode of one 640x480 frame, one telemetry sample, and the whole
//! sensing side (3 views at 640x480 and 15 fps, 16 kHz audio with VAD) as CPU share of one core
//! and resident memory.
//!
//! `cargo bench -p sensing --bench sensing [-- --secs N]`

use std::path::Path;
use std::time::{Duration, Instant};

use device_profiles::{AudioSettings, AudioSource, DeviceProfile, TelemetrySettings, ViewSource};
use sensing::camera::{encode_jpeg, test_pattern};
use sensing::telemetry::TelemetrySampler;

fn median_ms(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v[v.len() / 2], mean)
}

fn time_it(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    median_ms(v)
}

/// User + system CPU seconds of this process.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is 0, utime is 11, stime is 12; USER_HZ is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(20u64);

    let frame = test_pattern(640, 480, 7);
    let mut size = 0;
    let (med, mean) = time_it(200, || {
        size = encode_jpeg(&frame, 80, 150_000).map(|r| r.0.len()).unwrap_or(0);
    });
    println!("jpeg-encoder 640x480 q80: median {med:.2} ms, mean {mean:.2} ms, {size} bytes");
    let (med, mean) = time_it(50, || {
        let mut out = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80);
        let _ = frame.write_with_encoder(enc);
        size = out.len();
    });
    println!(
        "image crate JpegEncoder 640x480 q80 (for comparison): median {med:.2} ms, mean {mean:.2} ms, {size} bytes"
    );

    let mut sampler = TelemetrySampler::new(&TelemetrySettings::default()).expect("sysinfo starts");
    let (med, mean) = time_it(200, || {
        let _ = sampler.sample();
    });
    println!("telemetry sample (sysinfo + energy meter auto): median {med:.3} ms, mean {mean:.3} ms");

    let mut p = DeviceProfile::builtin("x86-dev").expect("built-in profile");
    for i in 0..3 {
        p.sensing.views.insert(format!("view-{i}"), ViewSource::TestPattern {});
    }
    p.sensing.camera.width = 640;
    p.sensing.camera.height = 480;
    p.sensing.camera.fps = 15;
    let wav = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/audio/boil-an-egg-16k.wav");
    p.sensing.audio = Some(AudioSettings {
        input: AudioSource::WavFile { path: wav, gap_ms: 2_000 },
        ..AudioSettings::default()
    });
    let rss_before = rss_mib();
    let s = sensing::Sensing::start(&p).expect("sensing starts");
    let h = s.handle();
    std::thread::sleep(Duration::from_secs(2));
    let (c0, t0) = (cpu_secs(), Instant::now());
    let mut peak = 0.0f64;
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(250));
        peak = peak.max(rss_mib());
    }
    let share = (cpu_secs() - c0) / t0.elapsed().as_secs_f64() * 100.0;
    let vad = h.vad().unwrap_or_default();
    println!(
        "sensing side, 3 test-pattern views 640x480 @15 fps + 16 kHz WAV audio + Silero VAD, {secs} s: \
         CPU {share:.1}% of one core, RSS peak {peak:.1} MiB (process before start {rss_before:.1} MiB), \
         utterances {}, vad error {:?}, availability {:?}",
        vad.utterances,
        vad.error,
        h.availability()
    );
    let (med, mean) = time_it(30, || {
        let _ = h.modality_jpeg(0);
    });
    println!("request-time JPEG of view 0 (copy + encode): median {med:.2} ms, mean {mean:.2} ms");
    s.shutdown(Duration::from_secs(2));
}

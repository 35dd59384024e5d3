//! `tmod sense`: starts the sensing side of a profile and prints, once a second, a compact live
//! view of telemetry, each modality's availability and frame age, and the VAD state.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use device_profiles::DeviceProfile;
use sensing::{Sensing, SensingStatus};

/// Runs until interrupted, or for `count` reports.
pub fn run(profile: &str, json: bool, count: Option<u64>) -> anyhow::Result<()> {
    let profile = DeviceProfile::load(profile).with_context(|| format!("loading profile {profile}"))?;
    let sensing = Sensing::start(&profile).context("starting sensing")?;
    let handle = sensing.handle();
    let mut out = std::io::stdout().lock();
    let mut printed = 0u64;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let status = handle.status();
        if json {
            serde_json::to_writer(&mut out, &status).context("writing JSON")?;
            writeln!(out).context("writing to stdout")?;
        } else {
            writeln!(out, "{}", render(&status)).context("writing to stdout")?;
        }
        out.flush().context("writing to stdout")?;
        printed += 1;
        if count.is_some_and(|c| printed >= c) {
            break;
        }
    }
    sensing.shutdown(Duration::from_secs(2));
    Ok(())
}

/// One line of the live view.
fn render(s: &SensingStatus) -> String {
    let t = &s.telemetry;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let cores: Vec<String> = t.cpu_percent.iter().map(|p| format!("{p:.0}")).collect();
    let mut line = format!(
        "cpu {:.0}% [{}] mem {:.1}/{:.1} GiB",
        t.cpu_total_percent,
        cores.join(" "),
        gib(t.memory_used_bytes),
        gib(t.memory_total_bytes)
    );
    if let Some(hot) = t.temperatures.iter().max_by(|a, b| a.celsius.total_cmp(&b.celsius)) {
        line += &format!(" temp {:.0}C", hot.celsius);
    }
    match (t.energy_source, t.power_watts) {
        (Some(src), Some(w)) => line += &format!(" power {w:.2} W ({src}) {:.1} J", t.energy_total_joules),
        (Some(src), None) => line += &format!(" power ? ({src})"),
        (None, _) => line += " power unmeasured",
    }
    if let Some(cause) = &t.energy_health.cause {
        line += &format!(" [energy: {cause}]");
    }
    for m in &s.modalities {
        let age = m.age_ms.map_or("-".to_owned(), |a| format!("{a}ms"));
        if m.available {
            line += &format!(" | {} up {age}", m.name);
        } else {
            let why = m.health.cause.as_deref().unwrap_or("no data yet");
            line += &format!(" | {} DOWN {age} ({why})", m.name);
        }
    }
    match (&s.vad, &s.audio) {
        (Some(v), Some(a)) => {
            match (&a.cause, a.up) {
                (_, true) => line += " | audio up",
                (Some(cause), false) => line += &format!(" | audio DOWN ({cause})"),
                (None, false) => line += " | audio DOWN",
            }
            if let Some(e) = &v.error {
                line += &format!(" vad off ({e})");
            } else {
                line += &format!(" vad {} p={:.2} utterances {}", v.state, v.probability, v.utterances);
                if let (Some(secs), Some(age)) = (v.last_utterance_secs, v.last_utterance_age_secs) {
                    line += &format!(" (last {secs:.1}s, {age:.0}s ago)");
                }
            }
        }
        _ => line += " | audio off",
    }
    line
}

#[cfg(test)]
mod tests {
    use device_profiles::ViewSource;

    use super::*;

    #[test]
    fn the_live_view_shows_telemetry_and_each_modality() {
        let mut p = DeviceProfile::builtin("x86-dev").unwrap();
        p.sensing.views.insert("view-2".into(), ViewSource::Device { path: "/dev/video-absent-3".into() });
        p.sensing.audio = None;
        let s = Sensing::start(&p).unwrap();
        let h = s.handle();
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while h.availability() != [true, true, false] {
            assert!(std::time::Instant::now() < until, "views did not settle: {:?}", h.modalities());
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = h.status();
        let line = render(&status);
        assert!(line.starts_with("cpu "), "{line}");
        assert!(line.contains("| view-0 up ") && line.contains("| view-1 up "), "{line}");
        assert!(line.contains("| view-2 DOWN") && line.contains("/dev/video-absent-3"), "{line}");
        assert!(line.ends_with("| audio off"), "{line}");
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["modalities"].as_array().map(Vec::len), Some(3));
        assert_eq!(json["modalities"][2]["available"], false);
        assert!(json["telemetry"]["memory_total_bytes"].as_u64().is_some_and(|m| m > 0));
        s.shutdown(Duration::from_secs(2));
    }
}

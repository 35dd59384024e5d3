//! Helpers shared by the fuzz targets.

use std::path::PathBuf;

/// libfuzzer-sys installs a panic hook that aborts on every panic, even one that the code
/// under test catches. tmod catches panics of two third-party parsers on purpose (candle's
/// GGUF reader, tract's model preparation: a hostile file is an error, not an abort). This
/// hook lets a panic whose location is in one of the `crates` (a path fragment such as
/// `candle-core-`) unwind, to be caught there; any other panic aborts as before, and a
/// third-party panic nobody catches still aborts in libfuzzer-sys's wrapper.
pub fn let_caught_panics_unwind(crates: &'static [&'static str]) {
    let abort_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let third_party = info.location().is_some_and(|l| crates.iter().any(|c| l.file().contains(c)));
        if third_party {
            // Printed, in case nothing catches it (libfuzzer-sys then aborts with no message).
            eprintln!("third-party panic, to be caught: {info}");
        } else {
            abort_hook(info);
        }
    }));
}

/// A fresh scratch directory for this process on tmpfs (`/dev/shm` when it exists), removed
/// and made again.
pub fn scratch_dir(name: &str) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("tmo-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// A real outcome row (as the daemon logs it; outcome-log's test sample): what the dataset
/// target appends and what the dataset seeds hold.
#[cfg(feature = "heavy")]
pub fn sample_row(dialogue: &str, turn: u32, created_at_ms: i64) -> outcome_log::TurnOutcome {
    use policy_onnx::schema::{Action, ModalitySet, Schema, TaskCategory};
    let schema = Schema::default();
    let action = Action::Cloud { modalities: ModalitySet::from_indices([0, 2]) };
    outcome_log::TurnOutcome {
        dialogue_id: dialogue.to_owned(),
        turn,
        question: format!("What can I cook with what is on the counter? (turn {turn})"),
        task: TaskCategory::Recommendation,
        observation: schema.observation(&[], TaskCategory::Recommendation, 30.0, 0.05),
        action_index: schema.action_index(action).unwrap_or(0) as u32,
        action,
        propensity: 0.8,
        policy_version: "2026-11-20.1".into(),
        policy_sha256: "ab".repeat(32),
        latency_secs: 6.2,
        energy_joules: Some(12.5),
        cost_usd: 0.00945,
        prompt_tokens: 120,
        generated_tokens: 48,
        answer: "Leek and potato soup: sweat the leeks in butter, add the potatoes and stock.".into(),
        score: None,
        score_source: None,
        telemetry: serde_json::json!({"cpu_percent": 41.5, "mem_used_bytes": 1_234_567_890u64,
            "temp_c": 52.0, "power_w": 6.1}),
        route: None,
        cloud_attempt: None,
        created_at_ms,
        text_cut_bytes: 0,
        forced: false,
    }
}

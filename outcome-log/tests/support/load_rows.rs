//! The rows of the load generator, rebuilt from their dialogue and turn so that the crash test
//! can check every stored row field by field. Shared by `examples/outcome_writer_load.rs` and
//! `tests/crash.rs`.

use outcome_log::TurnOutcome;
use policy_onnx::schema::{Action, ModalitySet, Schema, TaskCategory, Turn};

/// The outcome of `turn` in `dialogue`: a realistic size (27-float observation, 200-character
/// answer, telemetry JSON), every field derived from the two keys.
pub fn row(dialogue: &str, turn: u32) -> TurnOutcome {
    let schema = Schema::default();
    let task = TaskCategory::ALL[turn as usize % 4];
    let index = turn as usize % schema.action_count();
    let action = schema.action(index).unwrap_or(Action::Local);
    let previous: Vec<Turn> = (0..turn)
        .map(|t| Turn {
            task: TaskCategory::ALL[t as usize % 4],
            action: schema.action(t as usize % schema.action_count()).unwrap_or(Action::Local),
        })
        .collect();
    let mut answer = format!("Answer to turn {turn} of {dialogue}: ");
    while answer.len() < 200 {
        answer.push_str("chop the onions finely, ");
    }
    answer.truncate(200);
    TurnOutcome {
        dialogue_id: dialogue.to_owned(),
        turn,
        question: format!("Question {turn} of {dialogue}: what goes with the tomatoes on the board?"),
        task,
        observation: schema.observation(&previous, task, 30.0 - f64::from(turn), 0.05),
        action_index: index as u32,
        action,
        propensity: 1.0 / (1.0 + f64::from(turn % 7)),
        policy_version: "load-1".into(),
        policy_sha256: format!("{:064x}", turn),
        latency_secs: 0.5 + f64::from(turn % 11),
        energy_joules: (!turn.is_multiple_of(3)).then(|| 2.5 * f64::from(turn)),
        cost_usd: if action.is_cloud() {
            0.001 * f64::from(action.modalities().len() as u32 + 1)
        } else {
            0.0
        },
        prompt_tokens: 100 + turn,
        generated_tokens: 40 + turn % 50,
        answer,
        score: None,
        score_source: None,
        telemetry: serde_json::json!({
            "cpu_percent": f64::from(turn % 100),
            "mem_used_bytes": 1_500_000_000u64 + u64::from(turn),
            "temp_c": 48.5,
            "power_w": 5.25,
            "modalities": ModalitySet::all(3).len(),
        }),
        route: (turn % 5 == 4).then(|| "cloud chosen, unavailable, answered locally".to_owned()),
        cloud_attempt: None,
        created_at_ms: 1_790_000_000_000 + i64::from(turn),
        text_cut_bytes: 0,
        forced: false,
    }
}

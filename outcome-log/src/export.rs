//! Export of logged turns as M4A1 dialogues, the format the trainer (and the paper's code) reads.
//!
//! One conversion ([`m4a1_dialogues`]) serves a device's log ([`OutcomeLog::export_m4a1`]) and a
//! collected dataset of many devices: rows are grouped by (device, dialogue id)
//! ([`group_dialogues`]), since two devices may both have a dialogue "1".
//!
//! What the log does not have, and what is written instead:
//! - `id`: the dialogue id when it is a decimal integer not already taken by an earlier dialogue
//!   (of another device); other ids are numbered after the largest numeric one, in order of their
//!   first row. The original id is kept as `tmo_dialogue_id`, the device (for a dataset) as
//!   `tmo_device_id`.
//! - `image_paths`: the frames are not kept, so one name per modality from
//!   [`M4a1ExportOptions::modality_names`] (default `m0`, `m1`, `m2`).
//! - `association_score`: the device does not measure how related a view is to a question; 0.0
//!   for every view of every turn.
//! - `image_index`: the attached modalities in increasing order (the upload order is not kept);
//!   null for a local answer and for a cloud call with text only, as in M4A1.
//! - `score`: turns without a score end the dialogue's export (the default), or are written as
//!   0.0 ([`UnscoredTurns::WriteZero`]).
//! - A dialogue is written from turn 0 up to its first missing turn: a dialogue whose first
//!   turn is gone (evicted) is skipped, since its history cannot be rebuilt.
//!
//! Each interaction also carries a `tmo` object with what M4A1 has no field for (row id in the
//! device's log or the collector's receive time, turn, action index, propensity, policy version
//! and sha256, energy, tokens, score source, route); readers of M4A1 ignore unknown fields.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use policy_onnx::m4a1::{Dialogue, Interaction};
use policy_onnx::schema::Action;

use crate::{OutcomeLog, OutcomeLogError, RowId, TurnOutcome};

/// What to write for turns without a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnscoredTurns {
    /// End the dialogue before its first unscored turn (later turns depend on it).
    #[default]
    EndDialogue,
    /// Write the turn with score 0.0.
    WriteZero,
}

/// Options of [`OutcomeLog::export_m4a1`].
#[derive(Debug, Clone, PartialEq)]
pub struct M4a1ExportOptions {
    /// One name per modality, in modality order: the `image_paths` of every dialogue.
    pub modality_names: Vec<String>,
    pub unscored: UnscoredTurns,
}

impl Default for M4a1ExportOptions {
    /// Three modalities named `m0`, `m1`, `m2`; unscored turns end a dialogue.
    fn default() -> Self {
        M4a1ExportOptions {
            modality_names: (0..3).map(|i| format!("m{i}")).collect(),
            unscored: UnscoredTurns::EndDialogue,
        }
    }
}

/// What an export wrote and left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExportSummary {
    pub dialogues: usize,
    pub turns: usize,
    /// Dialogues left out because their first turn is not in the log.
    pub dialogues_without_first_turn: usize,
    /// Turns left out: after a missing turn, or at and after an unscored one.
    pub turns_left_out: usize,
    /// Turns whose modalities do not fit the modality names; their dialogue ends before them.
    pub turns_with_unknown_modalities: usize,
}

impl OutcomeLog {
    /// Writes the log's dialogues as an M4A1 JSON array to `out` (see the module docs for what
    /// is written where the log lacks a field).
    pub fn export_m4a1(
        &self,
        out: impl Write,
        options: &M4a1ExportOptions,
    ) -> Result<ExportSummary, OutcomeLogError> {
        let (dialogues, summary) = self.m4a1_dialogues(options)?;
        serde_json::to_writer(out, &dialogues).map_err(OutcomeLogError::Export)?;
        Ok(summary)
    }

    /// The dialogues of [`OutcomeLog::export_m4a1`] as JSON values (the M4A1 fields plus the
    /// `tmo` extras), in order of their first row.
    pub fn m4a1_dialogues(
        &self,
        options: &M4a1ExportOptions,
    ) -> Result<(Vec<serde_json::Value>, ExportSummary), OutcomeLogError> {
        let rows = self.all_rows()?;
        let grouped =
            group_dialogues(rows.iter().map(|r| {
                (None, ExportRow { outcome: &r.outcome, row_id: Some(r.id), received_unix_ms: None })
            }));
        m4a1_dialogues(grouped, options)
    }
}

/// One logged turn to convert, wherever it was stored (a device's SQLite log, a collected
/// dataset).
#[derive(Debug, Clone, Copy)]
pub struct ExportRow<'a> {
    pub outcome: &'a TurnOutcome,
    /// The row's id in the device's log, when read from it.
    pub row_id: Option<RowId>,
    /// When the collector received the row, unix milliseconds, when read from a dataset.
    pub received_unix_ms: Option<u64>,
}

/// The logged turns of one dialogue of one device, in any order.
#[derive(Debug, Clone)]
pub struct DialogueRows<'a> {
    /// The device that logged the dialogue; `None` for a single device's log.
    pub device_id: Option<&'a str>,
    pub dialogue_id: &'a str,
    pub rows: Vec<ExportRow<'a>>,
}

/// Groups rows by (device, dialogue id), the dialogues in order of their first row. Dialogue
/// ids are chosen per device: the same id from two devices makes two dialogues.
pub fn group_dialogues<'a>(
    rows: impl IntoIterator<Item = (Option<&'a str>, ExportRow<'a>)>,
) -> Vec<DialogueRows<'a>> {
    let mut index: HashMap<(Option<&'a str>, &'a str), usize> = HashMap::new();
    let mut out: Vec<DialogueRows<'a>> = Vec::new();
    for (device_id, row) in rows {
        let dialogue_id = row.outcome.dialogue_id.as_str();
        let i = *index.entry((device_id, dialogue_id)).or_insert_with(|| {
            out.push(DialogueRows { device_id, dialogue_id, rows: Vec::new() });
            out.len() - 1
        });
        out[i].rows.push(row);
    }
    out
}

/// Converts grouped dialogues into M4A1 dialogues as JSON values (the M4A1 fields, the `tmo`
/// extras per interaction, `tmo_dialogue_id` and, for a dataset, `tmo_device_id`), in the
/// order given. The conversion of both [`OutcomeLog::export_m4a1`] and a collected dataset.
///
/// Ids: a decimal dialogue id is kept by the first dialogue that has it; later dialogues with
/// the same id (other devices) and non-numeric ids are numbered after the largest decimal id,
/// in order.
pub fn m4a1_dialogues(
    dialogues: Vec<DialogueRows<'_>>,
    options: &M4a1ExportOptions,
) -> Result<(Vec<serde_json::Value>, ExportSummary), OutcomeLogError> {
    let mut next_id =
        dialogues.iter().filter_map(|d| d.dialogue_id.parse::<u64>().ok()).max().map_or(0, |m| m + 1);
    let mut taken: HashSet<u64> = HashSet::new();
    let views = options.modality_names.len();
    let mut summary = ExportSummary::default();
    let mut out = Vec::new();
    for DialogueRows { device_id, dialogue_id, mut rows } in dialogues {
        rows.sort_by_key(|r| r.outcome.turn);
        let total = rows.len();
        if rows.first().is_some_and(|r| r.outcome.turn != 0) {
            summary.dialogues_without_first_turn += 1;
        }
        let mut kept = Vec::new();
        for (expected, row) in rows.into_iter().enumerate() {
            let o = row.outcome;
            if o.turn as usize != expected {
                break;
            }
            if o.score.is_none() && options.unscored == UnscoredTurns::EndDialogue {
                break;
            }
            if o.action.modalities().indices().any(|m| m >= views) {
                summary.turns_with_unknown_modalities += 1;
                break;
            }
            kept.push(row);
        }
        summary.turns_left_out += total - kept.len();
        if kept.is_empty() {
            continue;
        }
        let id = match dialogue_id.parse::<u64>() {
            Ok(id) if taken.insert(id) => id,
            _ => {
                next_id += 1;
                next_id - 1
            }
        };
        let dialogue = Dialogue {
            id,
            image_paths: options.modality_names.clone(),
            interactions: kept.iter().map(|r| interaction(r.outcome)).collect(),
            association_score: vec![vec![0.0; views]; kept.len()],
        };
        let mut value = serde_json::to_value(&dialogue).map_err(OutcomeLogError::Export)?;
        value["tmo_dialogue_id"] = serde_json::Value::String(dialogue_id.to_owned());
        if let Some(device) = device_id {
            value["tmo_device_id"] = serde_json::Value::String(device.to_owned());
        }
        for (i, row) in kept.iter().enumerate() {
            value["interactions"][i]["tmo"] = extras(row);
        }
        summary.dialogues += 1;
        summary.turns += kept.len();
        out.push(value);
    }
    Ok((out, summary))
}

/// [`m4a1_dialogues`] written as one JSON array to `out`.
pub fn write_m4a1(
    out: impl Write,
    dialogues: Vec<DialogueRows<'_>>,
    options: &M4a1ExportOptions,
) -> Result<ExportSummary, OutcomeLogError> {
    let (values, summary) = m4a1_dialogues(dialogues, options)?;
    serde_json::to_writer(out, &values).map_err(OutcomeLogError::Export)?;
    Ok(summary)
}

fn interaction(o: &TurnOutcome) -> Interaction {
    let (action, image_index) = match o.action {
        Action::Local => (0, None),
        Action::Cloud { modalities } if modalities.is_empty() => (1, None),
        Action::Cloud { modalities } => (1, Some(modalities.indices().collect())),
    };
    Interaction {
        question: o.question.clone(),
        task_cat: o.task,
        action,
        image_index,
        answer: o.answer.clone(),
        score: o.score.unwrap_or(0.0),
        interaction_time: o.latency_secs,
        usage_cost: o.cost_usd,
    }
}

fn extras(row: &ExportRow<'_>) -> serde_json::Value {
    let o = row.outcome;
    let mut extras = serde_json::json!({
        "turn": o.turn,
        "action_index": o.action_index,
        "propensity": o.propensity,
        "policy_version": o.policy_version,
        "policy_sha256": o.policy_sha256,
        "energy_joules": o.energy_joules,
        "prompt_tokens": o.prompt_tokens,
        "generated_tokens": o.generated_tokens,
        "score_source": o.score_source,
        "route": o.route,
        "cloud_attempt": o.cloud_attempt,
        "created_at_ms": o.created_at_ms,
    });
    if let Some(id) = row.row_id {
        extras["row_id"] = serde_json::json!(id);
    }
    if let Some(ms) = row.received_unix_ms {
        extras["received_unix_ms"] = serde_json::json!(ms);
    }
    extras
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::tests::sample;
    use crate::{OutcomeLogConfig, ScoreSource, TurnOutcome};
    use policy_onnx::m4a1;
    use policy_onnx::schema::{Schema, Turn};

    fn train_path() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/m4a1/m4a1-train.json")
    }

    /// The outcomes a device would have logged for an M4A1 dialogue: observations encoded from
    /// the history with the remaining budgets, as the daemon does.
    fn log_dialogue(d: &m4a1::Dialogue, dialogue_id: &str) -> Vec<TurnOutcome> {
        let schema = Schema::default();
        let (mut latency_left, mut cost_left) = (30.0, 0.05);
        let mut history: Vec<Turn> = Vec::new();
        let mut out = Vec::new();
        for (t, i) in d.interactions.iter().enumerate() {
            let turn = i.turn();
            let mut o = sample(dialogue_id, t as u32);
            o.question = i.question.clone();
            o.task = i.task_cat;
            o.observation = schema.observation(&history, i.task_cat, latency_left, cost_left);
            o.action = turn.action;
            o.action_index = schema.action_index(turn.action).unwrap_or(0) as u32;
            o.answer = i.answer.clone();
            o.score = Some(i.score);
            o.score_source = Some(ScoreSource::Judge);
            o.latency_secs = i.interaction_time;
            o.cost_usd = i.usage_cost;
            latency_left -= i.interaction_time;
            cost_left -= i.usage_cost;
            history.push(turn);
            out.push(o);
        }
        out
    }

    /// The 80 training dialogues go into the log turn by turn; the export parses with the
    /// trainer's reader and gives back the same dialogues (views in increasing order), and the
    /// observations rebuilt from the exported turns are the logged ones.
    #[test]
    fn the_training_sample_round_trips_through_the_log() {
        let original = m4a1::load(&train_path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut log = OutcomeLog::open(dir.path().join("o.db"), OutcomeLogConfig::default()).unwrap();
        // Interleave dialogues turn by turn, as concurrent users would.
        let logged: Vec<Vec<TurnOutcome>> =
            original.iter().map(|d| log_dialogue(d, &d.id.to_string())).collect();
        let longest = logged.iter().map(Vec::len).max().unwrap_or(0);
        for t in 0..longest {
            let batch: Vec<TurnOutcome> = logged.iter().filter_map(|turns| turns.get(t).cloned()).collect();
            assert!(log.append_batch(&batch).iter().all(Result::is_ok));
        }
        let mut bytes = Vec::new();
        let summary = log.export_m4a1(&mut bytes, &M4a1ExportOptions::default()).unwrap();
        assert_eq!((summary.dialogues, summary.turns, summary.turns_left_out), (80, 287, 0));
        let exported = m4a1::parse(&bytes, "export").unwrap();
        assert_eq!(exported.len(), original.len());
        let schema = Schema::default();
        for (e, o) in exported.iter().zip(&original) {
            assert_eq!(e.id, o.id);
            assert_eq!(e.image_paths, ["m0", "m1", "m2"]);
            assert_eq!(e.association_score, vec![vec![0.0; 3]; o.interactions.len()]);
            for (t, (ei, oi)) in e.interactions.iter().zip(&o.interactions).enumerate() {
                let mut expected = oi.clone();
                if let Some(views) = &mut expected.image_index {
                    views.sort_unstable();
                }
                assert_eq!(*ei, expected, "dialogue {} turn {t}", o.id);
            }
            let turns: Vec<Turn> = e.interactions.iter().map(m4a1::Interaction::turn).collect();
            let logged_dialogue = logged.iter().find(|l| l[0].dialogue_id == o.id.to_string()).unwrap();
            let (mut lat, mut cost) = (30.0, 0.05);
            for (t, i) in e.interactions.iter().enumerate() {
                let obs = schema.observation(&turns[..t], i.task_cat, lat, cost);
                assert_eq!(obs, logged_dialogue[t].observation, "dialogue {} turn {t}", o.id);
                lat -= i.interaction_time;
                cost -= i.usage_cost;
            }
        }
        // The extras ride along and do not disturb the reader.
        let values: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(values[0]["interactions"][0]["tmo"]["propensity"], 0.8);
        assert_eq!(values[0]["tmo_dialogue_id"], original[0].id.to_string());
    }

    #[test]
    fn gaps_unscored_turns_and_text_ids_are_handled_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = OutcomeLog::open(dir.path().join("o.db"), OutcomeLogConfig::default()).unwrap();
        let scored = |d: &str, t: u32| {
            let mut o = sample(d, t);
            o.score = Some(0.5);
            o.score_source = Some(ScoreSource::Feedback);
            o
        };
        // "41": turns 0, 1, 3 (2 missing). "kitchen": 0 scored, 1 unscored, 2 scored.
        // "late": no turn 0. "hall": its views exceed two modality names.
        let rows = [
            scored("41", 0),
            scored("kitchen", 0),
            scored("41", 1),
            sample("kitchen", 1),
            scored("late", 1),
            scored("41", 3),
            scored("kitchen", 2),
            scored("hall", 0),
        ];
        assert!(log.append_batch(&rows).iter().all(Result::is_ok));

        let two_views =
            M4a1ExportOptions { modality_names: vec!["a".into(), "b".into()], ..Default::default() };
        let (dialogues, summary) = log.m4a1_dialogues(&two_views).unwrap();
        // sample() sends views {0, 2}: with two modality names "hall" (and every turn) ends.
        assert_eq!(summary.turns_with_unknown_modalities, 3);
        assert_eq!(dialogues.len(), 0);

        let (dialogues, summary) = log.m4a1_dialogues(&M4a1ExportOptions::default()).unwrap();
        let ids: Vec<(u64, &str, usize)> = dialogues
            .iter()
            .map(|d| {
                (
                    d["id"].as_u64().unwrap(),
                    d["tmo_dialogue_id"].as_str().unwrap(),
                    d["interactions"].as_array().unwrap().len(),
                )
            })
            .collect();
        assert_eq!(ids, [(41, "41", 2), (42, "kitchen", 1), (43, "hall", 1)]);
        assert_eq!(summary.dialogues_without_first_turn, 1);
        assert_eq!(summary.turns_left_out, 4);

        let zero = M4a1ExportOptions { unscored: UnscoredTurns::WriteZero, ..Default::default() };
        let mut bytes = Vec::new();
        let summary = log.export_m4a1(&mut bytes, &zero).unwrap();
        let parsed = m4a1::parse(&bytes, "zero").unwrap();
        let kitchen = parsed.iter().find(|d| d.id == 42).unwrap();
        assert_eq!(kitchen.interactions.iter().map(|i| i.score).collect::<Vec<_>>(), [0.5, 0.0, 0.5]);
        assert_eq!(kitchen.interactions[0].image_index, Some(vec![0, 2]));
        assert_eq!(summary.turns, 6);
    }

    /// A collected dataset: two devices both logged a dialogue "1" (and one a "kitchen"); the
    /// export keeps them apart, numbers the second "1" after the largest id, and names the device.
    #[test]
    fn dialogues_of_different_devices_with_the_same_id_stay_apart() {
        let scored = |d: &str, t: u32, score: f64| {
            let mut o = sample(d, t);
            o.score = Some(score);
            o.score_source = Some(ScoreSource::Judge);
            o
        };
        let a = [scored("1", 0, 0.1), scored("1", 1, 0.2), scored("kitchen", 0, 0.3)];
        let b = [scored("1", 1, 0.5), scored("1", 0, 0.4)];
        // Interleaved as a collector receives them.
        let rows =
            [(Some("dev-a"), &a[0]), (Some("dev-b"), &b[0]), (Some("dev-a"), &a[1]), (Some("dev-b"), &b[1])]
                .into_iter()
                .chain([(Some("dev-a"), &a[2])])
                .enumerate()
                .map(|(i, (device, o))| {
                    (device, ExportRow { outcome: o, row_id: None, received_unix_ms: Some(1_000 + i as u64) })
                });
        let grouped = group_dialogues(rows);
        assert_eq!(grouped.len(), 3);
        let mut bytes = Vec::new();
        let summary = write_m4a1(&mut bytes, grouped, &M4a1ExportOptions::default()).unwrap();
        assert_eq!((summary.dialogues, summary.turns, summary.turns_left_out), (3, 5, 0));
        let parsed = m4a1::parse(&bytes, "dataset").unwrap();
        let values: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
        let keys: Vec<(u64, &str, &str)> = values
            .iter()
            .map(|v| {
                (
                    v["id"].as_u64().unwrap(),
                    v["tmo_device_id"].as_str().unwrap(),
                    v["tmo_dialogue_id"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(keys, [(1, "dev-a", "1"), (2, "dev-b", "1"), (3, "dev-a", "kitchen")]);
        let scores: Vec<Vec<f64>> =
            parsed.iter().map(|d| d.interactions.iter().map(|i| i.score).collect()).collect();
        assert_eq!(scores, [vec![0.1, 0.2], vec![0.4, 0.5], vec![0.3]]);
        // Dataset rows carry the collector's receive time, not a row id.
        assert_eq!(values[1]["interactions"][0]["tmo"]["received_unix_ms"], 1_003);
        assert!(values[1]["interactions"][0]["tmo"].get("row_id").is_none());
        // Without devices (one log), the same ids would be one dialogue.
        let one_device = group_dialogues(
            a.iter()
                .chain(&b)
                .map(|o| (None, ExportRow { outcome: o, row_id: None, received_unix_ms: None })),
        );
        assert_eq!(one_device.len(), 2);
    }
}

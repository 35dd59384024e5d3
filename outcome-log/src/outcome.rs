//! What one row of the log holds: the outcome of one dialogue turn.

use std::fmt;
use std::str::FromStr;

use policy_onnx::schema::{Action, TaskCategory};
use serde::{Deserialize, Serialize};

use crate::OutcomeLogError;

/// Longest dialogue id accepted (the app chooses them; they are keys, not text).
pub const MAX_DIALOGUE_ID_LEN: usize = 256;

/// The id of a row: increasing in insertion order, never reused (SQLite AUTOINCREMENT), so an
/// id handed to the uploader stays valid until the row is evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RowId(pub i64);

impl fmt::Display for RowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a turn's score came from. Ranked: feedback (the user) over judge over the refusal
/// heuristic; a lower-ranked score never replaces a higher-ranked one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreSource {
    /// The paper's rule: answers that refuse ("sorry", "I don't have", "can't") score 0.
    RefusalHeuristic,
    /// A judge model comparing with a reference answer (the M4A1 score).
    Judge,
    /// The user's own score through `POST /v1/feedback`.
    Feedback,
}

impl ScoreSource {
    /// The name stored in the log and used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ScoreSource::RefusalHeuristic => "refusal_heuristic",
            ScoreSource::Judge => "judge",
            ScoreSource::Feedback => "feedback",
        }
    }
}

impl fmt::Display for ScoreSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ScoreSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "refusal_heuristic" => Ok(ScoreSource::RefusalHeuristic),
            "judge" => Ok(ScoreSource::Judge),
            "feedback" => Ok(ScoreSource::Feedback),
            other => Err(format!("unknown score source {other:?}")),
        }
    }
}

/// A request sent to the cloud for a turn and what became of it. When it did not end in an
/// answer, the turn was answered locally (the outcome's `route` says so) and this records the
/// attempt: the time it took is part of the turn's latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudAttempt {
    /// `answered`, or why not: `timeout`, `connection_lost`, `not_connected`, `no_bridge`,
    /// `too_large`, `invalid_reply` (a reply with a cost or token count that is not one, refused
    /// whole), `stalled` (a streamed answer went silent), `cancelled` (the client went away), or
    /// the bridge's error kind (`backend`, `overloaded`, `deadline`, ...). When part of a
    /// streamed answer was shown before the failure, the turn's answer is that part (`detail`
    /// says how much) and `cost_usd` the class's expected price; otherwise the turn was answered
    /// locally.
    pub outcome: String,
    /// The error's message, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// From sending the request to its reply or failure, seconds.
    pub wait_secs: f64,
    /// How long the daemon was prepared to wait (from the remaining latency budget), seconds.
    pub deadline_secs: f64,
    /// Size of the request on the wire, bytes.
    pub request_bytes: u64,
    /// The cloud model that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The backend's own time, as the bridge measured it, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_latency_ms: Option<u32>,
    /// The cloud's price for the answer, USD (0 without an answer).
    pub cost_usd: f64,
}

/// The outcome of one dialogue turn: what the policy saw and chose, what it cost, what came out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnOutcome {
    /// The app's dialogue id.
    pub dialogue_id: String,
    /// The turn's index in its dialogue, from 0.
    pub turn: u32,
    pub question: String,
    pub task: TaskCategory,
    /// The policy input (27 floats for contract v1).
    pub observation: Vec<f32>,
    /// The chosen action's index in the policy output.
    pub action_index: u32,
    /// The chosen action; its modalities are the ones attached to the cloud request.
    pub action: Action,
    /// Probability with which the decision picked this action (for off-policy learning).
    pub propensity: f64,
    pub policy_version: String,
    /// sha256 of the policy's ONNX bytes, hex.
    pub policy_sha256: String,
    /// Wall time from request to the end of the answer, seconds.
    pub latency_secs: f64,
    /// Energy measured over the turn, joules; `None` when the board has no energy sensor.
    pub energy_joules: Option<f64>,
    /// Money the turn cost, USD: the cloud price for a cloud answer, the electricity of the
    /// measured (or estimated) energy for a local one.
    pub cost_usd: f64,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub answer: String,
    /// The score when already known (the refusal heuristic scores at once; feedback comes later
    /// through `set_score`).
    pub score: Option<f64>,
    pub score_source: Option<ScoreSource>,
    /// The telemetry snapshot at decision time (CPU, memory, temperature, power ...).
    pub telemetry: serde_json::Value,
    /// How the answer was actually produced when it differs from the action, e.g.
    /// "cloud chosen, unavailable, answered locally"; `None` when the action was carried out.
    pub route: Option<String>,
    /// The request sent to the cloud for this turn, if one was sent, and what became of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_attempt: Option<CloudAttempt>,
    /// When the turn finished, unix milliseconds.
    pub created_at_ms: i64,
    /// Bytes left out of the end of the answer, then of the question, so that the row fits one
    /// upload packet ([`TurnOutcome::cut_text`]); 0 when the text is whole, as it always is in
    /// the device's own log.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub text_cut_bytes: u64,
    /// The app forced the route (OpenAI model `tmo-local` or `tmo-cloud`): the action is not a
    /// draw of the logging policy, so off-policy estimates and training leave the row out.
    #[serde(default, skip_serializing_if = "is_false")]
    pub forced: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl TurnOutcome {
    /// Leaves out at least `bytes` of text, from the end of the answer first, then from the end
    /// of the question (at character boundaries), and counts them in `text_cut_bytes`. What
    /// training reads (observation, action, propensity, costs, score) is kept whole. Returns
    /// false, changing nothing, when the text is shorter than `bytes`.
    pub fn cut_text(&mut self, bytes: usize) -> bool {
        if self.answer.len() + self.question.len() < bytes {
            return false;
        }
        let mut left = bytes;
        for text in [&mut self.answer, &mut self.question] {
            let mut keep = text.len().saturating_sub(left);
            while !text.is_char_boundary(keep) {
                keep -= 1;
            }
            left = left.saturating_sub(text.len() - keep);
            self.text_cut_bytes += (text.len() - keep) as u64;
            text.truncate(keep);
        }
        true
    }

    /// Checks what SQLite constraints cannot express clearly; every violation is named.
    pub fn validate(&self) -> Result<(), OutcomeLogError> {
        let fail = |reason: String| OutcomeLogError::InvalidOutcome {
            dialogue: self.dialogue_id.clone(),
            turn: self.turn,
            reason,
        };
        if self.dialogue_id.is_empty() {
            return Err(fail("empty dialogue id".into()));
        }
        if self.dialogue_id.len() > MAX_DIALOGUE_ID_LEN {
            return Err(fail(format!("dialogue id longer than {MAX_DIALOGUE_ID_LEN} bytes")));
        }
        if self.observation.iter().any(|v| !v.is_finite()) {
            return Err(fail("observation holds a NaN or infinite value".into()));
        }
        if !(self.propensity.is_finite() && self.propensity > 0.0 && self.propensity <= 1.0) {
            return Err(fail(format!("propensity {} is outside (0, 1]", self.propensity)));
        }
        if (self.action_index == 0) != matches!(self.action, Action::Local) {
            return Err(fail(format!(
                "action index {} does not match action {:?} (index 0 is local, and only it)",
                self.action_index, self.action
            )));
        }
        let amounts = [
            ("latency_secs", Some(self.latency_secs)),
            ("energy_joules", self.energy_joules),
            ("cost_usd", Some(self.cost_usd)),
        ];
        for (name, value) in amounts {
            if let Some(v) = value
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(fail(format!("{name} {v} is not a finite non-negative number")));
            }
        }
        match (self.score, self.score_source) {
            (Some(s), Some(_)) if !s.is_finite() => return Err(fail(format!("score {s} is not finite"))),
            (Some(_), None) => return Err(fail("a score without its source".into())),
            (None, Some(_)) => return Err(fail("a score source without a score".into())),
            _ => {}
        }
        if self.created_at_ms < 0 {
            return Err(fail(format!("created_at_ms {} is before 1970", self.created_at_ms)));
        }
        Ok(())
    }
}

/// A row read back from the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedOutcome {
    pub id: RowId,
    #[serde(flatten)]
    pub outcome: TurnOutcome,
    /// When the collector acknowledged the row, unix milliseconds; `None` while pending.
    pub uploaded_at_ms: Option<i64>,
}

/// What `set_score` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScoreUpdate {
    /// The score was stored (and the row is pending upload again, so the collector gets it);
    /// the row's policy version says which policy the score judges.
    Updated {
        /// The policy version that decided the turn.
        policy_version: String,
    },
    /// The row keeps its score from a higher-ranked source.
    KeptHigherRanked { existing: ScoreSource },
}

/// The current time in unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use policy_onnx::schema::{ModalitySet, Schema};

    /// A realistic outcome: 27-float observation, a 200-character answer, a telemetry snapshot.
    pub(crate) fn sample(dialogue: &str, turn: u32) -> TurnOutcome {
        let schema = Schema::default();
        let action = Action::Cloud { modalities: ModalitySet::from_indices([0, 2]) };
        TurnOutcome {
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
            answer: "a".repeat(200),
            score: None,
            score_source: None,
            telemetry: serde_json::json!({"cpu_percent": 41.5, "mem_used_bytes": 1_234_567_890u64,
                "temp_c": 52.0, "power_w": 6.1}),
            route: None,
            cloud_attempt: None,
            created_at_ms: 1_790_000_000_000 + i64::from(turn),
            text_cut_bytes: 0,
            forced: false,
        }
    }

    /// The answer's end goes first, then the question's, at character boundaries; the count
    /// says how much went; a row with too little text is left alone.
    #[test]
    fn cut_text_takes_the_end_of_the_answer_then_of_the_question() {
        let mut row =
            TurnOutcome { question: "Was kann ich kochen?".into(), answer: "Käse".into(), ..sample("d", 0) };
        assert!(!row.cut_text(26));
        assert_eq!((row.answer.as_str(), row.text_cut_bytes), ("Käse", 0));
        assert!(row.cut_text(3)); // "Käse" is 5 bytes: cutting 3 from its end lands inside 'ä'.
        assert_eq!((row.answer.as_str(), row.text_cut_bytes), ("K", 4));
        assert!(row.cut_text(6));
        assert_eq!(
            (row.answer.as_str(), row.question.as_str(), row.text_cut_bytes),
            ("", "Was kann ich ko", 10)
        );
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(json["text_cut_bytes"], 10);
        assert_eq!(serde_json::from_value::<TurnOutcome>(json).unwrap(), row);
        // A whole row does not name the field, and rows written before it read as whole.
        assert!(serde_json::to_value(sample("d", 0)).unwrap().get("text_cut_bytes").is_none());
    }

    #[test]
    fn validation_names_the_bad_field() {
        assert!(sample("d", 0).validate().is_ok());
        type Breakage = Box<dyn Fn(&mut TurnOutcome)>;
        let cases: Vec<(Breakage, &str)> = vec![
            (Box::new(|o| o.dialogue_id.clear()), "empty dialogue id"),
            (Box::new(|o| o.propensity = 0.0), "propensity"),
            (Box::new(|o| o.propensity = f64::NAN), "propensity"),
            (Box::new(|o| o.latency_secs = -1.0), "latency_secs"),
            (Box::new(|o| o.energy_joules = Some(f64::INFINITY)), "energy_joules"),
            (Box::new(|o| o.observation[3] = f32::NAN), "observation"),
            (Box::new(|o| o.action_index = 0), "action index 0"),
            (Box::new(|o| o.score = Some(1.0)), "without its source"),
            (Box::new(|o| o.score_source = Some(ScoreSource::Judge)), "without a score"),
        ];
        for (break_it, expected) in cases {
            let mut o = sample("d", 0);
            break_it(&mut o);
            let err = o.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }

    #[test]
    fn score_sources_parse_their_names_and_rank_feedback_first() {
        for s in [ScoreSource::RefusalHeuristic, ScoreSource::Judge, ScoreSource::Feedback] {
            assert_eq!(s.as_str().parse::<ScoreSource>(), Ok(s));
        }
        assert!("thumbs".parse::<ScoreSource>().is_err());
        assert!(
            ScoreSource::Feedback > ScoreSource::Judge && ScoreSource::Judge > ScoreSource::RefusalHeuristic
        );
    }
}

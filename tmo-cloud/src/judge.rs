//! LLM-as-judge: a sample of the answers is scored 0..1 by a judge model (a backend of the
//! same kinds) and the score is published on the device's score topic, so that the device's
//! outcome gains a score.

use std::time::{Duration, Instant};

use tmo_protocol::{CloudRequest, JudgeScore};

use crate::backend::{Backend, BackendError};

/// The judge's instructions.
pub const JUDGE_SYSTEM_PROMPT: &str = "You grade answers of a kitchen assistant. Given the dialogue, the \
question and the answer, reply with one number from 0 (useless or wrong) to 10 (correct, helpful and \
concise), and nothing else.";

/// A configured judge.
#[derive(Debug)]
pub struct Judge {
    backend: Backend,
    sample_rate: f64,
    max_tokens: u32,
    timeout: Duration,
}

/// Why no score was produced.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    /// The judge's backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The judge did not answer with a number.
    #[error("no score in the judge's answer {0:?}")]
    NoScore(String),
}

impl Judge {
    /// A judge scoring a `sample_rate` fraction of the answers.
    pub fn new(backend: Backend, sample_rate: f64, max_tokens: u32, timeout: Duration) -> Self {
        Self { backend, sample_rate, max_tokens, timeout }
    }

    /// Whether this request's answer is scored: a deterministic function of the request id,
    /// so that a request answered twice (QoS 1 redelivery) is sampled the same way.
    pub fn sampled(&self, request: &CloudRequest) -> bool {
        sampled(request.request_id.0, self.sample_rate)
    }

    /// Scores `answer` to `request`.
    pub async fn score(&self, request: &CloudRequest, answer: &str) -> Result<JudgeScore, JudgeError> {
        let mut prompt = request.clone();
        prompt.history.clear();
        let mut text = String::new();
        for turn in &request.history {
            text.push_str(&format!("User: {}\nAssistant: {}\n", turn.question, turn.answer));
        }
        text.push_str(&format!(
            "Question ({}): {}\nAnswer to grade: {answer}\nScore from 0 to 10:",
            request.task, request.question
        ));
        prompt.question = text;
        prompt.max_tokens = self.max_tokens;
        let deadline = Instant::now() + self.timeout;
        let graded = tokio::time::timeout(
            self.timeout,
            self.backend.answer(&prompt, JUDGE_SYSTEM_PROMPT, deadline, None),
        )
        .await
        .map_err(|_| BackendError::Deadline { attempts: 1, last: None })??;
        let score = parse_score(&graded.text).ok_or_else(|| JudgeError::NoScore(graded.text.clone()))?;
        Ok(JudgeScore {
            v: tmo_protocol::MESSAGE_VERSION,
            request_id: request.request_id,
            dialogue_id: request.dialogue_id.clone(),
            turn: request.turn,
            score,
            judge_model: self.backend.model().to_owned(),
        })
    }
}

/// Whether id `id` falls in a `rate` sample (splitmix64 of the id against the rate).
pub fn sampled(id: u64, rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    if rate >= 1.0 {
        return true;
    }
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64 <= rate
}

/// The first number in `text`, read on a 0..10 scale (or 0..1 when it has a fraction below
/// one), as a score in [0, 1].
pub fn parse_score(text: &str) -> Option<f64> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let rest = &text[start..];
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    let number: f64 = rest[..end].trim_end_matches('.').parse().ok()?;
    let score = if number <= 1.0 && rest[..end].contains('.') { number } else { number / 10.0 };
    (0.0..=1.0).contains(&score).then_some(score)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_read_from_the_judges_text() {
        assert_eq!(parse_score("8"), Some(0.8));
        assert_eq!(parse_score("Score: 7/10"), Some(0.7));
        assert_eq!(parse_score("10."), Some(1.0));
        assert_eq!(parse_score("0.5"), Some(0.5));
        assert_eq!(parse_score("I give it 9.5"), Some(0.95));
        assert_eq!(parse_score("42"), None);
        assert_eq!(parse_score("great answer"), None);
    }

    #[test]
    fn sampling_follows_the_rate() {
        let n = 20_000u64;
        let hits = (0..n).filter(|i| sampled(i.wrapping_mul(7919), 0.25)).count() as f64 / n as f64;
        assert!((hits - 0.25).abs() < 0.02, "{hits}");
        assert!((0..100).all(|i| sampled(i, 1.0)));
        assert!((0..100).all(|i| !sampled(i, 0.0)));
        assert_eq!(sampled(12345, 0.5), sampled(12345, 0.5));
    }
}

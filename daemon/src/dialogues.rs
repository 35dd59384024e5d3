//! Dialogues: each one's turns (task, action, modalities sent), what it has spent of its
//! budgets, and the local model's conversation; idle ones expire, and the least recently used
//! goes first when too many are open.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use llm_engine::Conversation;
use policy_onnx::schema::Turn;
use rand::RngCore;

/// Why a turn cannot start.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DialogueError {
    #[error("unknown dialogue {0:?} (never started, or expired after being idle)")]
    Unknown(String),
    #[error("dialogue {0:?} already has a turn in progress")]
    Busy(String),
    #[error("dialogue {dialogue:?} has no logged turn {turn}")]
    UnknownTurn { dialogue: String, turn: u32 },
}

/// One dialogue.
#[derive(Debug)]
pub struct Dialogue {
    /// Finished turns, oldest first: what the policy's observation is encoded from.
    pub turns: Vec<Turn>,
    pub spent_latency_secs: f64,
    pub spent_cost_usd: f64,
    pub budget_latency_secs: f64,
    pub budget_cost_usd: f64,
    /// The local model's view of the dialogue (absent while a turn holds it).
    conversation: Option<Conversation>,
    last_active: Instant,
}

impl Dialogue {
    pub fn remaining_latency_secs(&self) -> f64 {
        (self.budget_latency_secs - self.spent_latency_secs).max(0.0)
    }

    pub fn remaining_cost_usd(&self) -> f64 {
        (self.budget_cost_usd - self.spent_cost_usd).max(0.0)
    }
}

/// A turn in progress: the dialogue's state as the turn started. Hand it back with
/// [`Dialogues::finish_turn`] or [`Dialogues::abandon_turn`].
#[derive(Debug)]
pub struct TurnStart {
    pub dialogue_id: String,
    pub turn: u32,
    pub history: Vec<Turn>,
    pub remaining_latency_secs: f64,
    pub remaining_cost_usd: f64,
    pub conversation: Conversation,
}

/// Every open dialogue.
#[derive(Debug)]
pub struct Dialogues {
    open: HashMap<String, Dialogue>,
    budget_latency_secs: f64,
    budget_cost_usd: f64,
    idle_expiry: Duration,
    max_active: usize,
    system_prompt: String,
}

impl Dialogues {
    pub fn new(budgets: (f64, f64), idle_expiry: Duration, max_active: usize, system_prompt: &str) -> Self {
        Self {
            open: HashMap::new(),
            budget_latency_secs: budgets.0,
            budget_cost_usd: budgets.1,
            idle_expiry,
            max_active: max_active.max(1),
            system_prompt: system_prompt.to_owned(),
        }
    }

    /// Starts a dialogue and returns its id.
    /// A new dialogue whose local conversation starts with `system_prompt` (the configured one
    /// when `None`).
    pub fn create(&mut self, now: Instant, system_prompt: Option<&str>) -> String {
        self.expire(now);
        while self.open.len() >= self.max_active {
            let oldest = self
                .open
                .iter()
                .filter(|(_, d)| d.conversation.is_some())
                .min_by_key(|(_, d)| d.last_active)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => {
                    tracing::info!(dialogue = %id, "dialogue closed: too many open dialogues");
                    self.open.remove(&id);
                }
                None => break,
            }
        }
        let mut bytes = [0u8; 12];
        rand::rng().fill_bytes(&mut bytes);
        let id = hex::encode(bytes);
        self.open.insert(
            id.clone(),
            Dialogue {
                turns: Vec::new(),
                spent_latency_secs: 0.0,
                spent_cost_usd: 0.0,
                budget_latency_secs: self.budget_latency_secs,
                budget_cost_usd: self.budget_cost_usd,
                conversation: Some(Conversation::new(Some(system_prompt.unwrap_or(&self.system_prompt)))),
                last_active: now,
            },
        );
        id
    }

    /// The budgets new dialogues get.
    pub fn budgets(&self) -> (f64, f64) {
        (self.budget_latency_secs, self.budget_cost_usd)
    }

    /// Takes the dialogue's state for a new turn; the dialogue is busy until the turn ends.
    pub fn start_turn(&mut self, id: &str, now: Instant) -> Result<TurnStart, DialogueError> {
        self.expire(now);
        let dialogue = self.open.get_mut(id).ok_or_else(|| DialogueError::Unknown(id.to_owned()))?;
        let conversation = dialogue.conversation.take().ok_or_else(|| DialogueError::Busy(id.to_owned()))?;
        dialogue.last_active = now;
        Ok(TurnStart {
            dialogue_id: id.to_owned(),
            turn: u32::try_from(dialogue.turns.len()).unwrap_or(u32::MAX),
            history: dialogue.turns.clone(),
            remaining_latency_secs: dialogue.remaining_latency_secs(),
            remaining_cost_usd: dialogue.remaining_cost_usd(),
            conversation,
        })
    }

    /// Records a finished turn and what it spent; returns the budgets left.
    pub fn finish_turn(
        &mut self,
        start: TurnStart,
        turn: Turn,
        conversation: Conversation,
        latency_secs: f64,
        cost_usd: f64,
        now: Instant,
    ) -> (f64, f64) {
        let Some(dialogue) = self.open.get_mut(&start.dialogue_id) else {
            return (0.0, 0.0);
        };
        dialogue.turns.push(turn);
        dialogue.spent_latency_secs += latency_secs;
        dialogue.spent_cost_usd += cost_usd;
        dialogue.conversation = Some(conversation);
        dialogue.last_active = now;
        (dialogue.remaining_latency_secs(), dialogue.remaining_cost_usd())
    }

    /// Gives the dialogue back after a turn that failed, as it was before the turn.
    pub fn abandon_turn(&mut self, start: TurnStart) {
        if let Some(dialogue) = self.open.get_mut(&start.dialogue_id) {
            dialogue.conversation = Some(start.conversation);
        }
    }

    /// Forgets dialogues idle for longer than the expiry (never one with a turn in progress).
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.open.len();
        let expiry = self.idle_expiry;
        self.open.retain(|_, d| d.conversation.is_none() || now.duration_since(d.last_active) < expiry);
        before - self.open.len()
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// The smallest remaining latency and cost budgets over the open dialogues.
    pub fn least_budget_left(&self) -> Option<(f64, f64)> {
        self.open
            .values()
            .map(|d| (d.remaining_latency_secs(), d.remaining_cost_usd()))
            .reduce(|a, b| (a.0.min(b.0), a.1.min(b.1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_onnx::schema::{Action, TaskCategory};

    fn store(max_active: usize) -> Dialogues {
        Dialogues::new((30.0, 0.05), Duration::from_secs(60), max_active, "system")
    }

    #[test]
    fn a_turn_spends_the_budget_and_extends_the_history() {
        let mut dialogues = store(8);
        let t0 = Instant::now();
        let id = dialogues.create(t0, None);
        let start = dialogues.start_turn(&id, t0).expect("start");
        assert_eq!((start.turn, start.remaining_latency_secs), (0, 30.0));
        assert_eq!(dialogues.start_turn(&id, t0).expect_err("busy"), DialogueError::Busy(id.clone()));
        let conversation = start.conversation.clone();
        let turn = Turn { task: TaskCategory::Query, action: Action::Local };
        let left = dialogues.finish_turn(start, turn, conversation, 2.0, 0.01, t0);
        assert_eq!(left, (28.0, 0.04));
        let next = dialogues.start_turn(&id, t0).expect("second turn");
        assert_eq!((next.turn, next.history.len()), (1, 1));
    }

    #[test]
    fn idle_dialogues_expire_and_unknown_ids_are_refused() {
        let mut dialogues = store(8);
        let t0 = Instant::now();
        let id = dialogues.create(t0, None);
        assert_eq!(
            dialogues.start_turn("nope", t0).expect_err("unknown"),
            DialogueError::Unknown("nope".into())
        );
        let later = t0 + Duration::from_secs(61);
        assert!(matches!(dialogues.start_turn(&id, later), Err(DialogueError::Unknown(_))));
        assert_eq!(dialogues.len(), 0);
    }

    #[test]
    fn the_least_recently_used_dialogue_closes_first() {
        let mut dialogues = store(2);
        let t0 = Instant::now();
        let a = dialogues.create(t0, None);
        let b = dialogues.create(t0 + Duration::from_secs(1), None);
        let start = dialogues.start_turn(&a, t0 + Duration::from_secs(2)).expect("touch a");
        dialogues.abandon_turn(start);
        let _c = dialogues.create(t0 + Duration::from_secs(3), None);
        assert_eq!(dialogues.len(), 2);
        assert!(dialogues.start_turn(&b, t0 + Duration::from_secs(4)).is_err());
        assert!(dialogues.start_turn(&a, t0 + Duration::from_secs(4)).is_ok());
    }
}

//! A budget-constrained planner over the simulator's response model.
//!
//! For an observation it values every action as its expected reward now plus the expected value
//! of the rest of the dialogue:
//!
//! - now: the response model's score of the action after the observed window (exact: the window
//!   is in the observation), the training turns' mean normalised association of the action for
//!   the observed task (the association scores are not observed), minus the normalised costs;
//! - the next `lookahead - 1` turns: the same, exactly, for each possible next task, weighted by
//!   the dialogue model (how often dialogues go on after this turn, which task follows which);
//! - beyond: a history-free dynamic programme over the remaining budgets, with each task's mean
//!   response score per action.
//!
//! Budgets are a hard constraint: an action is allowed only if, after it, each remaining budget
//! still covers a local answer for every turn a dialogue may still have. The planner never
//! values an action it does not allow, and reports the allowed set with the values.

use std::collections::HashMap;

use serde::Serialize;

use super::sim::{Episode, Simulator};
use crate::schema::TaskCategory;

const TASKS: usize = TaskCategory::ALL.len();

/// What the planner knows about dialogues, estimated from the training episodes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DialogueModel {
    /// `continuation[t]`: probability that a dialogue with a turn t has a turn t + 1.
    pub continuation: Vec<f64>,
    /// Probability of each task on a dialogue's first turn (add-one smoothed).
    pub first_task: [f64; TASKS],
    /// `next_task[a][b]`: probability that a turn of task b follows one of task a (add-one
    /// smoothed).
    pub next_task: [[f64; TASKS]; TASKS],
    /// `association[task][action]`: mean normalised association score.
    pub association: Vec<Vec<f64>>,
    /// `response[task][action]`: mean predicted response score over the training windows.
    pub response: Vec<Vec<f64>>,
    /// Longest training dialogue.
    pub max_turns: usize,
}

impl DialogueModel {
    pub fn fit(episodes: &[Episode], sim: &Simulator) -> Self {
        let schema = &sim.schema;
        let actions = schema.action_count();
        let max_turns = episodes.iter().map(Episode::len).max().unwrap_or(1).max(1);
        let continuation = (0..max_turns)
            .map(|t| {
                let reach = episodes.iter().filter(|e| e.len() > t).count();
                let go_on = episodes.iter().filter(|e| e.len() > t + 1).count();
                if reach == 0 { 0.0 } else { go_on as f64 / reach as f64 }
            })
            .collect();
        let mut first = [1.0; TASKS];
        let mut next = [[1.0; TASKS]; TASKS];
        let mut association = vec![vec![0.0; actions]; TASKS];
        let mut response = vec![vec![0.0; actions]; TASKS];
        let mut count = [0usize; TASKS];
        let mut obs = vec![0.0f32; schema.dialogue_len()];
        for e in episodes {
            if let Some(t) = e.tasks.first() {
                first[t.id()] += 1.0;
            }
            for w in e.tasks.windows(2) {
                next[w[0].id()][w[1].id()] += 1.0;
            }
            for t in 0..e.len() {
                let task = e.tasks[t].id();
                count[task] += 1;
                schema.encode_observation(&e.logged[..t], e.tasks[t], 0.0, 0.0, &mut obs);
                for a in 0..actions {
                    association[task][a] += e.association_norm[t][a];
                    response[task][a] += sim.response.predict(&obs, a);
                }
            }
        }
        let normalise = |row: &mut [f64; TASKS]| {
            let total: f64 = row.iter().sum();
            row.iter_mut().for_each(|p| *p /= total);
        };
        normalise(&mut first);
        next.iter_mut().for_each(normalise);
        for task in 0..TASKS {
            let n = count[task].max(1) as f64;
            association[task].iter_mut().for_each(|v| *v /= n);
            response[task].iter_mut().for_each(|v| *v /= n);
        }
        DialogueModel { continuation, first_task: first, next_task: next, association, response, max_turns }
    }

    fn continues(&self, turn: usize) -> f64 {
        self.continuation.get(turn).copied().unwrap_or(0.0)
    }
}

/// The planner's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlannerConfig {
    /// Turns valued exactly with the response model, the current one included (at least 1).
    pub lookahead: usize,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig { lookahead: 2 }
    }
}

/// The values of every action at one observation.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionValues {
    pub values: Vec<f64>,
    pub allowed: Vec<bool>,
}

impl ActionValues {
    /// The best allowed action (the first on ties; local when nothing else is allowed).
    pub fn best(&self) -> usize {
        let mut best = 0;
        for a in 0..self.values.len() {
            if self.allowed[a] && (!self.allowed[best] || self.values[a] > self.values[best]) {
                best = a;
            }
        }
        best
    }
}

/// The planner; it caches response-model predictions per window, so keep one per thread.
#[derive(Debug)]
pub struct Planner<'a> {
    sim: &'a Simulator,
    model: &'a DialogueModel,
    config: PlannerConfig,
    /// Per-task best action of each cost class for the history-free tail: (action, reward).
    tail_choices: Vec<Vec<(usize, f64)>>,
    cache: HashMap<Vec<u32>, Vec<f64>>,
}

/// Budget keys of the tail's memo: remaining budgets rounded to a micro-second and a nano-dollar.
type TailKey = (usize, usize, i64, i64);

impl<'a> Planner<'a> {
    pub fn new(sim: &'a Simulator, model: &'a DialogueModel, config: PlannerConfig) -> Self {
        Planner {
            sim,
            model,
            config: PlannerConfig { lookahead: config.lookahead.max(1) },
            tail_choices: tail_choices(sim, model),
            cache: HashMap::new(),
        }
    }

    /// Plans under `sim`'s cost table and budgets from now on. The response predictions cached
    /// so far are kept: `sim` must share this planner's response model
    /// ([`Simulator::with_costs`]).
    pub fn set_simulator(&mut self, sim: &'a Simulator) {
        debug_assert!(std::sync::Arc::ptr_eq(&sim.response, &self.sim.response));
        self.tail_choices = tail_choices(sim, self.model);
        self.sim = sim;
    }

    /// Values of every action at `observation` (contract v1 layout).
    pub fn action_values(&mut self, observation: &[f32]) -> ActionValues {
        let schema = &self.sim.schema;
        let window_len = schema.dialogue_len() - 2;
        let step = schema.step_len();
        let window = &observation[..window_len];
        // Turns in the window: slots whose task id is not the -1 padding; the current is the last.
        let turn = window.chunks_exact(step).filter(|s| s[step - 1] >= 0.0).count().saturating_sub(1);
        let task = task_of(window[window_len - 1]);
        let latency = f64::from(observation[window_len]);
        let usage = f64::from(observation[window_len + 1]);
        let mut tail_memo = HashMap::new();
        let actions = schema.action_count();
        let mut values = vec![0.0; actions];
        let allowed = self.allowed(turn, latency, usage);
        for a in 0..actions {
            if allowed[a] {
                values[a] =
                    self.q(window, turn, task, latency, usage, a, self.config.lookahead, &mut tail_memo);
            }
        }
        ActionValues { values, allowed }
    }

    /// Actions whose costs leave, in each budget, a local answer for every possible later turn.
    /// Local is allowed when nothing is.
    fn allowed(&self, turn: usize, latency: f64, usage: f64) -> Vec<bool> {
        let costs = &self.sim.costs;
        let later = self.model.max_turns.saturating_sub(turn + 1) as f64;
        let reserve_latency = later * costs.latency_secs[0];
        let reserve_usage = later * costs.usage_usd[0];
        let mut allowed: Vec<bool> = (0..costs.latency_secs.len())
            .map(|a| {
                latency - costs.latency_secs[a] >= reserve_latency
                    && usage - costs.usage_usd[a] >= reserve_usage
            })
            .collect();
        if !allowed.iter().any(|a| *a) {
            allowed[0] = true;
        }
        allowed
    }

    fn predictions(&mut self, window: &[f32]) -> &[f64] {
        let key: Vec<u32> = window.iter().map(|v| v.to_bits()).collect();
        let sim = self.sim;
        self.cache.entry(key).or_insert_with(|| {
            (0..sim.schema.action_count()).map(|a| sim.response.predict(window, a)).collect()
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn q(
        &mut self,
        window: &[f32],
        turn: usize,
        task: usize,
        latency: f64,
        usage: f64,
        action: usize,
        lookahead: usize,
        tail_memo: &mut HashMap<TailKey, f64>,
    ) -> f64 {
        let response = self.predictions(window)[action];
        let now = self.sim.reward(response, self.model.association[task][action], action);
        let go_on = self.model.continues(turn);
        if go_on == 0.0 {
            return now;
        }
        let latency = latency - self.sim.costs.latency_secs[action];
        let usage = usage - self.sim.costs.usage_usd[action];
        let mut later = 0.0;
        if lookahead <= 1 {
            for next in 0..TASKS {
                later +=
                    self.model.next_task[task][next] * self.tail(turn + 1, next, latency, usage, tail_memo);
            }
        } else {
            let schema = &self.sim.schema;
            let step = schema.step_len();
            let mut next_window = window[step..].to_vec();
            let action_value = schema.action(action).unwrap_or(crate::schema::Action::Local);
            next_window.push(if action_value.is_cloud() { 1.0 } else { 0.0 });
            for m in 0..schema.modalities() {
                next_window.push(if action_value.modalities().contains(m) { 1.0 } else { 0.0 });
            }
            next_window.push(0.0);
            let last = next_window.len() - 1;
            let allowed = self.allowed(turn + 1, latency, usage);
            for next in 0..TASKS {
                next_window[last] = next as f32;
                let mut best = f64::NEG_INFINITY;
                for (a, ok) in allowed.iter().enumerate() {
                    if *ok {
                        let v =
                            self.q(&next_window, turn + 1, next, latency, usage, a, lookahead - 1, tail_memo);
                        best = best.max(v);
                    }
                }
                later += self.model.next_task[task][next] * best;
            }
        }
        now + go_on * later
    }

    /// The history-free value of turn `turn` of task `task` with the remaining budgets.
    fn tail(
        &self,
        turn: usize,
        task: usize,
        latency: f64,
        usage: f64,
        memo: &mut HashMap<TailKey, f64>,
    ) -> f64 {
        if turn >= self.model.max_turns {
            return 0.0;
        }
        let key = (turn, task, (latency * 1e6).round() as i64, (usage * 1e9).round() as i64);
        if let Some(v) = memo.get(&key) {
            return *v;
        }
        let allowed = self.allowed(turn, latency, usage);
        let go_on = self.model.continues(turn);
        let mut best = f64::NEG_INFINITY;
        for &(a, r) in &self.tail_choices[task] {
            if !allowed[a] {
                continue;
            }
            let mut v = r;
            if go_on > 0.0 {
                let (l, u) = (latency - self.sim.costs.latency_secs[a], usage - self.sim.costs.usage_usd[a]);
                for next in 0..TASKS {
                    v += go_on * self.model.next_task[task][next] * self.tail(turn + 1, next, l, u, memo);
                }
            }
            best = best.max(v);
        }
        if best == f64::NEG_INFINITY {
            // Only actions that the cost classes' representatives do not cover are allowed:
            // cannot happen (local is its own class and always allowed), but stay finite.
            best = 0.0;
        }
        memo.insert(key, best);
        best
    }
}

/// Per task, the best action of each cost class for the history-free tail: (action, reward).
/// Actions with the same costs differ there only by their mean reward, so only the best is kept.
fn tail_choices(sim: &Simulator, model: &DialogueModel) -> Vec<Vec<(usize, f64)>> {
    let costs = &sim.costs;
    let actions = sim.schema.action_count();
    let mut tail_choices = Vec::with_capacity(TASKS);
    for task in 0..TASKS {
        let mut best: Vec<(usize, f64)> = Vec::new();
        for a in 0..actions {
            let r = sim.reward(model.response[task][a], model.association[task][a], a);
            let same = best.iter_mut().find(|(b, _)| {
                costs.latency_secs[*b] == costs.latency_secs[a] && costs.usage_usd[*b] == costs.usage_usd[a]
            });
            match same {
                Some(slot) if r > slot.1 => *slot = (a, r),
                Some(_) => {}
                None => best.push((a, r)),
            }
        }
        tail_choices.push(best);
    }
    tail_choices
}

fn task_of(value: f32) -> usize {
    if value.is_finite() && value >= 0.0 { (value as usize).min(TASKS - 1) } else { 0 }
}

/// The planner acting greedily on its own values (an evaluation reference).
#[derive(Debug)]
pub struct PlannerAgent<'a>(pub Planner<'a>);

impl super::sim::Agent for PlannerAgent<'_> {
    fn act(&mut self, observation: &[f32]) -> Result<usize, super::sim::AgentError> {
        Ok(self.0.action_values(observation).best())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schema;
    use crate::train::sim::tests::{train_dialogues, tx2};
    use crate::train::sim::{episodes, rollout};

    fn setup() -> (Simulator, Vec<Episode>) {
        let schema = Schema::default();
        let eps = episodes(&train_dialogues(), &schema).unwrap();
        (Simulator::new(&eps, &tx2(), schema).unwrap(), eps)
    }

    #[test]
    fn dialogue_model_matches_the_counts() {
        let (sim, eps) = setup();
        let m = DialogueModel::fit(&eps, &sim);
        // 80 dialogues: 16 of 2 turns, 22 of 3, 21 of 4, 21 of 5.
        assert_eq!(m.max_turns, 5);
        assert_eq!(m.continuation[0], 1.0);
        assert!((m.continuation[1] - 64.0 / 80.0).abs() < 1e-12);
        assert!((m.continuation[2] - 42.0 / 64.0).abs() < 1e-12);
        assert!((m.continuation[3] - 21.0 / 42.0).abs() < 1e-12);
        assert_eq!(m.continuation[4], 0.0);
        for row in m.next_task {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        // Every view set's normalised association is at most 1; all three views are always 1.
        for task in 0..TASKS {
            assert!((m.association[task][8] - 1.0).abs() < 1e-12);
            assert_eq!(m.association[task][0], 0.0);
        }
    }

    #[test]
    fn exhausted_budgets_leave_only_local() {
        let (sim, eps) = setup();
        let m = DialogueModel::fit(&eps, &sim);
        let mut p = Planner::new(&sim, &m, PlannerConfig::default());
        let obs = sim.schema.observation(&[], TaskCategory::Query, 2.0, 0.05);
        let v = p.action_values(&obs);
        assert_eq!(v.allowed, [true, false, false, false, false, false, false, false, false]);
        assert_eq!(v.best(), 0);
        // 0.006 USD left on turn 0 of up to 5: one view (0.005) or text only, nothing larger.
        let obs = sim.schema.observation(&[], TaskCategory::Query, 30.0, 0.006);
        let v = p.action_values(&obs);
        assert_eq!(v.allowed, [true, true, true, true, true, false, false, false, false]);
    }

    #[test]
    fn the_planner_never_goes_over_budget_and_beats_fixed_actions() {
        let (sim, eps) = setup();
        let m = DialogueModel::fit(&eps, &sim);
        let mut agent = PlannerAgent(Planner::new(&sim, &m, PlannerConfig::default()));
        let mut total = 0.0;
        for e in &eps {
            let out = rollout(&sim, &mut agent, e).unwrap();
            assert!(!out.over_latency_budget && !out.over_usage_budget, "dialogue {}", e.id);
            total += out.mean_reward;
        }
        let mean = total / eps.len() as f64;
        // The best fixed action (one view m0) scores 0.949 on these dialogues.
        assert!(mean > 1.2, "{mean}");
    }
}

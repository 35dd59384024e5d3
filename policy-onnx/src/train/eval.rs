//! Evaluation of policies against the paper's baselines, on a test file or by k-fold.
//!
//! Each split fits the simulator (response model) on its training dialogues and plays its test
//! dialogues with the paper's evaluation semantics ([`super::sim::rollout`]). Rows:
//! the given contract ONNX policies, optionally this project's trainer retrained on each split
//! (and the planner it distils, as a reference), and the baselines always-local,
//! always-cloud-with-every-modality, random (the paper's: local half the time) and the best fixed
//! action (the fixed action with the best mean reward on the split's training dialogues).

use serde::Serialize;

use super::planner::{DialogueModel, Planner, PlannerAgent};
use super::sim::{
    Agent, AgentError, DialogueOutcome, FixedAgent, OnnxAgent, RandomAgent, SimError, Simulator, rollout,
};
use super::{Provenance, TrainConfig, TrainError, mean_reward, train};
use crate::m4a1::Dialogue;
use crate::runtime::Policy;
use crate::schema::Schema;
use device_profiles::DeviceProfile;

/// Why an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Simulator(#[from] SimError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("k-fold needs 2 <= K <= {dialogues} (the number of dialogues), got {k}")]
    BadFolds { k: usize, dialogues: usize },
    #[error(
        "policy `{name}` is for {found} observations and {found_actions} actions; the profile needs {expected} and {expected_actions}"
    )]
    SchemaMismatch {
        name: String,
        found: usize,
        found_actions: usize,
        expected: usize,
        expected_actions: usize,
    },
}

/// How the dialogues are split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Split {
    /// Train and test on the same dialogues.
    InSample,
    /// A separate test file.
    TestFile,
    /// K folds of the dialogues, shuffled with `seed`: each fold is tested once.
    KFold { k: usize, seed: u64 },
}

/// What to evaluate besides the baselines.
#[derive(Debug)]
pub struct Candidates<'a> {
    /// Contract policies, by display name.
    pub policies: Vec<(String, &'a Policy)>,
    /// Retrain this project's trainer on every split's training dialogues with these settings.
    pub retrain: Option<TrainConfig>,
    /// Seed of the random baseline.
    pub seed: u64,
}

/// One row of the report, pooled over every tested dialogue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalRow {
    pub name: String,
    pub dialogues: usize,
    pub mean_reward: f64,
    pub mean_response: f64,
    pub mean_association: f64,
    /// Mean per dialogue.
    pub mean_latency_secs: f64,
    pub mean_usage_usd: f64,
    /// Dialogues over either budget.
    pub over_budget: usize,
    pub over_latency_budget: usize,
    pub over_usage_budget: usize,
    /// How often each action was taken.
    pub action_histogram: Vec<usize>,
}

/// The whole evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    pub split: Split,
    pub profile: String,
    pub budgets: Budgets,
    pub rows: Vec<EvalRow>,
    /// The fixed action each split chose for the best-fixed baseline.
    pub best_fixed_actions: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Budgets {
    pub latency_secs: f64,
    pub cost_usd: f64,
}

/// Outcomes of one row, gathered over the splits.
#[derive(Debug, Default)]
struct Tally {
    name: String,
    outcomes: Vec<DialogueOutcome>,
}

/// Evaluates on `test` with the simulator fitted on `train_set` ([`Split::InSample`] or
/// [`Split::TestFile`]) or by k-fold over `train_set` ([`Split::KFold`], `test` ignored).
pub fn evaluate(
    train_set: &[Dialogue],
    test: &[Dialogue],
    split: Split,
    profile: &DeviceProfile,
    candidates: &Candidates<'_>,
) -> Result<EvalReport, EvalError> {
    let schema = Schema::new(profile.modality_count(), Schema::default().history());
    for (name, p) in &candidates.policies {
        // v1 and v2 policies alike: the board's shape (X, Z) must match.
        let s = p.schema();
        if s.dialogue_len() != schema.dialogue_len() || s.action_count() != schema.action_count() {
            let expected = schema.to_version(s.version()).observation_len();
            return Err(EvalError::SchemaMismatch {
                name: name.clone(),
                found: s.observation_len(),
                found_actions: s.action_count(),
                expected,
                expected_actions: schema.action_count(),
            });
        }
    }
    let splits: Vec<SplitSets> = match split {
        Split::InSample => vec![(train_set.to_vec(), train_set.to_vec())],
        Split::TestFile => vec![(train_set.to_vec(), test.to_vec())],
        Split::KFold { k, seed } => folds(train_set, k, seed)?,
    };
    let mut tallies: Vec<Tally> = Vec::new();
    let mut best_fixed_actions = Vec::new();
    for (train_part, test_part) in &splits {
        let (rows, best) = evaluate_split(train_part, test_part, &schema, profile, candidates)?;
        best_fixed_actions.push(best);
        if tallies.is_empty() {
            tallies =
                rows.iter().map(|(name, _)| Tally { name: name.clone(), outcomes: Vec::new() }).collect();
        }
        for (tally, (_, outcomes)) in tallies.iter_mut().zip(rows) {
            tally.outcomes.extend(outcomes);
        }
    }
    let rows = tallies.iter().map(|t| summarise(&t.name, &t.outcomes, schema.action_count())).collect();
    Ok(EvalReport {
        split,
        profile: profile.board.name.clone(),
        budgets: Budgets { latency_secs: profile.budgets.latency_secs, cost_usd: profile.budgets.cost_usd },
        rows,
        best_fixed_actions,
    })
}

/// The training and the test dialogues of one split.
pub type SplitSets = (Vec<Dialogue>, Vec<Dialogue>);

/// The k (train, test) splits of `dialogues`, shuffled with `seed`.
pub fn folds(dialogues: &[Dialogue], k: usize, seed: u64) -> Result<Vec<SplitSets>, EvalError> {
    if k < 2 || k > dialogues.len() {
        return Err(EvalError::BadFolds { k, dialogues: dialogues.len() });
    }
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut order: Vec<usize> = (0..dialogues.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    Ok((0..k)
        .map(|fold| {
            let (mut train_part, mut test_part) = (Vec::new(), Vec::new());
            for (position, &i) in order.iter().enumerate() {
                if position % k == fold { &mut test_part } else { &mut train_part }
                    .push(dialogues[i].clone());
            }
            (train_part, test_part)
        })
        .collect())
}

type Rows = Vec<(String, Vec<DialogueOutcome>)>;

fn evaluate_split(
    train_part: &[Dialogue],
    test_part: &[Dialogue],
    schema: &Schema,
    profile: &DeviceProfile,
    candidates: &Candidates<'_>,
) -> Result<(Rows, usize), EvalError> {
    let train_eps = super::sim::episodes(train_part, schema)?;
    let test_eps = super::sim::episodes(test_part, schema)?;
    let sim = Simulator::new(&train_eps, profile, schema.clone())?;
    let play = |agent: &mut dyn Agent| -> Result<Vec<DialogueOutcome>, AgentError> {
        test_eps.iter().map(|e| rollout(&sim, agent, e)).collect()
    };
    let mut rows: Rows = Vec::new();
    for (name, policy) in &candidates.policies {
        rows.push((name.clone(), play(&mut OnnxAgent::new(policy)?)?));
    }
    if let Some(config) = &candidates.retrain {
        let provenance = Provenance { data_hash: "", profile };
        let trained = train(train_part, provenance, config, &mut |_| {})?;
        rows.push(("tmo trainer (retrained per split)".into(), play(trained.network.agent().as_mut())?));
        let model = DialogueModel::fit(&train_eps, &sim);
        rows.push((
            "planner it distils (reference)".into(),
            play(&mut PlannerAgent(Planner::new(&sim, &model, config.planner)))?,
        ));
    }
    let all = schema.action_count() - 1;
    rows.push(("always local".into(), play(&mut FixedAgent(0))?));
    rows.push(("always cloud, every modality".into(), play(&mut FixedAgent(all))?));
    rows.push((
        "random (paper's)".into(),
        play(&mut RandomAgent::new(schema.action_count(), candidates.seed))?,
    ));
    let mut best = (0, f64::NEG_INFINITY);
    for a in 0..schema.action_count() {
        let (reward, _) = mean_reward(&sim, &train_eps, &mut FixedAgent(a)).map_err(|e| match e {
            TrainError::Agent(a) => EvalError::Agent(a),
            other => EvalError::Train(other),
        })?;
        if reward > best.1 {
            best = (a, reward);
        }
    }
    rows.push(("best fixed action".into(), play(&mut FixedAgent(best.0))?));
    Ok((rows, best.0))
}

fn summarise(name: &str, outcomes: &[DialogueOutcome], actions: usize) -> EvalRow {
    let n = outcomes.len().max(1) as f64;
    let mean = |f: fn(&DialogueOutcome) -> f64| outcomes.iter().map(f).sum::<f64>() / n;
    let mut action_histogram = vec![0; actions];
    for o in outcomes {
        for &a in &o.actions {
            action_histogram[a] += 1;
        }
    }
    EvalRow {
        name: name.to_owned(),
        dialogues: outcomes.len(),
        mean_reward: mean(|o| o.mean_reward),
        mean_response: mean(|o| o.mean_response),
        mean_association: mean(|o| o.mean_association),
        mean_latency_secs: mean(|o| o.total_latency_secs),
        mean_usage_usd: mean(|o| o.total_usage_usd),
        over_budget: outcomes.iter().filter(|o| o.over_latency_budget || o.over_usage_budget).count(),
        over_latency_budget: outcomes.iter().filter(|o| o.over_latency_budget).count(),
        over_usage_budget: outcomes.iter().filter(|o| o.over_usage_budget).count(),
        action_histogram,
    }
}

impl EvalReport {
    /// The report as a plain-text table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let split = match self.split {
            Split::InSample => "in-sample (trained and tested on the same dialogues)".to_owned(),
            Split::TestFile => "test file".to_owned(),
            Split::KFold { k, seed } => format!("{k}-fold (shuffle seed {seed})"),
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "split: {split}; profile {}; budgets {} s, {} USD per dialogue",
            self.profile, self.budgets.latency_secs, self.budgets.cost_usd
        );
        let width = self.rows.iter().map(|r| r.name.len()).max().unwrap_or(6).max(6);
        let _ = writeln!(
            out,
            "{:<width$}  {:>6}  {:>8}  {:>8}  {:>8}  {:>9}  {:>8}  {:>5}  actions 0..{}",
            "policy",
            "n",
            "reward",
            "response",
            "latency",
            "usage",
            "assoc",
            "over",
            self.rows.first().map_or(0, |r| r.action_histogram.len().saturating_sub(1)),
        );
        for r in &self.rows {
            let hist: Vec<String> = r.action_histogram.iter().map(usize::to_string).collect();
            let _ = writeln!(
                out,
                "{:<width$}  {:>6}  {:>8.4}  {:>8.4}  {:>7.2}s  {:>9.5}  {:>8.4}  {:>5}  [{}]",
                r.name,
                r.dialogues,
                r.mean_reward,
                r.mean_response,
                r.mean_latency_secs,
                r.mean_usage_usd,
                r.mean_association,
                r.over_budget,
                hist.join(" "),
            );
        }
        let _ = writeln!(out, "best fixed action per split: {:?}", self.best_fixed_actions);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::LoadOptions;
    use crate::train::sim::tests::{train_dialogues, tx2};
    use std::path::Path;

    fn sb3(name: &str) -> Policy {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/policies").join(name);
        Policy::from_file(&path, &LoadOptions::default()).unwrap()
    }

    fn row<'a>(report: &'a EvalReport, name: &str) -> &'a EvalRow {
        report.rows.iter().find(|r| r.name == name).unwrap()
    }

    /// Reference values computed independently with scikit-learn's kd-tree neighbours (the
    /// paper's regressor) on the same 80 dialogues, trained and tested in-sample.
    #[test]
    fn fixed_baselines_match_an_independent_reference() {
        let d = train_dialogues();
        let candidates = Candidates { policies: vec![], retrain: None, seed: 0 };
        let report = evaluate(&d, &d, Split::InSample, &tx2(), &candidates).unwrap();
        let local = row(&report, "always local");
        assert!((local.mean_reward - 0.832_523_596_013_922_1).abs() < 1e-9, "{}", local.mean_reward);
        assert_eq!(local.over_budget, 0);
        let all = row(&report, "always cloud, every modality");
        assert!((all.mean_reward - 0.773_898_573_189_889_5).abs() < 1e-9, "{}", all.mean_reward);
        // 21 dialogues of five turns go over both budgets; 21 of four go over the usage budget.
        assert_eq!((all.over_budget, all.over_latency_budget, all.over_usage_budget), (42, 21, 42));
        let best = row(&report, "best fixed action");
        assert_eq!(report.best_fixed_actions, vec![2]);
        assert!((best.mean_reward - 0.948_894_400_121_894_6).abs() < 1e-9, "{}", best.mean_reward);
        assert_eq!(local.action_histogram, vec![287, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(report.table().contains("always local"));
    }

    #[test]
    fn evaluates_the_papers_rc_ppo_policy_by_kfold() {
        let d = train_dialogues();
        let ppo = sb3("sb3-rc-ppo-m4a1.onnx");
        let candidates = Candidates { policies: vec![("sb3 rc-ppo".into(), &ppo)], retrain: None, seed: 0 };
        let report = evaluate(&d, &[], Split::KFold { k: 5, seed: 0 }, &tx2(), &candidates).unwrap();
        let r = row(&report, "sb3 rc-ppo");
        assert_eq!(r.dialogues, 80);
        assert_eq!(r.action_histogram.iter().sum::<usize>(), 287);
        assert!(r.mean_reward > 0.5 && r.mean_reward < 2.0, "{}", r.mean_reward);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["rows"][0]["name"], "sb3 rc-ppo");
        assert_eq!(json["split"]["kind"], "k_fold");
    }

    #[test]
    fn folds_partition_the_dialogues() {
        let d = train_dialogues();
        let f = folds(&d, 5, 3).unwrap();
        assert_eq!(f.len(), 5);
        let mut tested: Vec<u64> = f.iter().flat_map(|(_, t)| t.iter().map(|x| x.id)).collect();
        tested.sort();
        let mut all: Vec<u64> = d.iter().map(|x| x.id).collect();
        all.sort();
        assert_eq!(tested, all);
        for (train_part, test_part) in &f {
            assert_eq!(train_part.len() + test_part.len(), 80);
            assert!(test_part.iter().all(|t| train_part.iter().all(|x| x.id != t.id)));
        }
        assert!(matches!(folds(&d, 1, 0), Err(EvalError::BadFolds { .. })));
        assert!(matches!(folds(&d, 81, 0), Err(EvalError::BadFolds { .. })));
    }
}

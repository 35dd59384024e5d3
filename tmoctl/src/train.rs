//! `tmoctl policy train` and `tmoctl policy eval`: the offline trainer and the evaluation of
//! contract policies against the paper's baselines (both in `policy_onnx::train`).
//!
//! `policy train --outcomes DIR` trains on the fleet's collected dataset: its rows become M4A1
//! dialogues through the log export's conversion (keyed by device and dialogue), the trainer runs
//! on them as on `--data`, and the new policy is evaluated off-policy on the logged turns with
//! their propensities (`policy_onnx::train::ope`) before anyone pushes it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::policy::{load_policy, load_profile};
use anyhow::Context;
use clap::Args;
use device_profiles::DeviceProfile;
use fleet_data::LatestRecords;
use indicatif::{ProgressBar, ProgressStyle};
use outcome_log::{ExportSummary, M4a1ExportOptions, UnscoredTurns};
use policy_onnx::m4a1::{self, Dialogue};
use policy_onnx::train::conditions::{Condition, Network};
use policy_onnx::train::eval::{Candidates, Split, evaluate};
use policy_onnx::train::ope::{
    self, LoggedTurn, OpeConfig, OpeEstimate, RewardScale, cross_fitted_rewards, greedy_actions, one_hot,
};
use policy_onnx::train::sim::{self, CostModel, Episode, RewardWeights};
use policy_onnx::train::{Progress, Provenance, TrainConfig, train};
use policy_onnx::{ClassCosts, LoadOptions, ObservationVersion, Policy, Schema};
use serde::Serialize;

/// `--schema` of `tmoctl policy train`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemaArg {
    V1,
    V2,
}

impl From<SchemaArg> for ObservationVersion {
    fn from(s: SchemaArg) -> Self {
        match s {
            SchemaArg::V1 => ObservationVersion::V1,
            SchemaArg::V2 => ObservationVersion::V2,
        }
    }
}

/// Fewest training turns (scored, exported into dialogues) `--outcomes` trains on by default.
pub const MIN_TRAINING_TURNS: usize = 20;

/// Arguments of `tmoctl policy train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training dialogues in the M4A1 format.
    #[arg(long, required_unless_present = "outcomes", conflicts_with = "outcomes")]
    pub data: Option<PathBuf>,
    /// A collected outcome dataset (a directory of `tmoctl fleet collect`, or s3://bucket/prefix)
    /// to train on instead, the latest version of each row; the new policy is then evaluated
    /// off-policy on the logged turns.
    #[arg(long)]
    pub outcomes: Option<String>,
    /// With --outcomes: the policy that logged the turns, evaluated beside the new one.
    #[arg(long, requires = "outcomes")]
    pub logging_policy: Option<PathBuf>,
    /// With --outcomes: the report as JSON on stdout (the training summary goes to stderr).
    #[arg(long, requires = "outcomes")]
    pub json: bool,
    /// With --outcomes: fewest exported training turns to train on.
    #[arg(long, default_value_t = MIN_TRAINING_TURNS)]
    pub min_turns: usize,
    /// With --outcomes: bootstrap resamples of the dialogues for the confidence intervals.
    #[arg(long, default_value_t = OpeConfig::default().bootstrap)]
    pub bootstrap: usize,
    /// With --outcomes: folds of dialogues over which the DR reward model is cross-fitted.
    #[arg(long, default_value_t = 5)]
    pub ope_folds: usize,
    /// Device profile (a TOML file or a built-in name) giving the costs and budgets.
    #[arg(long)]
    pub profile: String,
    /// Where to write the ONNX policy.
    #[arg(long)]
    pub out: PathBuf,
    /// Observation contract: v2 (one policy for every link and board: the observation carries
    /// the live cost table) or v1 (the paper's, for the profile's cost table only).
    #[arg(long, value_enum, default_value_t = SchemaArg::V2)]
    pub schema: SchemaArg,
    /// Seed of the rollouts and of the network's initialisation.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    /// Simulated turns planned to build the regression set [default: 30000 for v2, 12000 for v1].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Regression epochs [default: 150 for v2, 300 for v1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Turns the planner values exactly with the response model (the current one included).
    #[arg(long, default_value_t = TrainConfig::default().planner.lookahead)]
    pub lookahead: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Arguments of `tmoctl policy eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Dialogues the simulator's response model is fitted on (and split by --kfold).
    #[arg(long)]
    pub data: PathBuf,
    /// Dialogues to test on; without it and without --kfold, the test is in-sample.
    #[arg(long, conflicts_with = "kfold")]
    pub test: Option<PathBuf>,
    /// Evaluate by K-fold over --data: each fold is tested with the response model of the others.
    #[arg(long)]
    pub kfold: Option<usize>,
    /// Device profile (a TOML file or a built-in name) giving the costs and budgets.
    #[arg(long)]
    pub profile: String,
    /// Evaluate under this cost table instead of the profile's: a profile TOML file (or built-in
    /// name) whose `[costs]` tables are taken (budgets stay --profile's).
    #[arg(long, conflicts_with = "network")]
    pub costs: Option<String>,
    /// Evaluate under one of the paper's networks: its cloud seconds and prices, the profile's
    /// local class (wired, wifi, 5g, 4g).
    #[arg(long)]
    pub network: Option<String>,
    /// Contract ONNX policies to evaluate, v1 and v2 alike (repeatable).
    #[arg(long = "policy")]
    pub policies: Vec<PathBuf>,
    /// Also retrain this project's trainer (default settings) on every split and evaluate it.
    #[arg(long)]
    pub retrain: bool,
    /// Seed of the fold shuffle and of the random baseline.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn load_dialogues(path: &Path) -> anyhow::Result<(Vec<Dialogue>, String)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading dataset {}", path.display()))?;
    let dialogues = m4a1::parse(&bytes, &path.display().to_string())?;
    Ok((dialogues, m4a1::data_hash(&bytes)))
}

/// Trains, writes and re-loads the policy; prints a summary (and with --outcomes the
/// off-policy evaluation) on stdout.
pub fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    let profile = load_profile(&args.profile)?;
    let (dialogues, data_hash, logged) = match (&args.data, &args.outcomes) {
        (Some(path), None) => {
            let (dialogues, hash) = load_dialogues(path)?;
            (dialogues, hash, None)
        }
        (None, Some(dir)) => {
            let dataset = crate::outcomes::query::load_dataset(dir)?;
            let logged = LoggedOutcomes::from_dataset(&dataset, &profile)?;
            logged.check_trainable(args.min_turns)?;
            (logged.dialogues.clone(), logged.data_hash.clone(), Some(logged))
        }
        _ => anyhow::bail!("give exactly one of --data and --outcomes"),
    };
    let mut config = TrainConfig { seed: args.seed, ..TrainConfig::for_schema(args.schema.into()) };
    config.steps = args.steps.unwrap_or(config.steps);
    config.distill.epochs = args.epochs.unwrap_or(config.distill.epochs);
    config.planner.lookahead = args.lookahead;
    if let Some(logged) = &logged {
        // Each logged turn's cost table is a condition the fleet met: train on (up to 64 of) them.
        let step = logged.conditions.len().div_ceil(64).max(1);
        config.conditions.extra = logged
            .conditions
            .iter()
            .step_by(step)
            .enumerate()
            .map(|(i, classes)| Condition {
                name: format!("logged #{i}"),
                classes: classes.clone(),
                budget_latency_secs: profile.budgets.latency_secs,
                budget_usage_usd: profile.budgets.cost_usd,
            })
            .collect();
    }

    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(config.steps as u64) };
    bar.set_style(
        ProgressStyle::with_template("{msg:>9} [{bar:40}] {pos}/{len} {elapsed_precise}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    bar.set_message("planning");
    let started = Instant::now();
    let trained = train(
        &dialogues,
        Provenance { data_hash: &data_hash, profile: &profile },
        &config,
        &mut |p| match p {
            Progress::Planning { done, total } => {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }
            Progress::Fitting { done, total, mse } => {
                if done == 1 {
                    bar.set_position(0);
                    bar.set_length(total as u64);
                }
                bar.set_message(format!("mse {mse:.4}"));
                bar.set_position(done as u64);
            }
        },
    )
    .context("training")?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();

    let bytes = trained.to_onnx();
    let policy =
        Policy::from_bytes(&bytes, &LoadOptions::default()).context("the trained policy does not load")?;
    std::fs::write(&args.out, &bytes).with_context(|| format!("writing {}", args.out.display()))?;
    let m = &trained.metrics;
    let summary = [
        format!("wrote {} ({} bytes, sha256 {})", args.out.display(), bytes.len(), policy.info().sha256),
        format!(
            "version {}, profile {}, seed {}, data {}",
            policy.info().version(),
            profile.board.name,
            args.seed,
            data_hash
        ),
        format!(
            "{} dialogues, {} turns; {} planned turns, {} distinct observations; {} parameters",
            m.dialogues, m.turns, m.planned_turns, m.distill.samples, m.distill.parameters
        ),
        format!(
            "regression mse {:.5}, arg-max agreement with the planner {:.3}",
            m.distill.mse, m.distill.agreement
        ),
        format!(
            "on the training dialogues: policy mean reward {:.4} ({} over budget), planner {:.4}",
            m.train_mean_reward, m.train_over_budget, m.planner_train_mean_reward
        ),
        format!("training time {:.2} s", elapsed.as_secs_f64()),
    ];
    for line in &summary {
        if args.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    let Some(logged) = logged else { return Ok(()) };
    let logging = args.logging_policy.as_deref().map(load_policy).transpose()?;
    let settings = OpeSettings {
        config: OpeConfig { bootstrap: args.bootstrap, ..OpeConfig::default() },
        folds: args.ope_folds,
    };
    let report = off_policy_report(&logged, &profile, &policy, logging.as_ref(), &settings)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!();
        print!("{}", report.table());
    }
    Ok(())
}

/// A collected dataset turned into training dialogues and off-policy evaluation turns.
#[derive(Debug, Clone)]
pub struct LoggedOutcomes {
    /// The exported M4A1 dialogues (what the trainer trains on).
    pub dialogues: Vec<Dialogue>,
    /// sha256 of the exported M4A1 bytes: the manifest's training data hash.
    pub data_hash: String,
    /// Every scored, valid logged turn (also those after a gap or an unscored turn, which
    /// the training export leaves out: a logged observation stands on its own).
    pub turns: Vec<LoggedTurn>,
    /// The sha256 of the policy that logged each of `turns`.
    pub turn_policies: Vec<String>,
    /// Each exported dialogue's group (the index of its (device, dialogue) key).
    pub dialogue_groups: Vec<usize>,
    pub counts: DatasetCounts,
    /// Logged turns per policy version.
    pub policy_versions: BTreeMap<String, usize>,
    /// The distinct cost tables v2 rows were decided under: v2 training adds them to its
    /// conditions.
    pub conditions: Vec<ClassCosts>,
    schema: Schema,
    costs: CostModel,
    scale: RewardScale,
}

/// What a dataset held and what was used of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DatasetCounts {
    pub rows: usize,
    pub devices: usize,
    pub dialogues: usize,
    /// Stored versions read (rows sent again or rescored are stored again; the latest counts).
    pub versions: u64,
    /// Files set aside (not whole Parquet files of the dataset).
    pub torn_files: usize,
    pub scored_rows: usize,
    /// Rows without a score: left out of training and evaluation.
    pub unscored_rows: usize,
    /// Scored rows whose route the app forced (OpenAI model `tmo-local` / `tmo-cloud`): not
    /// draws of the logging policy, so left out of the off-policy estimates.
    pub forced_rows: usize,
    /// Scored rows that do not fit the profile's contract (observation length, action index)
    /// or fail validation: left out.
    pub invalid_rows: usize,
    /// The M4A1 export the trainer trains on.
    pub export: ExportSummary,
}

impl LoggedOutcomes {
    /// Converts `dataset` for `profile` (its modality count and cost table).
    pub fn from_dataset(dataset: &LatestRecords, profile: &DeviceProfile) -> anyhow::Result<Self> {
        let schema = Schema::new(profile.modality_count(), Schema::default().history());
        let costs = CostModel::new(profile, &schema).context("the profile's cost table")?;
        let scale = RewardScale::new(&costs, RewardWeights::default());
        let options = M4a1ExportOptions {
            modality_names: (0..schema.modalities()).map(|i| format!("m{i}")).collect(),
            unscored: UnscoredTurns::EndDialogue,
        };
        let (values, export) = crate::outcomes::dataset_dialogues(dataset, &options)?;
        let bytes = serde_json::to_vec(&values).context("serialising the exported dialogues")?;
        let dialogues = m4a1::parse(&bytes, "the dataset's M4A1 export")?;

        let mut groups: HashMap<(&str, &str), usize> = HashMap::new();
        let mut devices: HashSet<&str> = HashSet::new();
        let mut counts = DatasetCounts {
            rows: dataset.records.len(),
            versions: dataset.versions,
            torn_files: dataset.torn.len(),
            export,
            ..DatasetCounts::default()
        };
        let mut turns = Vec::new();
        let mut conditions: Vec<ClassCosts> = Vec::new();
        let mut turn_policies = Vec::new();
        let mut policy_versions: BTreeMap<String, usize> = BTreeMap::new();
        for r in &dataset.records {
            let o = &r.outcome;
            devices.insert(&r.device_id);
            let next = groups.len();
            let group = *groups.entry((r.device_id.as_str(), o.dialogue_id.as_str())).or_insert(next);
            let Some(score) = o.score else {
                counts.unscored_rows += 1;
                continue;
            };
            counts.scored_rows += 1;
            if o.forced {
                counts.forced_rows += 1;
                continue;
            }
            let action = o.action_index as usize;
            // v1 rows (27 floats for X = 3) and v2 rows (37, with the cost table of the turn).
            let v2 = schema.to_version(ObservationVersion::V2);
            let width_ok = o.observation.len() == schema.observation_len()
                || o.observation.len() == v2.observation_len();
            if o.validate().is_err() || !width_ok || schema.action(action) != Some(o.action) {
                counts.invalid_rows += 1;
                continue;
            }
            if o.observation.len() == v2.observation_len() {
                let costs = &o.observation[v2.dialogue_len()..];
                let classes = ClassCosts {
                    latency_secs: costs[..v2.cost_classes()].iter().map(|v| f64::from(*v)).collect(),
                    usage_usd: costs[v2.cost_classes()..].iter().map(|v| f64::from(*v)).collect(),
                };
                if !conditions.contains(&classes) {
                    conditions.push(classes);
                }
            }
            turns.push(LoggedTurn {
                group,
                observation: o.observation.clone(),
                action,
                propensity: o.propensity,
                reward: scale.logged_reward(score, &o.answer, o.latency_secs, o.cost_usd),
                latency_secs: o.latency_secs,
                usage_usd: o.cost_usd,
            });
            turn_policies.push(o.policy_sha256.clone());
            *policy_versions.entry(o.policy_version.clone()).or_default() += 1;
        }
        counts.devices = devices.len();
        counts.dialogues = groups.len();
        let dialogue_groups = values
            .iter()
            .map(|v| {
                let device = v["tmo_device_id"].as_str().unwrap_or_default();
                let dialogue = v["tmo_dialogue_id"].as_str().unwrap_or_default();
                groups.get(&(device, dialogue)).copied().context("an exported dialogue without its key")
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(LoggedOutcomes {
            dialogues,
            data_hash: m4a1::data_hash(&bytes),
            turns,
            turn_policies,
            dialogue_groups,
            counts,
            policy_versions,
            conditions,
            schema,
            costs,
            scale,
        })
    }

    /// Fails with the counts when fewer than `min_turns` turns can be trained on.
    pub fn check_trainable(&self, min_turns: usize) -> anyhow::Result<()> {
        let c = &self.counts;
        let needed = min_turns.max(1);
        anyhow::ensure!(
            c.export.turns >= needed,
            "too few scored turns to train: the dataset has {} rows from {} devices ({} files set aside); {} scored, \
             {} without a score, {} invalid for this profile; {} turns in {} dialogues can be trained on \
             (each dialogue from turn 0 up to its first missing or unscored turn; {} turns left out), \
             and training needs at least {needed} (--min-turns)",
            c.rows,
            c.devices,
            c.torn_files,
            c.scored_rows,
            c.unscored_rows,
            c.invalid_rows,
            c.export.turns,
            c.export.dialogues,
            c.export.turns_left_out,
        );
        anyhow::ensure!(
            !self.turns.is_empty(),
            "no scored logged turn fits the profile's contract ({} invalid)",
            c.invalid_rows
        );
        Ok(())
    }
}

/// Settings of the off-policy report.
#[derive(Debug, Clone, Copy)]
pub struct OpeSettings {
    pub config: OpeConfig,
    /// Folds of dialogues for the DR reward model's cross-fitting.
    pub folds: usize,
}

/// What the target distribution is, in words (printed with every report).
pub const TARGET_DISTRIBUTION: &str = "greedy arg-max of the policy's scores (first on ties) under the budget mask \
     rebuilt from each observation's remaining budgets and its own cost table (v2 rows) or the profile's (v1 \
     rows, which a v2 policy also reads with the profile's table); camera and broker availability are not in \
     the observation and are taken as available";

/// One evaluated policy.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyEstimate {
    pub role: &'static str,
    pub version: String,
    pub sha256: String,
    /// Logged turns whose logging policy had this sha256.
    pub logged_turns_by_this_policy: usize,
    pub estimate: OpeEstimate,
}

/// The off-policy evaluation report of `tmoctl policy train --outcomes`.
#[derive(Debug, Clone, Serialize)]
pub struct OpeReport {
    pub dataset: DatasetCounts,
    pub evaluated_turns: usize,
    pub policy_versions: BTreeMap<String, usize>,
    pub target_distribution: &'static str,
    pub reward: &'static str,
    pub reward_model: String,
    pub interval: String,
    pub policies: Vec<PolicyEstimate>,
}

/// Evaluates `new` (and the logging policy, when given) on the logged turns.
pub fn off_policy_report(
    logged: &LoggedOutcomes,
    profile: &DeviceProfile,
    new: &Policy,
    logging: Option<&Policy>,
    settings: &OpeSettings,
) -> anyhow::Result<OpeReport> {
    let episodes: Vec<(usize, Episode)> = logged
        .dialogues
        .iter()
        .zip(&logged.dialogue_groups)
        .map(|(d, &g)| Ok((g, Episode::from_dialogue(d, &logged.schema)?)))
        .collect::<Result<_, sim::SimError>>()
        .context("the exported dialogues as simulator episodes")?;
    let (rewards, cross_fitted) = cross_fitted_rewards(
        &logged.turns,
        &episodes,
        &logged.schema,
        &logged.costs,
        logged.scale,
        settings.folds,
    )
    .context("fitting the DR reward model")?;
    let mut policies = Vec::new();
    for (role, policy) in std::iter::once(("new", new)).chain(logging.map(|p| ("logging", p))) {
        let schema = policy.schema();
        anyhow::ensure!(
            schema.dialogue_len() == logged.schema.dialogue_len()
                && schema.action_count() == logged.schema.action_count(),
            "the {role} policy takes {} observations and has {} actions; the profile's contract has {} and {}",
            schema.observation_len(),
            schema.action_count(),
            logged.schema.to_version(schema.version()).observation_len(),
            logged.schema.action_count()
        );
        let actions = greedy_actions(policy, &logged.turns, Some(&profile.costs))
            .with_context(|| format!("scoring the logged turns with the {role} policy"))?;
        let target = one_hot(&actions, schema.action_count());
        let estimate = ope::estimate(&logged.turns, &target, &rewards, &settings.config)
            .with_context(|| format!("estimating the {role} policy's value"))?;
        let sha256 = policy.info().sha256.clone();
        policies.push(PolicyEstimate {
            role,
            version: policy.info().version(),
            logged_turns_by_this_policy: logged.turn_policies.iter().filter(|s| **s == sha256).count(),
            sha256,
            estimate,
        });
    }
    let c = &settings.config;
    Ok(OpeReport {
        dataset: logged.counts.clone(),
        evaluated_turns: logged.turns.len(),
        policy_versions: logged.policy_versions.clone(),
        target_distribution: TARGET_DISTRIBUTION,
        reward: "the trainer's: score (0 for a refusal) - 1/3 normalised logged latency - 1/3 normalised \
                 logged cost (min-max over the profile's cost classes); association is not logged (0)",
        reward_model: if cross_fitted {
            format!(
                "the trainer's kNN response model + per-class mean logged costs, cross-fitted over {} folds of dialogues",
                settings.folds
            )
        } else {
            "the trainer's kNN response model + per-class mean logged costs, fitted on all dialogues (not cross-fitted)".into()
        },
        interval: format!(
            "{:.0}% percentile bootstrap over dialogues, {} resamples, seed {}",
            c.level * 100.0,
            c.bootstrap,
            c.seed
        ),
        policies,
    })
}

impl OpeReport {
    /// The report as a plain-text table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let d = &self.dataset;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "off-policy evaluation on {} scored logged turns ({} dialogues, {} devices); left out: {} unscored, {} forced, {} invalid rows, {} files set aside",
            self.evaluated_turns,
            d.dialogues,
            d.devices,
            d.unscored_rows,
            d.forced_rows,
            d.invalid_rows,
            d.torn_files
        );
        let versions: Vec<String> = self.policy_versions.iter().map(|(v, n)| format!("{v} ({n})")).collect();
        let _ = writeln!(out, "logged by: {}", versions.join(", "));
        let _ = writeln!(out, "target: {}", self.target_distribution);
        let _ = writeln!(out, "reward: {}", self.reward);
        let _ = writeln!(out, "DR reward model: {}", self.reward_model);
        let _ = writeln!(out, "intervals: {}", self.interval);
        let _ = writeln!(out);
        let ci = |i: &ope::Interval| format!("{:.4} [{:.4}, {:.4}]", i.estimate, i.low, i.high);
        let _ = writeln!(
            out,
            "{:<32} {:>6} {:>8} {:>26} {:>26} {:>26} {:>26}",
            "policy", "agree", "ESS", "IPS", "SNIPS", "DR", "DR - logged"
        );
        if let Some(first) = self.policies.first() {
            let _ = writeln!(
                out,
                "{:<32} {:>6} {:>8} {:>26}",
                "logged (mean reward)",
                "",
                "",
                ci(&first.estimate.logging)
            );
        }
        for p in &self.policies {
            let e = &p.estimate;
            let name = format!("{} {}", p.role, p.version);
            let _ = writeln!(
                out,
                "{:<32} {:>6.3} {:>8.1} {:>26} {:>26} {:>26} {:>26}",
                name,
                e.agreement,
                e.effective_sample_size,
                ci(&e.ips),
                e.snips.as_ref().map_or_else(|| "n/a (never agrees)".into(), ci),
                ci(&e.dr),
                ci(&e.dr_gain)
            );
        }
        for p in &self.policies {
            let _ = writeln!(
                out,
                "{} policy {}: {} logged turns were chosen by it; largest weight {:.1}",
                p.role,
                &p.sha256[..p.sha256.len().min(12)],
                p.logged_turns_by_this_policy,
                p.estimate.max_weight
            );
            let e = &p.estimate;
            if e.effective_sample_size < 0.1 * e.turns as f64 {
                let _ = writeln!(
                    out,
                    "  caution: the {} policy agrees with only {:.0}% of the logged actions (effective sample {:.1} \
                     of {} turns): IPS and SNIPS rest on few turns, DR mostly on its reward model; log with more \
                     exploration to tighten them",
                    p.role,
                    e.agreement * 100.0,
                    e.effective_sample_size,
                    e.turns
                );
            }
        }
        out
    }
}

/// Evaluates and prints the report.
pub fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let (train_set, _) = load_dialogues(&args.data)?;
    let mut profile = load_profile(&args.profile)?;
    if let Some(spec) = &args.costs {
        let table = load_profile(spec)?.costs;
        anyhow::ensure!(
            table.cloud.latency_secs.len() == profile.costs.cloud.latency_secs.len(),
            "--costs {spec} has {} cloud classes, the profile {}",
            table.cloud.latency_secs.len(),
            profile.costs.cloud.latency_secs.len()
        );
        profile.board.name = format!("{} with the costs of {spec}", profile.board.name);
        profile.costs = table;
    }
    if let Some(name) = &args.network {
        let network = Network::from_name(name)
            .with_context(|| format!("--network {name}: expected one of wired, wifi, 5g, 4g"))?;
        profile.board.name = format!("{} on {}", profile.board.name, network.name());
        profile.costs = network.apply(&profile.costs);
    }
    let (test, split) = match (&args.test, args.kfold) {
        (Some(path), _) => (load_dialogues(path)?.0, Split::TestFile),
        (None, Some(k)) => (Vec::new(), Split::KFold { k, seed: args.seed }),
        (None, None) => (Vec::new(), Split::InSample),
    };
    let loaded: Vec<(String, Policy)> = args
        .policies
        .iter()
        .map(|p| {
            let policy = load_policy(p)?;
            let name =
                p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned());
            Ok((name, policy))
        })
        .collect::<anyhow::Result<_>>()?;
    let candidates = Candidates {
        policies: loaded.iter().map(|(n, p)| (n.clone(), p)).collect(),
        retrain: args.retrain.then(TrainConfig::default),
        seed: args.seed,
    };
    let report = evaluate(&train_set, &test, split, &profile, &candidates).context("evaluating")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

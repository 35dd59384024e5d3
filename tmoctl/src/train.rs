//! `tmoctl policy train` and `tmoctl policy eval`: the offline trainer and the evaluation of
//! contract policies against the paper's baselines (both in `policy_onnx::train`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::policy::{load_policy, load_profile};
use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use policy_onnx::m4a1::{self, Dialogue};
use policy_onnx::train::eval::{Candidates, Split, evaluate};
use policy_onnx::train::{Progress, Provenance, TrainConfig, train};
use policy_onnx::{LoadOptions, Policy};

/// Arguments of `tmoctl policy train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training dialogues in the M4A1 format.
    #[arg(long)]
    pub data: PathBuf,
    /// Device profile (a TOML file or a built-in name) giving the costs and budgets.
    #[arg(long)]
    pub profile: String,
    /// Where to write the ONNX policy.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the rollouts and of the network's initialisation.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    /// Simulated turns planned to build the regression set.
    #[arg(long, default_value_t = TrainConfig::default().steps)]
    pub steps: usize,
    /// Regression epochs.
    #[arg(long, default_value_t = TrainConfig::default().distill.epochs)]
    pub epochs: usize,
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
    /// Contract ONNX policies to evaluate (repeatable).
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

/// Trains, writes and re-loads the policy; prints a summary on stdout.
pub fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    let (dialogues, data_hash) = load_dialogues(&args.data)?;
    let profile = load_profile(&args.profile)?;
    let mut config = TrainConfig { seed: args.seed, steps: args.steps, ..TrainConfig::default() };
    config.distill.epochs = args.epochs;
    config.planner.lookahead = args.lookahead;

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
    println!("wrote {} ({} bytes, sha256 {})", args.out.display(), bytes.len(), policy.info().sha256);
    println!(
        "version {}, profile {}, seed {}, data {}",
        policy.info().version(),
        profile.board.name,
        args.seed,
        data_hash
    );
    println!(
        "{} dialogues, {} turns; {} planned turns, {} distinct observations; {} parameters",
        m.dialogues, m.turns, m.planned_turns, m.distill.samples, m.distill.parameters
    );
    println!(
        "regression mse {:.5}, arg-max agreement with the planner {:.3}",
        m.distill.mse, m.distill.agreement
    );
    println!(
        "on the training dialogues: policy mean reward {:.4} ({} over budget), planner {:.4}",
        m.train_mean_reward, m.train_over_budget, m.planner_train_mean_reward
    );
    println!("training time {:.2} s", elapsed.as_secs_f64());
    Ok(())
}

/// Evaluates and prints the report.
pub fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let (train_set, _) = load_dialogues(&args.data)?;
    let profile = load_profile(&args.profile)?;
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

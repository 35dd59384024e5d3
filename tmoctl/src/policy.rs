//! `tmoctl policy ...`: inspect a policy file, run decisions from JSON lines.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use device_profiles::DeviceProfile;
use policy_onnx::decision::choose;
use policy_onnx::train::ope::budget_mask;
use policy_onnx::{Exploration, LoadOptions, Policy};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print a policy's schema, input and output, opset, parameter count and sha256 as JSON.
    Inspect {
        /// The ONNX policy file.
        file: PathBuf,
    },
    /// Read JSON lines `{"obs": [...], "allowed": [...]?}` on stdin, write one decision per line.
    ///
    /// With --profile, cloud actions whose expected latency or cost exceeds the budgets left in
    /// the observation are masked too (a v2 observation's own cost table, else the profile's).
    Decide {
        /// The ONNX policy file.
        file: PathBuf,
        /// A device profile (file or built-in name) whose cost table masks over-budget actions.
        #[arg(long)]
        profile: Option<String>,
    },
    /// Train a policy on M4A1 dialogues for a device profile and write it as contract ONNX.
    Train(crate::train::TrainArgs),
    /// Evaluate contract policies and the paper's baselines (table or JSON; test file or k-fold).
    Eval(crate::train::EvalArgs),
}

pub fn run(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Inspect { file } => inspect(&file),
        PolicyCommand::Decide { file, profile } => {
            let profile = profile.as_deref().map(load_profile).transpose()?;
            let policy = load_policy(&file)?;
            let stdin = std::io::stdin().lock();
            let mut stdout = std::io::stdout().lock();
            decide_lines(&policy, profile.as_ref(), stdin, &mut stdout)
        }
        PolicyCommand::Train(args) => crate::train::run_train(args),
        PolicyCommand::Eval(args) => crate::train::run_eval(args),
    }
}

/// A contract policy file, validated, with the file named in the error.
pub(crate) fn load_policy(file: &Path) -> anyhow::Result<Policy> {
    Policy::from_file(file, &LoadOptions::default())
        .with_context(|| format!("loading policy {}", file.display()))
}

/// A device profile by path or built-in name, named in the error.
pub(crate) fn load_profile(spec: &str) -> anyhow::Result<DeviceProfile> {
    DeviceProfile::load(spec).with_context(|| format!("loading profile {spec}"))
}

fn inspect(file: &Path) -> anyhow::Result<()> {
    let policy = load_policy(file)?;
    println!("{}", serde_json::to_string_pretty(policy.info())?);
    Ok(())
}

#[derive(Debug, Serialize)]
struct DecideReply<'a> {
    action: usize,
    scores: &'a [f32],
    propensity: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideLine {
    obs: Vec<f32>,
    allowed: Option<Vec<bool>>,
}

/// Decides every line of `input`; a line that cannot be decided gets an error line naming its
/// number, and the next line is read.
pub fn decide_lines(
    policy: &Policy,
    profile: Option<&DeviceProfile>,
    input: impl BufRead,
    output: &mut impl Write,
) -> anyhow::Result<()> {
    let schema = policy.schema();
    let mut session = policy.session()?;
    let mut scores = vec![0.0; schema.action_count()];
    let mut budget_mask_flags = vec![true; schema.action_count()];
    // Greedy decisions draw nothing from it; it is there for the signature.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for (index, line) in input.split(b'\n').enumerate() {
        let number = index + 1;
        let line = line.context("reading stdin")?;
        if line.trim_ascii().is_empty() {
            continue;
        }
        let result = (|| -> anyhow::Result<String> {
            let parsed: DecideLine = serde_json::from_slice(&line).context("not a decide line")?;
            session.scores_into(&parsed.obs, &mut scores)?;
            let mut allowed = match parsed.allowed {
                Some(a) if a.len() == schema.action_count() => a,
                Some(a) => anyhow::bail!(
                    "`allowed` has {} flags, the policy has {} actions",
                    a.len(),
                    schema.action_count()
                ),
                None => vec![true; schema.action_count()],
            };
            if let Some(profile) = profile {
                // The budgets left are the v1 part's last two values; a v2 observation's own cost
                // table is what its actions are expected to cost.
                budget_mask(schema, &profile.costs, &parsed.obs, &mut budget_mask_flags);
                allowed.iter_mut().zip(&budget_mask_flags).for_each(|(a, b)| *a &= *b);
            }
            let choice = choose(&scores, &allowed, Exploration::Greedy, &mut rng)?;
            // A typed reply keeps the scores f32, so they print as the shortest f32 text.
            let reply = DecideReply { action: choice.action, scores: &scores, propensity: choice.propensity };
            Ok(serde_json::to_string(&reply)?)
        })();
        let reply = match result {
            Ok(value) => value,
            Err(e) => serde_json::json!({ "line": number, "error": format!("{e:#}") }).to_string(),
        };
        writeln!(output, "{reply}").context("writing stdout")?;
    }
    Ok(())
}

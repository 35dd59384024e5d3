//! `tmoctl outcomes ...`: a device's outcome log, or the fleet's collected dataset, as training data.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use outcome_log::dataset::{Dataset, read_dataset};
use outcome_log::{
    ExportRow, ExportSummary, M4a1ExportOptions, OutcomeLog, UnscoredTurns, group_dialogues, m4a1_dialogues,
};

#[derive(Debug, Subcommand)]
pub enum OutcomesCommand {
    /// Write the dialogues of an outcome log (tmod's SQLite file, --db) or of a collected dataset
    /// (`tmoctl fleet collect`'s directory, --dataset) as training data.
    ///
    /// In a dataset, dialogues are keyed by (device, dialogue id): two devices' dialogue "1" are
    /// two dialogues (the second numbered after the largest id; `tmo_device_id` names the device).
    /// M4A1: the JSON the trainer and the paper's code read. Frames are not kept (image_paths are
    /// the modality names), association scores are 0, a dialogue is written from turn 0 up to its
    /// first missing or unscored turn; each interaction carries a `tmo` object with the logged
    /// propensity, action index, policy version and the rest.
    Export(ExportArgs),
}

/// Options of `tmoctl outcomes export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The outcome log (SQLite file written by tmod); opened read-only.
    #[arg(long, required_unless_present = "dataset", conflicts_with = "dataset")]
    pub db: Option<PathBuf>,
    /// A collected dataset directory (`DIR/<YYYY-MM-DD>/<device_id>.jsonl`).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ExportFormat::M4a1)]
    pub format: ExportFormat,
    /// Output file, written whole or not at all.
    #[arg(long)]
    pub out: PathBuf,
    /// Modality names in modality order (the profile's camera views and audio clip).
    #[arg(long, value_delimiter = ',', default_value = "m0,m1,m2")]
    pub modalities: Vec<String>,
    /// Write turns without a score with score 0 instead of ending their dialogue there.
    #[arg(long)]
    pub unscored_as_zero: bool,
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// M4A1 dialogues (JSON array).
    M4a1,
}

pub fn run(command: OutcomesCommand) -> anyhow::Result<()> {
    match command {
        OutcomesCommand::Export(args) => {
            let summary = export(&args)?;
            eprintln!(
                "wrote {} dialogues ({} turns) to {}; left out {} turns, {} dialogues without their first turn, \
                 {} turns with modalities beyond --modalities",
                summary.dialogues,
                summary.turns,
                args.out.display(),
                summary.turns_left_out,
                summary.dialogues_without_first_turn,
                summary.turns_with_unknown_modalities
            );
            Ok(())
        }
    }
}

/// Runs the export: into `<out>.partial`, synced, then renamed over `out`.
pub fn export(args: &ExportArgs) -> anyhow::Result<ExportSummary> {
    let ExportFormat::M4a1 = args.format;
    anyhow::ensure!(!args.modalities.is_empty(), "--modalities needs at least one name");
    let options = M4a1ExportOptions {
        modality_names: args.modalities.clone(),
        unscored: if args.unscored_as_zero { UnscoredTurns::WriteZero } else { UnscoredTurns::EndDialogue },
    };
    let (dialogues, summary) = match (&args.db, &args.dataset) {
        (Some(db), None) => {
            let log = OutcomeLog::open_read_only(db).with_context(|| format!("opening {}", db.display()))?;
            log.m4a1_dialogues(&options).context("exporting the outcome log")?
        }
        (None, Some(dir)) => {
            let dataset = load_dataset(dir)?;
            dataset_dialogues(&dataset, &options)?
        }
        _ => anyhow::bail!("give exactly one of --db and --dataset"),
    };
    let mut partial = args.out.clone().into_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let result = write_export(&dialogues, &partial).map(|()| summary);
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    let summary = result?;
    std::fs::rename(&partial, &args.out)
        .with_context(|| format!("renaming {} to {}", partial.display(), args.out.display()))?;
    Ok(summary)
}

/// Reads a collected dataset; skipped lines (a torn last line, damage) are reported on stderr.
pub(crate) fn load_dataset(dir: &Path) -> anyhow::Result<Dataset> {
    let dataset = read_dataset(dir).with_context(|| format!("reading the dataset {}", dir.display()))?;
    for skipped in &dataset.skipped_lines {
        eprintln!("skipped {}:{}: {}", skipped.path.display(), skipped.line, skipped.reason);
    }
    Ok(dataset)
}

/// The dataset's dialogues in M4A1, keyed by (device, dialogue id), through the log export's
/// conversion.
pub(crate) fn dataset_dialogues(
    dataset: &Dataset,
    options: &M4a1ExportOptions,
) -> anyhow::Result<(Vec<serde_json::Value>, ExportSummary)> {
    let rows = dataset.records.iter().map(|r| {
        let row = ExportRow { outcome: &r.outcome, row_id: None, received_unix_ms: Some(r.received_unix_ms) };
        (Some(r.device_id.as_str()), row)
    });
    m4a1_dialogues(group_dialogues(rows), options).context("converting the dataset to M4A1")
}

fn write_export(dialogues: &[serde_json::Value], path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    serde_json::to_writer(&mut out, dialogues).with_context(|| format!("writing {}", path.display()))?;
    out.flush().with_context(|| format!("writing {}", path.display()))?;
    out.get_ref().sync_all().with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use outcome_log::{OutcomeLogConfig, ScoreSource};
    use policy_onnx::m4a1;

    /// The training sample, logged as a device would log it, comes out as the same dialogues.
    #[test]
    fn exports_a_log_the_trainer_reads() {
        let train = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/m4a1/m4a1-train.json");
        let dialogues = m4a1::load(&train).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("outcomes.db");
        let mut log = OutcomeLog::open(&db, OutcomeLogConfig::default()).unwrap();
        let schema = policy_onnx::Schema::default();
        for d in dialogues.iter().take(10) {
            let mut history = Vec::new();
            for (t, i) in d.interactions.iter().enumerate() {
                let turn = i.turn();
                let outcome = outcome_log::TurnOutcome {
                    dialogue_id: d.id.to_string(),
                    turn: t as u32,
                    question: i.question.clone(),
                    task: i.task_cat,
                    observation: schema.observation(&history, i.task_cat, 30.0, 0.05),
                    action_index: schema.action_index(turn.action).unwrap() as u32,
                    action: turn.action,
                    propensity: 1.0,
                    policy_version: "test".into(),
                    policy_sha256: "00".repeat(32),
                    latency_secs: i.interaction_time,
                    energy_joules: None,
                    cost_usd: i.usage_cost,
                    prompt_tokens: 10,
                    generated_tokens: 10,
                    answer: i.answer.clone(),
                    score: Some(i.score),
                    score_source: Some(ScoreSource::Judge),
                    telemetry: serde_json::json!({}),
                    route: None,
                    cloud_attempt: None,
                    created_at_ms: 0,
                    text_cut_bytes: 0,
                    forced: false,
                };
                log.append(&outcome).unwrap();
                history.push(turn);
            }
        }
        drop(log);
        let out = dir.path().join("train.json");
        let args = ExportArgs {
            db: Some(db),
            dataset: None,
            format: ExportFormat::M4a1,
            out: out.clone(),
            modalities: vec!["left".into(), "top".into(), "right".into()],
            unscored_as_zero: false,
        };
        let summary = export(&args).unwrap();
        assert_eq!(summary.dialogues, 10);
        let exported = m4a1::load(&out).unwrap();
        assert_eq!(exported.len(), 10);
        for (e, o) in exported.iter().zip(&dialogues) {
            assert_eq!((e.id, e.interactions.len()), (o.id, o.interactions.len()));
            assert_eq!(e.image_paths, ["left", "top", "right"]);
            let actions: Vec<_> = e.interactions.iter().map(m4a1::Interaction::logged_action).collect();
            let expected: Vec<_> = o.interactions.iter().map(m4a1::Interaction::logged_action).collect();
            assert_eq!(actions, expected);
        }
        let missing = ExportArgs { db: Some(dir.path().join("none.db")), ..args };
        let err = format!("{:#}", export(&missing).unwrap_err());
        assert!(err.contains("none.db"), "{err}");
    }
}

//! `tmoctl outcomes ...`: a device's outcome log, or the fleet's collected dataset, as training
//! data; the fleet's report; converting a dataset of earlier collectors to Parquet.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use fleet_data::LatestRecords;
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
    /// What a fleet manager looks at, per policy version and per day, on the latest version of
    /// each row: turns, devices, route mix (local, cloud text only, cloud with attachments),
    /// fallback rate, forced share, mean score, latency and cost percentiles, and the share of
    /// turns that went over the budget the policy saw. A table, JSON (--json), and PNG charts
    /// (--charts DIR: turns, mean score, latency p90, cost per turn, cloud share, fallback rate).
    Report(ReportArgs),
    /// Rewrite each day of a dataset directory that has more than one file as one file of its
    /// rows' latest versions (collectors may go on writing meanwhile; readers that listed a
    /// removed file read again).
    Compact(CompactArgs),
    /// Convert a dataset of earlier collectors (JSON lines, `DIR/<YYYY-MM-DD>/<device>.jsonl`)
    /// into the Parquet dataset (every received version kept, with its time of receipt).
    Convert(ConvertArgs),
}

/// Options of `tmoctl outcomes report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The collected dataset: a directory, or s3://bucket/prefix (credentials, region and
    /// endpoint from AWS_* variables; AWS_ENDPOINT and AWS_ALLOW_HTTP=true for a local store).
    #[arg(long)]
    pub dataset: String,
    /// Print the rows as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Draw the charts as PNG files into this directory.
    #[arg(long)]
    pub charts: Option<PathBuf>,
    /// The charts' TrueType font (default: DejaVu Sans or Liberation Sans where the system keeps
    /// them).
    #[arg(long, requires = "charts")]
    pub font: Option<PathBuf>,
    /// Memory the query engine may hold, MiB; its sorts spill to disk beyond it.
    #[arg(long, default_value_t = 1024)]
    pub memory_mib: usize,
}

/// Options of `tmoctl outcomes compact`.
#[derive(Debug, Args)]
pub struct CompactArgs {
    /// The dataset directory.
    #[arg(long)]
    pub dataset: PathBuf,
}

/// Options of `tmoctl outcomes convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The JSON-lines dataset directory.
    #[arg(long)]
    pub from: PathBuf,
    /// The Parquet dataset directory (created if missing; may already hold a dataset).
    #[arg(long)]
    pub to: PathBuf,
}

/// Options of `tmoctl outcomes export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The outcome log (SQLite file written by tmod); opened read-only.
    #[arg(long, required_unless_present = "dataset", conflicts_with = "dataset")]
    pub db: Option<PathBuf>,
    /// A collected dataset: a directory of `tmoctl fleet collect`, or s3://bucket/prefix.
    #[arg(long)]
    pub dataset: Option<String>,
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
    /// The latest version of every row of a dataset (--dataset) as JSON lines,
    /// `{"device_id", "received_unix_ms", "outcome"}`, in (device, dialogue, turn) order.
    Jsonl,
}

pub fn run(command: OutcomesCommand) -> anyhow::Result<()> {
    match command {
        OutcomesCommand::Export(args) if args.format == ExportFormat::Jsonl => {
            let rows = export_json_lines(&args)?;
            eprintln!("wrote {rows} rows to {}", args.out.display());
            Ok(())
        }
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
        OutcomesCommand::Report(args) => query::report(&args),
        OutcomesCommand::Compact(args) => query::compact(&args),
        OutcomesCommand::Convert(args) => {
            let conversion = fleet_data::convert::convert_json_lines(&args.from, &args.to)?;
            for skipped in &conversion.skipped {
                eprintln!("skipped {}: {}", skipped.path, skipped.reason);
            }
            println!(
                "converted {} records from {} into {} ({} lines skipped)",
                conversion.records,
                args.from.display(),
                args.to.display(),
                conversion.skipped.len()
            );
            Ok(())
        }
    }
}

/// Runs the export: into `<out>.partial`, synced, then renamed over `out`.
pub fn export(args: &ExportArgs) -> anyhow::Result<ExportSummary> {
    anyhow::ensure!(args.format == ExportFormat::M4a1, "this export writes M4A1");
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
        (None, Some(location)) => {
            let dataset = query::load_dataset(location)?;
            dataset_dialogues(&dataset, &options)?
        }
        _ => anyhow::bail!("give exactly one of --db and --dataset"),
    };
    write_whole(&args.out, |out| serde_json::to_writer(out, &dialogues).map_err(Into::into))?;
    Ok(summary)
}

/// Writes the latest version of every row of `--dataset` as JSON lines (into `<out>.partial`,
/// synced, then renamed over `out`); returns the rows written.
fn export_json_lines(args: &ExportArgs) -> anyhow::Result<usize> {
    let Some(location) = &args.dataset else {
        anyhow::bail!("--format jsonl exports a collected dataset: give --dataset");
    };
    let dataset = query::load_dataset(location)?;
    write_whole(&args.out, |out| {
        for record in &dataset.records {
            serde_json::to_writer(&mut *out, record)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })?;
    Ok(dataset.records.len())
}

/// The dataset's dialogues in M4A1, keyed by (device, dialogue id), through the log export's
/// conversion.
pub(crate) fn dataset_dialogues(
    dataset: &LatestRecords,
    options: &M4a1ExportOptions,
) -> anyhow::Result<(Vec<serde_json::Value>, ExportSummary)> {
    let rows = dataset.records.iter().map(|r| {
        let row = ExportRow { outcome: &r.outcome, row_id: None, received_unix_ms: Some(r.received_unix_ms) };
        (Some(r.device_id.as_str()), row)
    });
    m4a1_dialogues(group_dialogues(rows), options).context("converting the dataset to M4A1")
}

/// Writes `path` whole or not at all: into `<path>.partial`, synced, then renamed over it.
fn write_whole(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut partial = path.to_owned().into_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let written = (|| {
        let file =
            std::fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        let mut out = std::io::BufWriter::new(file);
        write(&mut out).with_context(|| format!("writing {}", partial.display()))?;
        out.flush().with_context(|| format!("writing {}", partial.display()))?;
        out.get_ref().sync_all().with_context(|| format!("syncing {}", partial.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written?;
    std::fs::rename(&partial, path)
        .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))
}

/// The dataset read through the query engine (feature `dataset-query`, on by default; builds
/// for boards leave it out: DataFusion is most of a fleet manager's tmoctl).
#[cfg(feature = "dataset-query")]
pub(crate) mod query {
    use anyhow::Context;
    use fleet_data::report::ReportRow;
    use fleet_data::{LatestRecords, OutcomeStore};

    use super::{CompactArgs, ReportArgs};
    use crate::runtime;

    pub(super) fn compact(args: &CompactArgs) -> anyhow::Result<()> {
        let done = runtime()?
            .block_on(fleet_data::compact::compact(&args.dataset))
            .with_context(|| format!("compacting {}", args.dataset.display()))?;
        for day in &done {
            println!(
                "{}: {} files ({} versions) -> {} rows in {}",
                day.day,
                day.files,
                day.versions,
                day.rows,
                day.file.display()
            );
        }
        if done.is_empty() {
            println!("nothing to compact: no day has more than one file");
        }
        Ok(())
    }

    pub(super) fn report(args: &ReportArgs) -> anyhow::Result<()> {
        let rows = runtime()?.block_on(async {
            let store = OutcomeStore::open_with(&args.dataset, args.memory_mib << 20)
                .await
                .with_context(|| format!("opening the dataset {}", args.dataset))?;
            report_torn(&store);
            fleet_data::report::report(&store).await.context("computing the report")
        })?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print!("{}", report_table(&rows));
        }
        if let Some(dir) = &args.charts {
            let font = fleet_data::report::find_font(args.font.as_deref())?;
            let files = fleet_data::report::draw_charts(&rows, dir, &font)?;
            eprintln!(
                "charts: {}",
                files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
            );
        }
        Ok(())
    }

    fn report_torn(store: &OutcomeStore) {
        for torn in store.torn_files() {
            eprintln!("set aside {}: {}", torn.path, torn.reason);
        }
    }

    fn report_table(rows: &[ReportRow]) -> String {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::ASCII_MARKDOWN).set_header([
            "policy",
            "day",
            "turns",
            "devices",
            "local",
            "cloud",
            "+attach",
            "fallback",
            "score",
            "lat p50",
            "lat p90",
            "lat p99",
            "cost p50",
            "cost p90",
            "cost/turn",
            "over budget",
        ]);
        let pct = |v: f64| format!("{:.1}%", v * 100.0);
        for r in rows {
            table.add_row([
                r.policy_version.clone(),
                r.day.clone(),
                r.turns.to_string(),
                r.devices.to_string(),
                pct(r.local_share),
                pct(r.cloud_text_share),
                pct(r.cloud_attach_share),
                pct(r.fallback_rate),
                r.mean_score.map_or("-".into(), |s| format!("{s:.3}")),
                format!("{:.2}s", r.latency_p50_secs),
                format!("{:.2}s", r.latency_p90_secs),
                format!("{:.2}s", r.latency_p99_secs),
                format!("${:.5}", r.cost_p50_usd),
                format!("${:.5}", r.cost_p90_usd),
                format!("${:.5}", if r.turns > 0 { r.cost_total_usd / r.turns as f64 } else { 0.0 }),
                r.budget_exhausted_share.map_or("-".into(), pct),
            ]);
        }
        format!("{table}\n")
    }

    /// The latest version of every row of a collected dataset; files set aside (torn, foreign)
    /// are reported on stderr.
    pub(crate) fn load_dataset(location: &str) -> anyhow::Result<LatestRecords> {
        runtime()?.block_on(async {
            let store = OutcomeStore::open(location)
                .await
                .with_context(|| format!("opening the dataset {location}"))?;
            report_torn(&store);
            store.latest_records().await.with_context(|| format!("reading the dataset {location}"))
        })
    }
}

#[cfg(not(feature = "dataset-query"))]
pub(crate) mod query {
    use fleet_data::LatestRecords;

    use super::{CompactArgs, ReportArgs};

    fn not_built() -> anyhow::Error {
        anyhow::anyhow!("this tmoctl was built without the dataset reader (cargo feature `dataset-query`)")
    }

    pub(super) fn report(_: &ReportArgs) -> anyhow::Result<()> {
        Err(not_built())
    }

    pub(super) fn compact(_: &CompactArgs) -> anyhow::Result<()> {
        Err(not_built())
    }

    pub(crate) fn load_dataset(_: &str) -> anyhow::Result<LatestRecords> {
        Err(not_built())
    }
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

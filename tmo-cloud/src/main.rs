//! `tmo-cloud`: the cloud bridge binary (see the crate documentation and tmo-cloud.toml).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tmo_cloud::config::{Config, ConfigError, REFERENCE_CONFIG};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Exit code for a bad configuration (EX_DATAERR would be 65; sysexits' EX_USAGE is 64).
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "tmo-cloud",
    version,
    about = "The tmo-edge cloud bridge: MQTT cloud requests to an LLM backend"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, env = "TMO_CLOUD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks the configuration (and the API key variable); exits 64 naming the bad field.
    Validate,
    /// Prints the reference configuration.
    PrintConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(Command::PrintConfig) = cli.command {
        print!("{REFERENCE_CONFIG}");
        return ExitCode::SUCCESS;
    }
    let Some(path) = cli.config else {
        eprintln!("tmo-cloud: --config FILE is required");
        return ExitCode::from(EXIT_CONFIG);
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e @ (ConfigError::Parse { .. } | ConfigError::Invalid { .. } | ConfigError::Read { .. })) => {
            eprintln!("tmo-cloud: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::Validate) = cli.command {
        println!("{}: ok (backend model {:?})", path.display(), config.file.backend.model());
        return ExitCode::SUCCESS;
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tmo-cloud: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tmo-cloud")
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(async move {
        let backend = tokio::task::block_in_place(|| tmo_cloud::build_backend(&config.file.backend))
            .context("starting the backend")?;
        let judge =
            tokio::task::block_in_place(|| tmo_cloud::build_judge(&config)).context("starting the judge")?;
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("signal received, stopping");
            signals.cancel();
        });
        tmo_cloud::bridge::run(config, backend, judge, shutdown).await
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

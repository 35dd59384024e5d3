//! `tmod`, the device daemon. Thin main: parse the command line, run the chosen command.

mod api;
mod config;
mod dialogues;
mod estimates;
mod fleet;
mod http;
mod link;
mod local_llm;
mod metrics;
mod openai;
mod policies;
mod policy_store;
mod sense;
mod serve;
mod service;
mod util;

use std::path::PathBuf;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use device_profiles::DeviceProfile;

/// Exit status for a configuration or profile that does not validate (EX_USAGE); systemd's
/// RestartPreventExitStatus names it so a bad file does not loop restarts.
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "tmod", version, about = "The tmo-edge device daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the local API: decide, answer and log every question.
    Run {
        /// The deployment configuration (see `tmod print-config`).
        #[arg(long, env = "TMOD_CONFIG", default_value = "/etc/tmo-edge/tmod.toml")]
        config: PathBuf,
    },
    /// Check a deployment configuration and/or device profiles; exits 64 naming the field
    /// when one is invalid.
    Validate {
        /// Deployment configuration files.
        #[arg(long = "config", num_args = 1.., required_unless_present = "profiles")]
        configs: Vec<PathBuf>,
        /// Profile files or built-in profile names.
        #[arg(long = "profile", num_args = 1..)]
        profiles: Vec<String>,
    },
    /// Print the reference configuration, with every default.
    PrintConfig,
    /// Start sensing and print, once a second, telemetry, each modality's availability and frame
    /// age, and the VAD state.
    Sense {
        /// Profile file or built-in profile name.
        #[arg(long, default_value = "x86-dev")]
        profile: String,
        /// One JSON object per line instead of the compact view.
        #[arg(long)]
        json: bool,
        /// Stop after this many reports (default: run until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
}

fn main() -> ExitCode {
    device_profiles::cpu::exit_unless_supported("tmod");
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run { config } => run(&config),
        Command::Validate { configs, profiles } => validate(&configs, &profiles),
        Command::PrintConfig => {
            print!("{}", config::REFERENCE);
            ExitCode::SUCCESS
        }
        Command::Sense { profile, json, count } => match sense::run(&profile, json, count) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match config::Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    set_thread_count(config.file.model.threads);
    // Fail points named in FAILPOINTS (test builds only: release builds have none compiled in).
    let _fail_points = fail::FailScenario::setup();
    match serve::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The LLM engine sizes its own pool from the configuration, but candle (whose tensor operations
/// the sampler uses) sizes its process-wide pools from `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS` when
/// first used. Setting the environment of a running process is unsound once threads exist, so
/// when the configured count is not already in the environment, tmod executes itself again
/// with it (same process id, as systemd's `Type=notify` expects).
fn set_thread_count(threads: usize) {
    use std::os::unix::process::CommandExt;
    let wanted = threads.to_string();
    let set = |var| std::env::var(var).ok().as_deref() == Some(wanted.as_str());
    if threads == 0 || (set("RAYON_NUM_THREADS") && set("CANDLE_NUM_THREADS")) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("RAYON_NUM_THREADS", &wanted)
        .env("CANDLE_NUM_THREADS", &wanted)
        .exec();
    tracing::warn!("cannot re-execute with {threads} compute threads ({error}); using candle's default");
}

fn validate(configs: &[PathBuf], profiles: &[String]) -> ExitCode {
    let mut status = ExitCode::SUCCESS;
    for path in configs {
        match config::Config::load(path) {
            Ok(c) => println!(
                "ok: {} (profile {}, model {})",
                path.display(),
                c.profile.board.name,
                c.file.model.name
            ),
            Err(e) => {
                eprintln!("error: {e}");
                status = ExitCode::from(EXIT_BAD_CONFIG);
            }
        }
    }
    for spec in profiles {
        match DeviceProfile::load(spec) {
            Ok(p) => println!("ok: {spec} ({}, {} modalities)", p.board.name, p.modality_count()),
            Err(e) => {
                eprintln!("error: {e}");
                status = ExitCode::from(EXIT_BAD_CONFIG);
            }
        }
    }
    status
}

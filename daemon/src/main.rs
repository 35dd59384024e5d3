//! `tmod`, the device daemon. Thin main: parse the command line, run the chosen command.

mod sense;

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
    /// Check device profiles; exits 64 naming the field when one is invalid.
    Validate {
        /// Profile files or built-in profile names.
        #[arg(long = "profile", required = true, num_args = 1..)]
        profiles: Vec<String>,
    },
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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Validate { profiles } => validate(&profiles),
        Command::Sense { profile, json, count } => match sense::run(&profile, json, count) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn validate(profiles: &[String]) -> ExitCode {
    let mut status = ExitCode::SUCCESS;
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

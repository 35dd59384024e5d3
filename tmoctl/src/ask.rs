//! `tmoctl ask` and `tmoctl feedback`: a scripted dialogue with a running tmod over its API, one question per
//! argument (or per line of a file), printing each turn's decision, the answer as it streams,
//! and what the turn cost.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tmod_api::{AskEvent, AskRequest, Client, Endpoint, FeedbackRequest};

#[derive(Debug, Args)]
pub struct AskArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Continue this dialogue (default: start a new one).
    #[arg(long)]
    dialogue: Option<String>,
    /// Questions from this file, one per line (blank lines and `#` comments skipped).
    #[arg(long)]
    script: Option<PathBuf>,
    /// One JSON object per event instead of the readable view.
    #[arg(long)]
    json: bool,
    /// The questions, asked in order in one dialogue.
    questions: Vec<String>,
}

/// Where tmod listens.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// tmod's API socket.
    #[arg(long, default_value = "/run/tmod/api.sock", conflicts_with = "tcp")]
    socket: PathBuf,
    /// tmod's loopback TCP address instead of the socket, e.g. 127.0.0.1:8750.
    #[arg(long)]
    tcp: Option<std::net::SocketAddr>,
}

impl ApiArgs {
    fn client(&self) -> Client {
        let endpoint = match self.tcp {
            Some(addr) => Endpoint::Tcp(addr),
            None => Endpoint::Unix(self.socket.clone()),
        };
        Client::new(endpoint).with_timeout(Duration::from_secs(600))
    }
}

#[derive(Debug, Args)]
pub struct FeedbackArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The dialogue.
    #[arg(long)]
    dialogue: String,
    /// The turn, from 0.
    #[arg(long)]
    turn: u32,
    /// The user's score of the answer, in [0, 1].
    #[arg(long)]
    score: f64,
}

/// `tmoctl feedback`: scores an earlier answer (the outcome log keeps it for retraining).
pub fn feedback(args: FeedbackArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let request = FeedbackRequest { dialogue_id: args.dialogue, turn: args.turn, score: args.score };
    let answer = runtime.block_on(args.api.client().feedback(&request))?;
    println!("{answer}");
    Ok(())
}

pub fn run(args: AskArgs) -> anyhow::Result<()> {
    let mut questions = args.questions.clone();
    if let Some(script) = &args.script {
        let text =
            std::fs::read_to_string(script).with_context(|| format!("cannot read {}", script.display()))?;
        questions.extend(
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned),
        );
    }
    anyhow::ensure!(!questions.is_empty(), "no questions: give them as arguments or with --script");
    let client = args.api.client();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut dialogue = args.dialogue.clone();
        let mut totals = (0.0, 0.0, 0.0);
        for question in &questions {
            if !args.json {
                println!("\n> {question}");
            }
            let request = AskRequest::new(dialogue.as_deref(), question);
            let response = client.ask(&request, |event| print_event(event, args.json)).await?;
            dialogue = Some(response.decision.dialogue_id.clone());
            let o = &response.outcome;
            totals = (totals.0 + o.latency_secs, totals.1 + o.energy_j, totals.2 + o.cost_usd);
        }
        if !args.json {
            println!(
                "\ndialogue {}: {} turns, {:.2} s, {:.1} J, {:.6} USD",
                dialogue.unwrap_or_default(),
                questions.len(),
                totals.0,
                totals.1,
                totals.2
            );
        }
        Ok::<_, anyhow::Error>(())
    })
}

/// ` (cloud: answered by M in W s)` or ` (cloud: timeout after W s)`, from the outcome's record.
fn cloud_attempt_note(attempt: Option<&serde_json::Value>) -> String {
    let Some(a) = attempt else { return String::new() };
    let wait = a["wait_secs"].as_f64().unwrap_or(0.0);
    match (a["outcome"].as_str(), a["model"].as_str()) {
        (Some("answered"), Some(model)) => format!(" (answered by {model} in {wait:.2} s)"),
        (Some(outcome), _) => format!(" (cloud: {outcome} after {wait:.2} s)"),
        (None, _) => String::new(),
    }
}

fn print_event(event: &AskEvent, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let value = match event {
            AskEvent::Decision(d) => serde_json::json!({ "decision": d }),
            AskEvent::Token(t) => serde_json::json!({ "token": t }),
            AskEvent::Outcome(o) => serde_json::json!({ "outcome": o }),
            AskEvent::Error(e) => serde_json::json!({ "error": e }),
        };
        let _ = writeln!(out, "{value}");
        return;
    }
    let _ = match event {
        AskEvent::Decision(d) => {
            let modalities = if d.modalities.is_empty() {
                String::new()
            } else {
                format!(" + {}", d.modalities.join(", "))
            };
            write!(
                out,
                "  [turn {} | task {} | {}{} (action {}, p = {:.2}) | route {} | policy {}]\n  ",
                d.turn, d.task, d.action, modalities, d.action_index, d.propensity, d.route, d.policy_version
            )
        }
        AskEvent::Token(piece) => write!(out, "{piece}"),
        AskEvent::Outcome(o) => writeln!(
            out,
            "\n  [{}{} | {:.2} s (first token {:.2} s, {:.1} tok/s) | {:.1} J {} | {:.7} USD | budget left {:.1} s, {:.4} USD | overhead {:.1} ms]",
            o.route,
            cloud_attempt_note(o.cloud_attempt.as_ref()),
            o.latency_secs,
            o.time_to_first_token_secs,
            o.decode_tokens_per_sec,
            o.energy_j,
            o.energy_source,
            o.cost_usd,
            o.budget_left.latency_secs,
            o.budget_left.cost_usd,
            o.timings.overhead_ms(),
        ),
        AskEvent::Error(e) => writeln!(out, "\n  error: {e}"),
    };
    let _ = out.flush();
}

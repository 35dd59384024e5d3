//! `tmoctl chat`: talk to the local model in a terminal, answers streamed.

use std::io::{BufRead, Write};

use anyhow::Context;
use clap::Args;
use llm_engine::{Conversation, Engine, EngineConfig, GenerationParams, resolve_model};

/// Options of `tmoctl chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Model name (installed by `tmoctl model fetch`) or path to a GGUF file.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// System message.
    #[arg(long, default_value = "You are a helpful kitchen assistant. Answer briefly.")]
    pub system: String,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass (with a temperature).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Repeat penalty (1.0 = none).
    #[arg(long, default_value_t = 1.1)]
    pub repeat_penalty: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
}

/// Runs the interactive chat until end of input or `/quit`; `/reset` starts a new dialogue.
pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let path = resolve_model(&args.model).context("resolving the model")?;
    let mut engine = Engine::load(&path, &EngineConfig::default())
        .with_context(|| format!("loading {}", path.display()))?;
    let info = engine.info();
    eprintln!(
        "{} ({:?}, {:?} template) loaded in {:.2} s. /reset starts over, /quit or Ctrl-D ends.",
        info.name.as_deref().unwrap_or("model"),
        info.architecture,
        info.template,
        info.load_time.as_secs_f64()
    );
    let params = GenerationParams {
        max_tokens: args.max_tokens,
        temperature: Some(args.temperature),
        top_p: args.top_p,
        seed: args.seed,
        repeat_penalty: args.repeat_penalty,
        ..GenerationParams::default()
    };
    let mut conversation = Conversation::new(Some(&args.system));
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut line = String::new();
    loop {
        print!("> ");
        stdout.flush().context("writing to the terminal")?;
        line.clear();
        if stdin.lock().read_line(&mut line).context("reading input")? == 0 {
            println!();
            return Ok(());
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/quit" => return Ok(()),
            "/reset" => {
                conversation = Conversation::new(Some(&args.system));
                engine.clear_cache();
                println!("(new dialogue)");
                continue;
            }
            _ => {}
        }
        let generation = conversation
            .send(&mut engine, text, &params, None, &mut |piece| {
                print!("{piece}");
                let _ = std::io::stdout().flush();
            })
            .context("generating")?;
        println!();
        let r = &generation.report;
        eprintln!(
            "[{} prompt tokens ({} from cache), {} generated, first token {:.0} ms, {:.1} tokens/s, {:?}]",
            r.prompt_tokens,
            r.reused_prompt_tokens,
            r.generated_tokens,
            r.time_to_first_token.as_secs_f64() * 1e3,
            r.decode_tokens_per_sec,
            r.finish
        );
    }
}

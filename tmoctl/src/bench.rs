//! `tmoctl bench llm`: load time, resident memory, time to first token and decode speed of
//! the local model, plus the prompt work a multi-turn dialogue saves with its KV cache.

use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use llm_engine::{Conversation, Engine, EngineConfig, GenerationParams, resolve_model};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The local LLM: load, memory, time to first token, decode tokens/s, multi-turn reuse.
    Llm(LlmBenchArgs),
}

/// Options of `tmoctl bench llm`.
#[derive(Debug, Args)]
pub struct LlmBenchArgs {
    /// Model name (installed by `tmoctl model fetch`) or path to a GGUF file.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Compute threads of the engine (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 200)]
    pub prompt_tokens: usize,
    /// Tokens to generate (end-of-turn tokens ignored).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Measured runs (the best and the median are printed).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Turns of the multi-turn dialogue measurement (0 skips it).
    #[arg(long, default_value_t = 4)]
    pub dialogue_turns: usize,
}

const PROMPT_TEXT: &str = "In a busy kitchen the cook keeps the knives sharp, the boards clean \
and the stock simmering slowly on the back burner. Onions are sliced thin and softened in butter \
until golden, garlic is added at the end so it does not burn, and a splash of white wine lifts \
the fond from the bottom of the pan. ";

/// Runs a benchmark.
pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Llm(args) => llm(args),
    }
}

fn resident_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn llm(args: LlmBenchArgs) -> anyhow::Result<()> {
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    if args.runs == 0 || args.gen_tokens == 0 || args.prompt_tokens == 0 {
        bail!("--runs, --gen-tokens and --prompt-tokens must be at least 1");
    }
    let path = resolve_model(&args.model).context("resolving the model")?;
    let rss_before = resident_kib()?;
    let started = Instant::now();
    let config = EngineConfig { threads: args.threads, ..EngineConfig::default() };
    let mut engine = Engine::load(&path, &config).with_context(|| format!("loading {}", path.display()))?;
    let load_secs = started.elapsed().as_secs_f64();
    let rss_after = resident_kib()?;
    let info = engine.info().clone();
    let file_mib = info.file_bytes as f64 / (1024.0 * 1024.0);
    println!("model        {} ({:?})", path.display(), info.architecture);
    println!("threads      {}", engine.threads());
    println!("kernels      {}", llm_engine::kernel_level());
    for w in &info.weight_types {
        println!(
            "  {:<6} {:>4} tensors {:>9.1} MiB  {}",
            w.dtype,
            w.tensors,
            w.bytes as f64 / (1024.0 * 1024.0),
            w.kernel
        );
    }
    println!("load         {load_secs:.3} s");
    println!(
        "resident     {:.1} MiB after load ({:.1} MiB before), file {:.1} MiB, ratio {:.2}",
        rss_after as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        file_mib,
        rss_after as f64 / 1024.0 / file_mib
    );

    let mut prompt = Vec::new();
    while prompt.len() < args.prompt_tokens {
        prompt.extend(engine.encode(PROMPT_TEXT).context("tokenizing the prompt")?);
    }
    prompt.truncate(args.prompt_tokens);
    let params = GenerationParams { ignore_end_of_turn: true, ..GenerationParams::greedy(args.gen_tokens) };
    let mut ttft_ms = Vec::new();
    let mut decode = Vec::new();
    for run in 0..=args.runs {
        engine.clear_cache();
        let generation = engine.generate(&prompt, &params, None, &mut |_| {}).context("generating")?;
        let r = generation.report;
        if run == 0 {
            continue; // warm-up
        }
        println!(
            "run {run}        prompt {} tokens, first token {:.1} ms, {} generated at {:.1} tokens/s, wall {:.2} s",
            r.prompt_tokens,
            r.time_to_first_token.as_secs_f64() * 1e3,
            r.generated_tokens,
            r.decode_tokens_per_sec,
            r.wall_time.as_secs_f64()
        );
        ttft_ms.push(r.time_to_first_token.as_secs_f64() * 1e3);
        decode.push(r.decode_tokens_per_sec);
    }
    let best_ttft = ttft_ms.iter().copied().fold(f64::INFINITY, f64::min);
    let best_decode = decode.iter().copied().fold(0.0, f64::max);
    println!(
        "first token  {best_ttft:.1} ms best, {:.1} ms median ({} prompt tokens)",
        median(&mut ttft_ms),
        args.prompt_tokens
    );
    println!(
        "decode       {best_decode:.1} tokens/s best, {:.1} median ({} tokens)",
        median(&mut decode),
        args.gen_tokens
    );
    // The weights are used in place from the mapped file: after the runs every page of them
    // has been read, so this is the resident size of the loaded model in use.
    let rss_used = resident_kib()? as f64 / 1024.0;
    println!("resident     {rss_used:.1} MiB after the runs, ratio {:.2} to the file", rss_used / file_mib);
    if args.dialogue_turns > 0 {
        dialogue(&mut engine, args.dialogue_turns)?;
    }
    Ok(())
}

/// A dialogue with the KV cache kept between turns, against re-reading the whole history.
fn dialogue(engine: &mut Engine, turns: usize) -> anyhow::Result<()> {
    let questions = [
        "How long should I boil an egg for a soft yolk?",
        "And for a hard yolk?",
        "How do I stop the shell from cracking?",
        "What can I cook with the leftover eggs?",
        "How long do boiled eggs keep in the fridge?",
        "Can I freeze them?",
    ];
    let params = GenerationParams::greedy(48);
    let mut conversation = Conversation::new(Some("You are a helpful kitchen assistant. Answer briefly."));
    let (mut cached_prompt, mut fresh_prompt) = (0usize, 0usize);
    let (mut cached_secs, mut fresh_secs) = (0f64, 0f64);
    for (turn, question) in questions.iter().cycle().take(turns).enumerate() {
        let full = conversation.prompt_for(engine, question).context("building the turn's prompt")?;
        let cached =
            conversation.send(engine, question, &params, None, &mut |_| {}).context("dialogue turn")?;
        // The same turn re-reading the whole history, as without a kept cache.
        engine.clear_cache();
        let fresh = engine.generate(&full, &params, None, &mut |_| {}).context("fresh turn")?;
        // The fresh run left the same tokens in the cache when it gave the same answer;
        // otherwise put the dialogue back in the cache for the next turn.
        let restore: Vec<u32> = conversation.tokens().to_vec();
        if !restore.starts_with(engine.cached_tokens()) && restore.len() > 1 {
            engine.clear_cache();
            engine
                .generate(&restore[..restore.len() - 1], &GenerationParams::greedy(1), None, &mut |_| {})
                .context("restoring the dialogue cache")?;
        }
        let (c, f) = (&cached.report, &fresh.report);
        println!(
            "turn {}       history {} tokens: kept cache processed {} in {:.1} ms, re-reading processed {} in {:.1} ms{}",
            turn + 1,
            c.prompt_tokens,
            c.processed_prompt_tokens,
            c.prompt_time.as_secs_f64() * 1e3,
            f.processed_prompt_tokens,
            f.prompt_time.as_secs_f64() * 1e3,
            if cached.tokens == fresh.tokens { ", same answer" } else { ", answers differ" }
        );
        cached_prompt += c.processed_prompt_tokens;
        fresh_prompt += f.processed_prompt_tokens;
        cached_secs += c.prompt_time.as_secs_f64();
        fresh_secs += f.prompt_time.as_secs_f64();
    }
    println!(
        "dialogue     {turns} turns: {cached_prompt} prompt tokens processed with the kept cache vs {fresh_prompt} re-reading ({:.1} ms vs {:.1} ms of prompt time)",
        cached_secs * 1e3,
        fresh_secs * 1e3
    );
    Ok(())
}

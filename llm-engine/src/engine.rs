//! The engine: a loaded model, its tokenizer and chat template, and the generation loop.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokenizers::Tokenizer;

use crate::decoder::Decoder;
use crate::error::{EngineError, Result};
use crate::gguf::{Architecture, MappedGguf};
use crate::template::{ChatMessage, ChatTemplate};
use crate::tokenizer::{TextStream, encode, load_tokenizer};

/// How the engine is set up.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// Compute threads of the engine's own pool; `None`: one per CPU this process may use.
    pub threads: Option<usize>,
    /// Cap on the context length in tokens (prompt plus answer); `None` keeps the model's
    /// (at most 4096).
    pub max_context_tokens: Option<usize>,
}

/// How to pick tokens and when to stop.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Sampling temperature; `None` or `<= 0` means greedy (arg-max).
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, used with a temperature.
    pub top_p: Option<f64>,
    /// Seed of the sampler.
    pub seed: u64,
    /// Penalty on logits of tokens seen recently (1.0 = none).
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    /// Stop once this instant has passed (checked before every forward pass).
    pub deadline: Option<Instant>,
    /// Keep generating past end-of-turn tokens (for benchmarks that need a fixed length).
    pub ignore_end_of_turn: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: None,
            top_p: None,
            seed: 299_792_458,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            deadline: None,
            ignore_end_of_turn: false,
        }
    }
}

impl GenerationParams {
    /// Greedy decoding of at most `max_tokens` tokens, no repeat penalty.
    pub fn greedy(max_tokens: usize) -> Self {
        Self { max_tokens, repeat_penalty: 1.0, ..Self::default() }
    }

    fn sampling(&self) -> Result<Sampling> {
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(EngineError::InvalidParams(format!("top_p {p} not in (0, 1]")));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(EngineError::InvalidParams(format!(
                "repeat_penalty {} must be positive",
                self.repeat_penalty
            )));
        }
        Ok(match (self.temperature, self.top_p) {
            (Some(t), _) if !t.is_finite() => {
                return Err(EngineError::InvalidParams(format!("temperature {t}")));
            }
            (None, _) => Sampling::ArgMax,
            (Some(t), _) if t <= 0.0 => Sampling::ArgMax,
            (Some(temperature), Some(p)) => Sampling::TopP { p, temperature },
            (Some(temperature), None) => Sampling::All { temperature },
        })
    }
}

/// Why a generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn.
    EndOfTurn,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The deadline passed.
    Deadline,
    /// The caller set the cancellation flag.
    Cancelled,
    /// The context is full.
    ContextFull,
}

/// The figures of one generation call.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationReport {
    /// Tokens in the prompt (the whole dialogue so far).
    pub prompt_tokens: usize,
    /// Prompt tokens found in the KV cache from the previous call and not recomputed.
    pub reused_prompt_tokens: usize,
    /// Prompt tokens run through the model in this call.
    pub processed_prompt_tokens: usize,
    /// Tokens generated (the end-of-turn token not counted).
    pub generated_tokens: usize,
    /// From the call to the first generated token (includes the prompt pass).
    pub time_to_first_token: Duration,
    /// Time of the prompt pass alone.
    pub prompt_time: Duration,
    /// Generated tokens per second after the first one (0 when fewer than 2).
    pub decode_tokens_per_sec: f64,
    /// Whole call.
    pub wall_time: Duration,
    /// Why it stopped.
    pub finish: FinishReason,
}

/// The answer of one generation call.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The answer's text.
    pub text: String,
    /// The answer's tokens (the end-of-turn token not included).
    pub tokens: Vec<u32>,
    /// The figures.
    pub report: GenerationReport,
}

/// What the engine knows about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The architecture.
    pub architecture: Architecture,
    /// `general.name` from the metadata, if any.
    pub name: Option<String>,
    /// The chat template in use.
    pub template: ChatTemplate,
    /// Context length used (tokens).
    pub context_len: usize,
    /// Size of the GGUF file in bytes.
    pub file_bytes: u64,
    /// Time to load the model.
    pub load_time: Duration,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// The file's tensors by weight type, and the product each type runs.
    pub weight_types: Vec<WeightType>,
}

/// The tensors of one weight type in a model file.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightType {
    /// The GGUF type (`Q4K`, `Q6K`, `F32`, ...).
    pub dtype: String,
    /// How many tensors have it.
    pub tensors: usize,
    /// Their bytes in the file.
    pub bytes: u64,
    /// The product they run ([`crate::kernel_for`]).
    pub kernel: &'static str,
}

/// A loaded model ready to generate. `Send`: the daemon keeps it on a dedicated thread.
#[derive(Debug)]
pub struct Engine {
    decoder: Decoder,
    tokenizer: Tokenizer,
    info: ModelInfo,
    stop_tokens: Vec<u32>,
    /// Tokens whose keys and values are in the model's KV cache, in order.
    cached: Vec<u32>,
    threads: usize,
}

const MAX_CONTEXT: usize = 4096;

impl Engine {
    /// Loads a GGUF model (memory-mapped while loading) with its tokenizer and chat template.
    pub fn load(path: &Path, config: &EngineConfig) -> Result<Self> {
        let started = Instant::now();
        let gguf = MappedGguf::open(path)?;
        let tokenizer = load_tokenizer(path, &gguf.content)?;
        let template =
            ChatTemplate::detect(gguf.architecture, gguf.metadata_str("tokenizer.chat_template"), |t| {
                tokenizer.token_to_id(t).is_some()
            });
        let prefix = gguf.architecture.key_prefix();
        let model_context =
            gguf.metadata_u32(&format!("{prefix}.context_length")).map(|n| n as usize).unwrap_or(MAX_CONTEXT);
        let context_len = model_context.min(MAX_CONTEXT).min(config.max_context_tokens.unwrap_or(usize::MAX));
        let name = gguf.metadata_str("general.name").map(str::to_string);
        let architecture = gguf.architecture;
        let file_bytes = gguf.file_bytes;
        let threads = config
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get));
        let MappedGguf { content, map, .. } = gguf;
        let mut weight_types: Vec<WeightType> = Vec::new();
        for info in content.tensor_infos.values() {
            let dtype = format!("{:?}", info.ggml_dtype);
            let elements = info.shape.elem_count() as u64;
            let bytes = elements / info.ggml_dtype.block_size() as u64 * info.ggml_dtype.type_size() as u64;
            match weight_types.iter_mut().find(|w| w.dtype == dtype) {
                Some(w) => {
                    w.tensors += 1;
                    w.bytes += bytes;
                }
                None => weight_types.push(WeightType {
                    dtype,
                    tensors: 1,
                    bytes,
                    kernel: crate::kernels::kernel_for(info.ggml_dtype),
                }),
            }
        }
        weight_types.sort_by_key(|w| std::cmp::Reverse(w.bytes));
        let decoder = Decoder::new(architecture, &content, map, threads)?;
        let mut stop_tokens: Vec<u32> =
            template.end_of_turn_tokens().iter().filter_map(|t| tokenizer.token_to_id(t)).collect();
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        if stop_tokens.is_empty() {
            return Err(EngineError::Tokenizer(format!(
                "none of the end-of-turn tokens {:?} is in the vocabulary",
                template.end_of_turn_tokens()
            )));
        }
        let info = ModelInfo {
            architecture,
            name,
            template,
            context_len,
            file_bytes,
            load_time: started.elapsed(),
            vocab_size: tokenizer.get_vocab_size(true),
            weight_types,
        };
        if decoder.spec().vocab < info.vocab_size {
            return Err(EngineError::Tokenizer(format!(
                "the tokenizer has {} tokens but the model's embedding table {}",
                info.vocab_size,
                decoder.spec().vocab
            )));
        }
        release_freed_memory();
        tracing::info!(
            architecture = ?info.architecture,
            template = ?info.template,
            load_ms = info.load_time.as_millis() as u64,
            "model loaded"
        );
        Ok(Self { decoder, tokenizer, info, stop_tokens, cached: Vec::new(), threads })
    }

    /// The compute threads of the engine's pool.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// What was loaded.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokens whose KV entries the model holds now.
    pub fn cached_tokens(&self) -> &[u32] {
        &self.cached
    }

    /// Forgets the KV cache: the next call processes its whole prompt.
    pub fn clear_cache(&mut self) {
        self.cached.clear();
    }

    /// Encodes text as tokens (special-token markers in the text are recognised; no BOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        encode(&self.tokenizer, text)
    }

    /// Renders a whole dialogue with the family's template.
    pub fn render(&self, messages: &[ChatMessage]) -> String {
        self.info.template.render(messages)
    }

    /// Answers the last user message of `messages`, streaming text pieces to `on_text`.
    /// The KV cache is reused when the previous call's tokens are a prefix of this prompt.
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        params: &GenerationParams,
        cancel: Option<&AtomicBool>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let prompt = self.encode(&self.render(messages))?;
        self.generate(&prompt, params, cancel, on_text)
    }

    /// Generates after the prompt tokens `prompt`, streaming text pieces to `on_text`.
    /// Only the part of `prompt` beyond the tokens already in the KV cache is processed.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerationParams,
        cancel: Option<&AtomicBool>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let started = Instant::now();
        if prompt.is_empty() {
            return Err(EngineError::InvalidParams("empty prompt".into()));
        }
        if params.max_tokens == 0 {
            return Err(EngineError::InvalidParams("max_tokens must be at least 1".into()));
        }
        let context_len = self.info.context_len;
        if prompt.len() + 1 > context_len {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: prompt.len(),
                max_tokens: params.max_tokens,
                context_len,
            });
        }
        let sampling = params.sampling()?;
        let greedy = matches!(sampling, Sampling::ArgMax);
        let mut sampler = LogitsProcessor::from_sampling(params.seed, sampling);
        // The KV cache holds the longest common prefix; at least one prompt token is run.
        let reused = self.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        let is_stopped = |now: Instant| -> Option<FinishReason> {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                Some(FinishReason::Cancelled)
            } else if params.deadline.is_some_and(|d| now >= d) {
                Some(FinishReason::Deadline)
            } else {
                None
            }
        };
        let mut report = GenerationReport {
            prompt_tokens: prompt.len(),
            reused_prompt_tokens: reused,
            processed_prompt_tokens: 0,
            generated_tokens: 0,
            time_to_first_token: Duration::ZERO,
            prompt_time: Duration::ZERO,
            decode_tokens_per_sec: 0.0,
            wall_time: Duration::ZERO,
            finish: FinishReason::EndOfTurn,
        };
        if let Some(reason) = is_stopped(Instant::now()) {
            report.finish = reason;
            report.wall_time = started.elapsed();
            return Ok(Generation { text: String::new(), tokens: Vec::new(), report });
        }
        self.cached.truncate(reused);
        let mut logits = match self.forward(&prompt[reused..], reused) {
            Ok(logits) => logits,
            Err(e) => {
                self.cached.clear();
                return Err(e);
            }
        };
        self.cached.extend_from_slice(&prompt[reused..]);
        report.processed_prompt_tokens = prompt.len() - reused;
        report.prompt_time = started.elapsed();

        let mut stream = TextStream::default();
        let mut generated: Vec<u32> = Vec::new();
        let mut first_token_at: Option<Instant> = None;
        loop {
            if params.repeat_penalty != 1.0 {
                let window_start = self.cached.len().saturating_sub(params.repeat_last_n);
                apply_repeat_penalty(&mut logits, params.repeat_penalty, &self.cached[window_start..]);
            }
            let next = if greedy {
                arg_max(&logits)
            } else {
                sampler.sample(&Tensor::from_slice(&logits, logits.len(), &Device::Cpu)?)?
            };
            let now = Instant::now();
            if first_token_at.is_none() {
                first_token_at = Some(now);
                report.time_to_first_token = now - started;
            }
            if !params.ignore_end_of_turn && self.stop_tokens.contains(&next) {
                report.finish = FinishReason::EndOfTurn;
                break;
            }
            generated.push(next);
            if let Some(piece) = stream.push(&self.tokenizer, next)? {
                on_text(&piece);
            }
            if generated.len() >= params.max_tokens {
                report.finish = FinishReason::MaxTokens;
                break;
            }
            if self.cached.len() + 1 >= context_len {
                report.finish = FinishReason::ContextFull;
                break;
            }
            if let Some(reason) = is_stopped(Instant::now()) {
                report.finish = reason;
                break;
            }
            match self.forward(&[next], self.cached.len()) {
                Ok(l) => {
                    logits = l;
                    self.cached.push(next);
                }
                Err(e) => {
                    self.cached.clear();
                    return Err(e);
                }
            }
        }
        let end = Instant::now();
        report.generated_tokens = generated.len();
        if let Some(first) = first_token_at
            && generated.len() > 1
        {
            let secs = (end - first).as_secs_f64();
            if secs > 0.0 {
                report.decode_tokens_per_sec = (generated.len() - 1) as f64 / secs;
            }
        }
        report.wall_time = end - started;
        Ok(Generation { text: stream.text(&self.tokenizer)?, tokens: generated, report })
    }

    fn forward(&mut self, tokens: &[u32], position: usize) -> Result<Vec<f32>> {
        self.decoder.forward(tokens, position)
    }
}

/// Loading parses the whole vocabulary (strings, scores, merges derived for SentencePiece
/// models) and drops most of it again; glibc keeps such freed memory in the process. Handing it
/// back keeps the resident size close to the mapped weights (Gemma 3's 262k-token vocabulary:
/// tens of MB).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Divides positive logits and multiplies negative ones of the tokens in `recent` by
/// `penalty` (once per distinct token), as candle-transformers and llama.cpp do.
fn apply_repeat_penalty(logits: &mut [f32], penalty: f32, recent: &[u32]) {
    let mut seen = std::collections::HashSet::with_capacity(recent.len());
    for &token in recent {
        if let Some(logit) = logits.get_mut(token as usize)
            && seen.insert(token)
        {
            *logit = if *logit >= 0.0 { *logit / penalty } else { *logit * penalty };
        }
    }
}

/// The index of the largest logit (the first one on ties).
fn arg_max(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A multi-turn dialogue whose tokens stay in the engine's KV cache between turns: each turn
/// feeds only its own tokens (as long as no other dialogue used the engine in between).
#[derive(Debug, Clone)]
pub struct Conversation {
    system: Option<String>,
    tokens: Vec<u32>,
    messages: Vec<ChatMessage>,
    /// Turns answered elsewhere (the cloud) since the last local turn: not in `tokens` yet,
    /// rendered into the prompt of the next local turn.
    elsewhere: Vec<(String, String)>,
}

impl Conversation {
    /// A new dialogue with an optional system message.
    pub fn new(system: Option<&str>) -> Self {
        Self {
            system: system.map(str::to_string),
            tokens: Vec::new(),
            messages: system.map(ChatMessage::system).into_iter().collect(),
            elsewhere: Vec::new(),
        }
    }

    /// Records a turn answered elsewhere (by the cloud). Its tokens join the prompt of the next
    /// local turn, so the local model keeps the whole dialogue without generating this answer.
    pub fn add_answered_turn(&mut self, user: impl Into<String>, assistant: impl Into<String>) {
        let (user, assistant) = (user.into(), assistant.into());
        self.messages.push(ChatMessage::user(user.clone()));
        self.messages.push(ChatMessage::assistant(assistant.clone()));
        self.elsewhere.push((user, assistant));
    }

    /// The dialogue so far as (question, answer) pairs, oldest first.
    pub fn exchanges(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut said = self.messages.iter().filter(|m| m.role != crate::template::Role::System);
        std::iter::from_fn(move || {
            let user = said.next()?;
            let assistant = said.next()?;
            Some((user.content.as_str(), assistant.content.as_str()))
        })
    }

    /// The dialogue's tokens so far (every turn, closed).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The dialogue's messages so far.
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// The prompt tokens the next turn with `user` text would run on (history + new turn).
    pub fn prompt_for(&self, engine: &Engine, user: &str) -> Result<Vec<u32>> {
        let template = engine.info.template;
        let mut text = String::new();
        let first = self.tokens.is_empty();
        if first {
            text.push_str(template.dialogue_start());
            if let Some(system) = &self.system
                && !template.folds_system()
            {
                text.push_str(&template.system_turn(system));
            }
        }
        let mut first = first;
        for (asked, answered) in &self.elsewhere {
            let folded = if first && template.folds_system() { self.system.as_deref() } else { None };
            text.push_str(&template.user_turn(asked, folded));
            text.push_str(answered);
            text.push_str(template.assistant_end());
            first = false;
        }
        let folded = if first && template.folds_system() { self.system.as_deref() } else { None };
        text.push_str(&template.user_turn(user, folded));
        let mut prompt = self.tokens.clone();
        prompt.extend(engine.encode(&text)?);
        Ok(prompt)
    }

    /// Asks `user`, streams the answer, and appends both to the dialogue.
    pub fn send(
        &mut self,
        engine: &mut Engine,
        user: &str,
        params: &GenerationParams,
        cancel: Option<&AtomicBool>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let prompt = self.prompt_for(engine, user)?;
        let generation = engine.generate(&prompt, params, cancel, on_text)?;
        let closing = engine.encode(engine.info.template.assistant_end())?;
        self.tokens = prompt;
        self.tokens.extend_from_slice(&generation.tokens);
        self.tokens.extend(closing);
        self.elsewhere.clear();
        self.messages.push(ChatMessage::user(user));
        self.messages.push(ChatMessage::assistant(generation.text.clone()));
        Ok(generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Engine>();
        assert_send::<Conversation>();
    }

    #[test]
    fn sampling_choices() {
        assert!(matches!(GenerationParams::greedy(4).sampling(), Ok(Sampling::ArgMax)));
        let params =
            GenerationParams { temperature: Some(0.7), top_p: Some(0.9), ..GenerationParams::default() };
        assert!(matches!(params.sampling(), Ok(Sampling::TopP { .. })));
        let bad =
            GenerationParams { temperature: Some(0.7), top_p: Some(1.5), ..GenerationParams::default() };
        assert!(matches!(bad.sampling(), Err(EngineError::InvalidParams(_))));
    }
}

//! The engine: a loaded model, its tokenizer and chat template, and the generation loop.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::io::Cursor;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::{quantized_gemma3, quantized_llama, quantized_qwen2};
use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};
use crate::gguf::{Architecture, MappedGguf};
use crate::template::{ChatMessage, ChatTemplate};
use crate::tokenizer::{TextStream, encode, load_tokenizer};

/// How the engine is set up.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// Compute threads. candle's pool is process-wide and sized from `CANDLE_NUM_THREADS`
    /// when first used: `Some(n)` is checked against it (see [`effective_threads`]).
    pub threads: Option<usize>,
    /// Cap on the context length in tokens (prompt plus answer); `None` keeps the model's
    /// (at most 4096).
    pub max_context_tokens: Option<usize>,
    /// Re-quantize Q4_1 weights at load into a format with SIMD kernels in candle (its Q4_1
    /// dot product is scalar). `None` keeps the file's formats.
    pub requantize_q4_1: Option<FastFormat>,
}

/// Weight formats with SIMD dot products in candle's CPU backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastFormat {
    /// 8-bit, blocks of 32: nearly lossless from Q4_1, about 1.7x its size.
    Q8_0,
    /// 4-bit symmetric, blocks of 32: Q4_1's size, but adds rounding error.
    Q4_0,
}

impl FastFormat {
    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
        }
    }
}

/// Rewrites a GGUF in memory with its Q4_1 tensors re-quantized to `format`.
fn requantize_q4_1(content: &gguf_file::Content, bytes: &[u8], format: FastFormat) -> Result<Vec<u8>> {
    let target = format.ggml();
    let mut reader = Cursor::new(bytes);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let tensor = content.tensor(&mut reader, name, &Device::Cpu)?;
        let row = tensor.shape().dims().last().copied().unwrap_or(0);
        let tensor = if tensor.dtype() == GgmlDType::Q4_1 && row % target.block_size() == 0 {
            QTensor::quantize(&tensor.dequantize(&Device::Cpu)?, target)?
        } else {
            tensor
        };
        tensors.push((name.as_str(), tensor));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> =
        content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = Cursor::new(Vec::with_capacity(bytes.len() * 2));
    gguf_file::write(&mut out, &metadata, &tensor_refs)?;
    Ok(out.into_inner())
}

/// The thread count candle's CPU kernels use in this process (`CANDLE_NUM_THREADS`, else
/// `RAYON_NUM_THREADS`, else the CPUs this process may run on).
pub fn effective_threads() -> usize {
    std::env::var("CANDLE_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(candle_core::utils::get_num_threads)
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
}

enum Weights {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
    Gemma3(quantized_gemma3::ModelWeights),
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Llama(_) => "Weights::Llama",
            Self::Qwen2(_) => "Weights::Qwen2",
            Self::Gemma3(_) => "Weights::Gemma3",
        })
    }
}

impl Weights {
    fn forward(&mut self, input: &Tensor, index_pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Self::Llama(m) => m.forward(input, index_pos),
            Self::Qwen2(m) => m.forward(input, index_pos),
            Self::Gemma3(m) => m.forward(input, index_pos),
        }
    }

    /// candle's Gemma 3 masks out the cached positions when several tokens are fed at a
    /// non-zero position, so it must be fed one token at a time there.
    fn multi_token_after_cache(&self) -> bool {
        !matches!(self, Self::Gemma3(_))
    }
}

/// A loaded model ready to generate. `Send`: the daemon keeps it on a dedicated thread.
#[derive(Debug)]
pub struct Engine {
    weights: Weights,
    tokenizer: Tokenizer,
    info: ModelInfo,
    stop_tokens: Vec<u32>,
    /// Tokens whose keys and values are in the model's KV cache, in order.
    cached: Vec<u32>,
    device: Device,
}

const MAX_CONTEXT: usize = 4096;

impl Engine {
    /// Loads a GGUF model (memory-mapped while loading) with its tokenizer and chat template.
    pub fn load(path: &Path, config: &EngineConfig) -> Result<Self> {
        let started = Instant::now();
        if let Some(configured) = config.threads {
            let effective = effective_threads();
            if configured != effective {
                return Err(EngineError::ThreadCount { configured, effective });
            }
        }
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
        let device = Device::Cpu;
        let MappedGguf { content, map, .. } = gguf;
        let rewritten;
        let (content, bytes): (gguf_file::Content, &[u8]) = match config.requantize_q4_1 {
            Some(format) if content.tensor_infos.values().any(|t| t.ggml_dtype == GgmlDType::Q4_1) => {
                rewritten = requantize_q4_1(&content, &map[..], format)?;
                let parsed = gguf_file::Content::read(&mut Cursor::new(&rewritten[..]))?;
                (parsed, &rewritten[..])
            }
            _ => (content, &map[..]),
        };
        let mut reader = Cursor::new(bytes);
        let weights = match architecture {
            Architecture::Llama => {
                Weights::Llama(quantized_llama::ModelWeights::from_gguf(content, &mut reader, &device)?)
            }
            Architecture::Qwen2 => {
                Weights::Qwen2(quantized_qwen2::ModelWeights::from_gguf(content, &mut reader, &device)?)
            }
            Architecture::Gemma3 => {
                Weights::Gemma3(quantized_gemma3::ModelWeights::from_gguf(content, &mut reader, &device)?)
            }
        };
        drop(map);
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
        };
        tracing::info!(
            architecture = ?info.architecture,
            template = ?info.template,
            load_ms = info.load_time.as_millis() as u64,
            "model loaded"
        );
        Ok(Self { weights, tokenizer, info, stop_tokens, cached: Vec::new(), device })
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
        let mut sampler = LogitsProcessor::from_sampling(params.seed, params.sampling()?);
        let reused = if !self.cached.is_empty()
            && self.cached.len() < prompt.len()
            && prompt.starts_with(&self.cached)
        {
            self.cached.len()
        } else {
            0
        };
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
        let mut logits = match self.prompt_pass(&prompt[reused..], reused) {
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
                logits = candle_transformers::utils::apply_repeat_penalty(
                    &logits,
                    params.repeat_penalty,
                    &self.cached[window_start..],
                )?;
            }
            let next = sampler.sample(&logits)?;
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

    fn prompt_pass(&mut self, tokens: &[u32], position: usize) -> Result<Tensor> {
        if position == 0 || self.weights.multi_token_after_cache() {
            return self.forward(tokens, position);
        }
        let mut logits = None;
        for (offset, token) in tokens.iter().enumerate() {
            logits = Some(self.forward(&[*token], position + offset)?);
        }
        logits.ok_or_else(|| EngineError::InvalidParams("empty prompt".into()))
    }

    fn forward(&mut self, tokens: &[u32], position: usize) -> Result<Tensor> {
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = self.weights.forward(&input, position)?;
        Ok(logits.squeeze(0)?.to_dtype(candle_core::DType::F32)?)
    }
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
    fn requantize_turns_q4_1_into_q8_0_with_close_values() {
        let values: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let tensor = Tensor::from_vec(values, (4, 64), &Device::Cpu).expect("tensor");
        let q4_1 = QTensor::quantize(&tensor, GgmlDType::Q4_1).expect("quantize");
        let name = gguf_file::Value::String("llama".into());
        let mut file = Cursor::new(Vec::new());
        gguf_file::write(&mut file, &[("general.architecture", &name)], &[("w", &q4_1)]).expect("write");
        let bytes = file.into_inner();
        let content = gguf_file::Content::read(&mut Cursor::new(&bytes[..])).expect("read");
        let rewritten = requantize_q4_1(&content, &bytes, FastFormat::Q8_0).expect("requantize");
        let mut reader = Cursor::new(&rewritten[..]);
        let content = gguf_file::Content::read(&mut reader).expect("read rewritten");
        let q8 = content.tensor(&mut reader, "w", &Device::Cpu).expect("tensor");
        assert_eq!(q8.dtype(), GgmlDType::Q8_0);
        let before: Vec<f32> = q4_1
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values");
        let after: Vec<f32> = q8
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values");
        let worst = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 0.01, "largest difference {worst}");
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

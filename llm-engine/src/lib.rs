//! Local LLM engine: quantized GGUF chat models on the CPU, streamed through a callback.
//!
//! Synchronous and runtime-free: the daemon runs an [`Engine`] on a dedicated thread.
//! [`resolve_model`] turns a model name (installed by `tmoctl model fetch`) or a path into a
//! GGUF file; [`Engine::load`] maps it and picks the architecture (llama, qwen2, gemma3),
//! tokenizer and chat template from its metadata; [`Engine::chat`] and [`Conversation::send`]
//! generate, reusing the KV cache of the dialogue so far.

mod decoder;
pub mod dense;
mod engine;
mod error;
mod gguf;
mod kernels;
mod pool;
pub mod registry;
mod template;
mod tokenizer;

pub use dense::{DenseInput, Q8Linear};
pub use engine::{
    Conversation, Engine, EngineConfig, FinishReason, Generation, GenerationParams, GenerationReport,
    ModelInfo, WeightType,
};
pub use error::{EngineError, Result};
pub use gguf::Architecture;
pub use kernels::{kernel_for, kernel_level};
pub use registry::{KnownModel, default_model_dir, fetch_model, resolve_model, resolve_model_in};
pub use template::{ChatMessage, ChatTemplate, Role};

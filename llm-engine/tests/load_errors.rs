//! Bad model files get typed errors, never a panic.

use std::io::Write;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use llm_engine::{Engine, EngineConfig, EngineError, resolve_model};

fn load(path: &std::path::Path) -> EngineError {
    Engine::load(path, &EngineConfig::default()).expect_err("must not load")
}

#[test]
fn text_file_is_not_gguf() {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(b"{\"not\": \"a model\"}").expect("write");
    assert!(matches!(load(file.path()), EngineError::NotGguf { .. }));
}

#[test]
fn empty_file_is_truncated() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    assert!(matches!(load(file.path()), EngineError::Truncated { .. }));
}

#[test]
fn unsupported_architecture_is_named() {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    let arch = gguf_file::Value::String("rwkv".into());
    let tensor = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).expect("tensor");
    let tensor = QTensor::quantize(&tensor, GgmlDType::Q8_0).expect("quantize");
    gguf_file::write(
        file.as_file_mut(),
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &tensor)],
    )
    .expect("write gguf");
    match load(file.path()) {
        EngineError::UnsupportedArchitecture { architecture } => assert_eq!(architecture, "rwkv"),
        other => panic!("expected UnsupportedArchitecture, got {other}"),
    }
}

#[test]
fn truncated_model_is_detected() {
    let source = match resolve_model("smollm2-135m") {
        Ok(path) => path,
        Err(e) => panic!(
            "the SmolLM2-135M test model is needed: {e}\n\
             install it with `cargo run -p tmoctl -- model fetch smollm2-135m`"
        ),
    };
    let bytes = std::fs::read(&source).expect("read model");
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(&bytes[..bytes.len() / 2]).expect("write half");
    match load(file.path()) {
        EngineError::Truncated { detail, .. } => assert!(detail.contains("tensor"), "{detail}"),
        other => panic!("expected Truncated, got {other}"),
    }
}

/// Found by fuzzing (fuzz target `gguf_load`): a `block_count` of 2^28 + 1 made the decoder
/// reserve its layer table first, an allocation of 140 GB that aborted the process. Now the
/// first missing layer tensor is the error.
#[test]
fn huge_block_count_is_an_error_not_an_abort() {
    use gguf_file::Value;
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    let strings = |items: &[&str]| Value::Array(items.iter().map(|s| Value::String((*s).into())).collect());
    let tokens = ["<|im_start|>", "<|im_end|>", "H", "e", "l", "o", "He"];
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(8)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.block_count", Value::U32((1 << 28) + 1)),
        ("llama.feed_forward_length", Value::U32(16)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.merges", strings(&["H e"])),
    ];
    let f32_tensor = |shape: &[usize]| {
        let t = Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).expect("tensor");
        QTensor::quantize(&t, GgmlDType::F32).expect("tensor")
    };
    let embeddings = f32_tensor(&[tokens.len(), 8]);
    let norm = f32_tensor(&[8]);
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(
        file.as_file_mut(),
        &metadata,
        &[("token_embd.weight", &embeddings), ("output_norm.weight", &norm)],
    )
    .expect("write gguf");
    match load(file.path()) {
        EngineError::Metadata { key, .. } => assert_eq!(key, "blk.0.attn_norm.weight"),
        other => panic!("expected the first layer's missing tensor, got {other}"),
    }
}

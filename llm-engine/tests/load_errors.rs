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

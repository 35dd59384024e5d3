//! GGUF loading: `Engine::load` of a file holding the input (header parsing by candle with the
//! engine's checks of tensor extents and architecture, the tokenizer from the metadata, the
//! chat template, the decoder's tensors). The engine takes a path (the weights are mapped), so
//! the input is written to a file on tmpfs first.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llm_engine::{Engine, EngineConfig};

fn model_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| tmo_edge_fuzz::scratch_dir("gguf").join("model.gguf"))
}

fuzz_target!(
    init: {
        // MappedGguf::open catches panics of candle's GGUF reader (an alignment of 0 divides
        // by zero): an error for tmod, not a crash.
        tmo_edge_fuzz::let_caught_panics_unwind(&["candle-core-"]);
    },
    |bytes: &[u8]| {
        let path = model_path();
        std::fs::write(path, bytes).expect("writing the model file");
        let config = EngineConfig { threads: Some(1), max_context_tokens: Some(64) };
        if let Ok(engine) = Engine::load(path, &config) {
            let _ = engine.encode("Hello <|im_end|> world");
        }
    }
);

//! Real generation with Gemma 3 270M Q4_K_M (install it with
//! `tmoctl model fetch gemma3-270m`; `TMO_MODEL_DIR` selects the model directory).

use llm_engine::{
    Architecture, ChatTemplate, Conversation, Engine, EngineConfig, FinishReason, GenerationParams,
    resolve_model,
};

fn engine() -> Engine {
    let path = match resolve_model("gemma3-270m") {
        Ok(path) => path,
        Err(e) => panic!(
            "the Gemma 3 270M test model is needed: {e}\n\
             install it with `cargo run -p tmoctl -- model fetch gemma3-270m`"
        ),
    };
    Engine::load(&path, &EngineConfig::default()).expect("Gemma 3 loads")
}

#[test]
fn gemma3_answers_and_reuses_its_cache() {
    let mut engine = engine();
    assert_eq!(engine.info().architecture, Architecture::Gemma3);
    assert_eq!(engine.info().template, ChatTemplate::Gemma);
    // The SentencePiece tokenizer built from the metadata round-trips text.
    let text = "Preheat the oven to 180 degrees.";
    let tokens = engine.encode(text).expect("encodes");
    assert!(tokens.len() < text.len() / 2, "{tokens:?}");
    let decoded = engine.tokenizer().decode(&tokens, true).expect("decodes");
    assert_eq!(decoded, text);

    let params = GenerationParams::greedy(24);
    let mut conversation = Conversation::new(Some("You are a helpful kitchen assistant."));
    let turn1 = conversation
        .send(&mut engine, "Name one herb that goes well with tomatoes.", &params, None, &mut |_| {})
        .expect("turn 1");
    assert!(!turn1.text.trim().is_empty());
    assert!(matches!(turn1.report.finish, FinishReason::EndOfTurn | FinishReason::MaxTokens));
    // This is the pretrained (not instruction-tuned) 270M model: it echoes the turn. llama.cpp
    // gives the same greedy answer on the same file (llama-cpp-python 0.3, temperature 0):
    // "You are a helpful kitchen assistant.\n\nName one herb that goes well with tomatoes.
    // mendatang\nYou are a helpful kitchen".
    let llama_cpp_start =
        "You are a helpful kitchen assistant.\n\nName one herb that goes well with tomatoes.";
    assert!(turn1.text.starts_with(llama_cpp_start), "{:?} is not llama.cpp's answer", turn1.text);
    let turn2 = conversation.send(&mut engine, "And one spice?", &params, None, &mut |_| {}).expect("turn 2");
    assert!(!turn2.text.trim().is_empty());
    assert!(turn2.report.reused_prompt_tokens > 0, "{:?}", turn2.report);
    assert!(turn2.report.processed_prompt_tokens < turn2.report.prompt_tokens / 2);
}

/// Token ids that llama.cpp (llama-cpp-python 0.3, `tokenize(..., special=True)`) gives for
/// the same Gemma turn.
#[test]
fn gemma3_tokenization_equals_llama_cpp() {
    let engine = engine();
    let text = "<start_of_turn>user\nBake 250 g of flour at 180°C for 12-15 minutes, then cool.<end_of_turn>\n\
                <start_of_turn>model\n";
    let llama_cpp = [
        105, 2364, 107, 236799, 873, 236743, 236778, 236810, 236771, 549, 529, 18763, 657, 236743, 236770,
        236828, 236771, 237366, 236780, 573, 236743, 236770, 236778, 236772, 236770, 236810, 4310, 236764,
        1299, 5427, 236761, 106, 107, 105, 4368, 107,
    ];
    assert_eq!(engine.encode(text).expect("encodes"), llama_cpp);
}

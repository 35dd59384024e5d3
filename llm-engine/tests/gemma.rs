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
    let turn2 = conversation.send(&mut engine, "And one spice?", &params, None, &mut |_| {}).expect("turn 2");
    assert!(!turn2.text.trim().is_empty());
    assert!(turn2.report.reused_prompt_tokens > 0, "{:?}", turn2.report);
    assert!(turn2.report.processed_prompt_tokens < turn2.report.prompt_tokens / 2);
}

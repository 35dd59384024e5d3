//! Real generation with SmolLM2-135M-Instruct Q4_1 (install it with
//! `tmoctl model fetch smollm2-135m`; `TMO_MODEL_DIR` selects the model directory).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use llm_engine::{
    ChatMessage, Conversation, Engine, EngineConfig, FinishReason, GenerationParams, resolve_model,
};

const SYSTEM: &str = "You are a helpful kitchen assistant. Answer in one short sentence.";
const QUESTION: &str = "How do I keep cut apples from turning brown?";
/// llama.cpp's greedy answer to QUESTION on the same file starts so (llama-cpp-python 0.3,
/// temperature 0, no repeat penalty).
const LLAMA_CPP_START: &str = "To keep apples from turning brown, you can use";

fn engine() -> Engine {
    let path = match resolve_model("smollm2-135m") {
        Ok(path) => path,
        Err(e) => panic!(
            "the SmolLM2-135M test model is needed: {e}\n\
             install it with `cargo run -p tmoctl -- model fetch smollm2-135m` \
             (or set TMO_MODEL_DIR to a directory holding SmolLM2-135M-Instruct.Q4_1.gguf)"
        ),
    };
    Engine::load(&path, &EngineConfig::default()).expect("SmolLM2 loads")
}

fn kitchen_question() -> Vec<ChatMessage> {
    vec![ChatMessage::system(SYSTEM), ChatMessage::user(QUESTION)]
}

#[test]
fn greedy_answer_is_deterministic_and_ends_its_turn() {
    let mut engine = engine();
    let info = engine.info().clone();
    assert_eq!(info.architecture, llm_engine::Architecture::Llama);
    assert_eq!(info.template, llm_engine::ChatTemplate::ChatMl);
    let params = GenerationParams::greedy(64);
    let mut streamed = String::new();
    let first = engine
        .chat(&kitchen_question(), &params, None, &mut |piece| streamed.push_str(piece))
        .expect("generates");
    assert!(!first.text.trim().is_empty(), "empty answer");
    assert!(first.text.starts_with(LLAMA_CPP_START), "{:?} is not llama.cpp's answer", first.text);
    assert_eq!(streamed, first.text, "streamed pieces add up to the answer");
    assert_eq!(first.report.finish, FinishReason::EndOfTurn, "{first:?}");
    assert!(first.report.generated_tokens < 64);
    assert_eq!(first.report.generated_tokens, first.tokens.len());
    assert!(!first.text.contains("<|im_end|>"));
    assert!(first.report.time_to_first_token <= first.report.wall_time);
    assert_eq!(first.report.processed_prompt_tokens, first.report.prompt_tokens);

    let second = engine.chat(&kitchen_question(), &params, None, &mut |_| {}).expect("generates again");
    assert_eq!(first.tokens, second.tokens, "greedy decoding is deterministic");
    assert_eq!(first.text, second.text);
}

#[test]
fn max_tokens_is_respected() {
    let mut engine = engine();
    let generation =
        engine.chat(&kitchen_question(), &GenerationParams::greedy(5), None, &mut |_| {}).expect("generates");
    assert_eq!(generation.report.generated_tokens, 5);
    assert_eq!(generation.report.finish, FinishReason::MaxTokens);
}

#[test]
fn deadline_stops_generation() {
    let mut engine = engine();
    let story = vec![
        ChatMessage::system("You are a storyteller."),
        ChatMessage::user("Tell me a very long story about a chef who cooks for a whole city."),
    ];
    let passed = GenerationParams { deadline: Some(Instant::now()), ..GenerationParams::greedy(500) };
    let generation = engine.chat(&story, &passed, None, &mut |_| {}).expect("returns");
    assert_eq!(generation.report.finish, FinishReason::Deadline);
    assert_eq!(generation.report.generated_tokens, 0);

    let soon = GenerationParams {
        deadline: Some(Instant::now() + Duration::from_millis(800)),
        ..GenerationParams::greedy(3000)
    };
    let generation = engine.chat(&story, &soon, None, &mut |_| {}).expect("returns");
    assert_eq!(generation.report.finish, FinishReason::Deadline, "{:?}", generation.report);
    assert!(generation.report.generated_tokens < 3000);
}

#[test]
fn cancellation_stops_generation() {
    let mut engine = engine();
    let cancel = AtomicBool::new(false);
    let mut pieces = 0;
    let generation = engine
        .chat(&kitchen_question(), &GenerationParams::greedy(64), Some(&cancel), &mut |_| {
            pieces += 1;
            if pieces == 3 {
                cancel.store(true, Ordering::Relaxed);
            }
        })
        .expect("returns");
    assert_eq!(generation.report.finish, FinishReason::Cancelled);
    assert!(generation.report.generated_tokens <= 4, "{:?}", generation.report);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let mut engine = engine();
    let params = GenerationParams {
        temperature: Some(0.8),
        top_p: Some(0.9),
        seed: 42,
        max_tokens: 24,
        ..GenerationParams::default()
    };
    let a = engine.chat(&kitchen_question(), &params, None, &mut |_| {}).expect("generates");
    let b = engine.chat(&kitchen_question(), &params, None, &mut |_| {}).expect("generates");
    assert!(!a.tokens.is_empty());
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
}

#[test]
fn conversation_reuses_the_cache_and_matches_a_fresh_run() {
    let mut engine = engine();
    let params = GenerationParams::greedy(32);
    let mut conversation = Conversation::new(Some(SYSTEM));
    let turn1 = conversation.send(&mut engine, QUESTION, &params, None, &mut |_| {}).expect("turn 1");
    assert!(!turn1.text.trim().is_empty());
    assert_eq!(turn1.report.reused_prompt_tokens, 0);

    let follow_up = "Should I start with cold water?";
    let full_prompt = conversation.prompt_for(&engine, follow_up).expect("prompt for turn 2");
    let turn2 = conversation.send(&mut engine, follow_up, &params, None, &mut |_| {}).expect("turn 2");
    assert_eq!(turn2.report.prompt_tokens, full_prompt.len());
    assert!(turn2.report.reused_prompt_tokens > 0, "{:?}", turn2.report);
    assert!(
        turn2.report.processed_prompt_tokens < full_prompt.len() / 2,
        "turn 2 processed {} of {} prompt tokens",
        turn2.report.processed_prompt_tokens,
        full_prompt.len()
    );
    assert_eq!(turn2.report.processed_prompt_tokens + turn2.report.reused_prompt_tokens, full_prompt.len());

    engine.clear_cache();
    let fresh = engine.generate(&full_prompt, &params, None, &mut |_| {}).expect("fresh run");
    assert_eq!(fresh.report.processed_prompt_tokens, full_prompt.len());
    // The keys and values of turn 1's answer come from the one-token decode kernels in the
    // kept cache and from the batched prompt kernels in the fresh run: the logits differ in
    // the last bits, so long answers may drift apart; this answer must agree.
    assert_eq!(fresh.tokens, turn2.tokens, "cached: {:?}\nfresh: {:?}", turn2.text, fresh.text);
    assert_eq!(conversation.messages().len(), 5);
}

#[test]
fn prompt_pass_over_a_cached_prefix_equals_a_fresh_prompt_pass() {
    let mut engine = engine();
    let messages = vec![
        ChatMessage::system(SYSTEM),
        ChatMessage::user(QUESTION),
        ChatMessage::assistant("About six minutes."),
        ChatMessage::user("And for a hard yolk?"),
    ];
    let prompt = engine.encode(&engine.render(&messages)).expect("tokenizes");
    let params = GenerationParams::greedy(24);
    let fresh = engine.generate(&prompt, &params, None, &mut |_| {}).expect("fresh");
    // Put the first part of the prompt in the cache, then ask for the whole prompt.
    engine.clear_cache();
    let split = prompt.len() - 12;
    engine.generate(&prompt[..split], &GenerationParams::greedy(1), None, &mut |_| {}).expect("prefix");
    assert_eq!(engine.cached_tokens(), &prompt[..split]);
    let reused = engine.generate(&prompt, &params, None, &mut |_| {}).expect("with cached prefix");
    assert_eq!(reused.report.reused_prompt_tokens, split);
    assert_eq!(reused.report.processed_prompt_tokens, 12);
    assert_eq!(reused.tokens, fresh.tokens);
    assert!(!fresh.text.trim().is_empty());
}

#[test]
fn a_turn_answered_elsewhere_joins_the_next_local_prompt() {
    let mut engine = engine();
    let params = GenerationParams::greedy(16);
    let cloud_answer = "Seven minutes in simmering water, then into ice water.";
    let follow_up = "And for a hard yolk?";

    // The same dialogue, once with turn 1 answered by the cloud, once rendered whole.
    let mut conversation = Conversation::new(Some(SYSTEM));
    conversation.add_answered_turn(QUESTION, cloud_answer);
    let prompt = conversation.prompt_for(&engine, follow_up).expect("prompt");
    let whole = engine.render(&[
        ChatMessage::system(SYSTEM),
        ChatMessage::user(QUESTION),
        ChatMessage::assistant(cloud_answer),
        ChatMessage::user(follow_up),
    ]);
    assert_eq!(prompt, engine.encode(&whole).expect("encode"), "{whole}");
    let pairs: Vec<_> = conversation.exchanges().collect();
    assert_eq!(pairs, [(QUESTION, cloud_answer)]);

    let turn2 = conversation.send(&mut engine, follow_up, &params, None, &mut |_| {}).expect("turn 2");
    assert_eq!(turn2.report.prompt_tokens, prompt.len());
    assert_eq!(conversation.exchanges().count(), 2);
    // The answered turn is now part of the cached tokens: the next prompt starts with them.
    let next = conversation.prompt_for(&engine, "Thanks!").expect("prompt 3");
    assert!(next.starts_with(&prompt));
}

/// Token ids that llama.cpp (llama-cpp-python 0.3, `tokenize(..., special=True)`) gives for
/// the same text: special tokens, a segment right after one (no space added), digits one by
/// one, a degree sign.
#[test]
fn tokenization_equals_llama_cpp() {
    let engine = engine();
    let text = "<|im_start|>user\nBake 250 g of flour at 180°C for 12-15 minutes, then cool.<|im_end|>\n\
                <|im_start|>assistant\n";
    let llama_cpp = [
        1, 4093, 198, 50, 575, 216, 34, 37, 32, 310, 282, 7367, 418, 216, 33, 40, 32, 4742, 51, 327, 216, 33,
        34, 29, 33, 37, 3487, 28, 965, 3122, 30, 2, 198, 1, 520, 9531, 198,
    ];
    assert_eq!(engine.encode(text).expect("encodes"), llama_cpp);
}

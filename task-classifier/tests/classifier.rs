//! The task classifier with the real all-MiniLM-L6-v2 (install it with
//! `tmoctl model fetch all-minilm-l6-v2`; `TMO_MODEL_DIR` selects the model directory) and the
//! real M4A1 training questions.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use policy_onnx::TaskCategory;
use task_classifier::train::{
    FoldBy, SUPPLEMENTARY_QUESTIONS, TrainParams, embed_questions, fold_assignments, labeled_questions,
    supplementary_questions, train_head,
};
use task_classifier::{ClassifierError, DEFAULT_HEAD, Embedder, Head, TaskClassifier};

fn model_dir() -> PathBuf {
    match llm_engine::resolve_model("all-minilm-l6-v2") {
        Ok(path) => path,
        Err(e) => panic!(
            "the all-MiniLM-L6-v2 model is needed: {e}\n\
             install it with `tmoctl model fetch all-minilm-l6-v2` \
             (or set TMO_MODEL_DIR to a directory holding all-minilm-l6-v2/)"
        ),
    }
}

fn data_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/m4a1/m4a1-train.json")
}

fn classifier() -> &'static TaskClassifier {
    static CLASSIFIER: OnceLock<TaskClassifier> = OnceLock::new();
    CLASSIFIER.get_or_init(|| TaskClassifier::with_default_head(&model_dir()).expect("classifier loads"))
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[derive(serde::Deserialize)]
struct Reference {
    cases: Vec<ReferenceCase>,
}

#[derive(serde::Deserialize)]
struct ReferenceCase {
    text: String,
    tokens: usize,
    embedding: Vec<f32>,
}

#[test]
fn embedding_equals_sentence_transformers_reference() {
    let reference: Reference =
        serde_json::from_str(include_str!("data/reference-embeddings.json")).expect("reference JSON");
    assert!(reference.cases.iter().any(|c| c.tokens > 128), "a case longer than tokenizer.json's 128 tokens");
    for case in &reference.cases {
        let embedding = classifier().embed(&case.text).expect("embeds");
        assert_eq!(embedding.len(), 384);
        let max_diff = embedding.iter().zip(&case.embedding).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // The dense layers run in 8 bits (weights and activations): within about 1e-2 of the
        // f32 model's values, the direction kept to a cosine above 0.999.
        let cosine = dot(&embedding, &case.embedding);
        eprintln!("{} tokens: max |difference| {max_diff}, cosine {cosine}", case.tokens);
        assert!(max_diff < 1e-2, "{:?}: max |difference| {max_diff}", case.text);
        assert!(cosine > 0.999, "{:?}: cosine {cosine}", case.text);
        assert!((dot(&embedding, &embedding) - 1.0).abs() < 1e-5, "unit norm");
    }
}

#[test]
fn paraphrases_are_closer_than_unrelated_questions() {
    let embed = |t: &str| classifier().embed(t).expect("embeds");
    let a = embed("Please turn on all the lights in the kitchen.");
    let b = embed("Switch the kitchen lights on, please.");
    let c = embed("What are the calorie counts for potatoes and cucumbers?");
    assert!(dot(&a, &b) > 0.7, "paraphrase cosine {}", dot(&a, &b));
    assert!(dot(&a, &b) > dot(&a, &c) + 0.3, "paraphrase {} vs unrelated {}", dot(&a, &b), dot(&a, &c));
}

#[test]
fn empty_question_is_a_typed_error() {
    for question in ["", "   \n\t"] {
        let error = classifier().classify(question).expect_err("empty");
        assert!(matches!(error, ClassifierError::EmptyQuestion), "{error}");
    }
}

#[test]
fn shipped_head_classifies_the_training_questions() {
    let dialogues = policy_onnx::m4a1::load(&data_path()).expect("dataset");
    for question in labeled_questions(&dialogues) {
        let classification = classifier().classify(&question.question).expect("classifies");
        assert_eq!(classification.task, question.task, "{:?}", question.question);
        assert!((classification.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(
            classification.probabilities[question.task.id()],
            classification.probabilities.iter().copied().fold(0f32, f32::max)
        );
    }
}

#[test]
fn new_wordings_of_the_kitchen_requests_are_classified() {
    let cases = [
        ("Could you switch off the lights in the kitchen?", TaskCategory::AssistiveSystem),
        ("Text my sister that I will be late for dinner.", TaskCategory::MessageEditing),
        ("How many calories are in a banana?", TaskCategory::Query),
        ("Can you recommend a dessert I could bake tonight?", TaskCategory::Recommendation),
    ];
    for (question, task) in cases {
        let classification = classifier().classify(question).expect("classifies");
        assert_eq!(classification.task, task, "{question:?}: {:?}", classification.probabilities);
    }
}

#[test]
fn held_out_question_texts_are_classified() {
    // Folds by question text: a tested M4A1 text is never in training (which is the other M4A1
    // texts and the supplementary set).
    let dialogues = policy_onnx::m4a1::load(&data_path()).expect("dataset");
    let questions = labeled_questions(&dialogues);
    let supplementary =
        supplementary_questions(SUPPLEMENTARY_QUESTIONS, "supplementary").expect("supplementary set");
    let examples = embed_questions(classifier().embedder(), &questions).expect("embeds");
    let extra = embed_questions(classifier().embedder(), &supplementary).expect("embeds");
    let folds = fold_assignments(&questions, 5, FoldBy::Question).expect("folds");
    let mut correct = 0;
    for fold in 0..5 {
        let mut train: Vec<_> =
            examples.iter().zip(&folds).filter(|(_, f)| **f != fold).map(|(e, _)| e.clone()).collect();
        train.extend(extra.iter().cloned());
        let head = train_head(&train, &TrainParams::default(), None, None).expect("trains");
        for (example, _) in examples.iter().zip(&folds).filter(|(_, f)| **f == fold) {
            assert!(
                train.iter().all(|t| t.question.question != example.question.question),
                "tested text is in training"
            );
            let p = head.probabilities(&example.embedding);
            let best = (0..4).fold(0, |best, c| if p[c] > p[best] { c } else { best });
            correct += usize::from(best == example.question.task.id());
        }
    }
    assert!(correct * 10 > questions.len() * 9, "{correct}/{} held-out questions", questions.len());
}

#[test]
fn shipped_head_is_what_training_makes() {
    let bytes = std::fs::read(data_path()).expect("dataset");
    let dialogues = policy_onnx::m4a1::parse(&bytes, "m4a1-train.json").expect("dataset");
    let mut questions = labeled_questions(&dialogues);
    questions.extend(supplementary_questions(SUPPLEMENTARY_QUESTIONS, "supplementary").expect("set"));
    let examples = embed_questions(classifier().embedder(), &questions).expect("embeds");
    let train = || {
        train_head(
            &examples,
            &TrainParams::default(),
            Some(policy_onnx::m4a1::data_hash(&bytes)),
            Some(policy_onnx::m4a1::data_hash(SUPPLEMENTARY_QUESTIONS.as_bytes())),
        )
        .expect("trains")
    };
    let fresh = train();
    let shipped = Head::from_bytes(DEFAULT_HEAD, "shipped").expect("shipped head");
    let again = train();
    assert_eq!(
        fresh.to_bytes().expect("bytes"),
        again.to_bytes().expect("bytes"),
        "training is deterministic"
    );
    assert_eq!(shipped.info().training.examples, 387, "M4A1's 287 questions and the 100 supplementary");
    if fresh.info().training.embeddings_sha256 == shipped.info().training.embeddings_sha256 {
        // Same embeddings (same model and CPU kernels as where the head was made): same bytes.
        assert!(fresh.to_bytes().expect("bytes") == DEFAULT_HEAD, "heads/make-head.sh was not rerun");
    } else {
        // Other CPU kernels round the embeddings differently: the head must still be the same
        // up to that rounding, with the same predictions.
        assert_eq!(fresh.info().training.data_sha256, shipped.info().training.data_sha256);
        assert_eq!(fresh.info().training.supplementary_sha256, shipped.info().training.supplementary_sha256);
        let probe = examples.iter().map(|e| &e.embedding);
        for embedding in probe {
            let (a, b) = (fresh.probabilities(embedding), shipped.probabilities(embedding));
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-3), "{a:?} vs {b:?}");
        }
    }
}

#[test]
fn missing_model_directory_names_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let error = TaskClassifier::with_default_head(&dir.path().join("nowhere")).expect_err("missing");
    assert!(matches!(error, ClassifierError::ModelFile { .. }), "{error}");
    assert!(error.to_string().contains("config.json"), "{error}");
    assert!(error.to_string().contains("tmoctl model fetch all-minilm-l6-v2"), "{error}");
}

#[test]
fn corrupt_model_files_name_the_file() {
    let source = model_dir();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("config.json"), b"{\"hidden_size\": ").expect("write");
    let error = Embedder::load(dir.path()).expect_err("bad config");
    assert!(matches!(error, ClassifierError::ModelCorrupt { .. }), "{error}");
    assert!(error.to_string().contains("config.json"), "{error}");

    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).expect("copy");
    let error = Embedder::load(dir.path()).expect_err("no tokenizer");
    assert!(matches!(error, ClassifierError::ModelFile { .. }), "{error}");
    assert!(error.to_string().contains("tokenizer.json"), "{error}");

    std::fs::write(dir.path().join("tokenizer.json"), b"not json").expect("write");
    let error = Embedder::load(dir.path()).expect_err("bad tokenizer");
    assert!(error.to_string().contains("tokenizer.json"), "{error}");

    std::fs::copy(source.join("tokenizer.json"), dir.path().join("tokenizer.json")).expect("copy");
    std::fs::write(dir.path().join("model.safetensors"), b"\x08\0\0\0\0\0\0\0{}      ").expect("write");
    let error = Embedder::load(dir.path()).expect_err("no weights");
    assert!(matches!(error, ClassifierError::ModelCorrupt { .. }), "{error}");
    assert!(error.to_string().contains("model.safetensors"), "{error}");
}

#[test]
fn bad_head_files_are_typed_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.safetensors");
    let error = TaskClassifier::load(&model_dir(), &missing).expect_err("missing head");
    assert!(matches!(error, ClassifierError::HeadFile { .. }), "{error}");
    assert!(error.to_string().contains("missing.safetensors"), "{error}");

    // Model weights are safetensors too, but not a head.
    let error =
        TaskClassifier::load(&model_dir(), &model_dir().join("model.safetensors")).expect_err("not a head");
    assert!(matches!(error, ClassifierError::NotAHead { .. }), "{error}");

    let garbage = dir.path().join("garbage.bin");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\xffnot a head").expect("write");
    let error = TaskClassifier::load(&model_dir(), &garbage).expect_err("garbage");
    assert!(matches!(error, ClassifierError::NotAHead { .. }), "{error}");
    assert!(error.to_string().contains("garbage.bin"), "{error}");

    let error =
        TaskClassifier::from_parts(&model_dir(), &DEFAULT_HEAD[..DEFAULT_HEAD.len() - 10]).expect_err("cut");
    assert!(matches!(error, ClassifierError::NotAHead { .. }), "{error}");
}

#[test]
fn supplementary_set_holds_no_m4a1_text_or_near_copy() {
    // The held-out estimates stay honest only if the supplementary set never restates an M4A1
    // question: no equal text, and no embedding as close as a paraphrase (see data/README.md).
    let dialogues = policy_onnx::m4a1::load(&data_path()).expect("dataset");
    let mut m4a1: Vec<String> = labeled_questions(&dialogues).into_iter().map(|q| q.question).collect();
    m4a1.sort();
    m4a1.dedup();
    let m4a1: Vec<(String, Vec<f32>)> =
        m4a1.into_iter().map(|t| (t.clone(), classifier().embed(&t).expect("embeds"))).collect();
    for question in supplementary_questions(SUPPLEMENTARY_QUESTIONS, "supplementary").expect("set") {
        let embedding = classifier().embed(&question.question).expect("embeds");
        for (text, other) in &m4a1 {
            assert_ne!(text.to_lowercase(), question.question.to_lowercase());
            let cosine = dot(&embedding, other);
            assert!(cosine < 0.8, "{:?} is close to the M4A1 text {text:?} ({cosine:.3})", question.question);
        }
    }
}

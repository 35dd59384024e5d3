//! Time to classify one question (embedding plus head), with the shipped head.
//!
//! Needs the model: `tmoctl model fetch all-minilm-l6-v2`. A question runs on the calling
//! thread, with the LLM engine's kernels at the level the bench prints.
//! Run: `cargo bench -p task-classifier --bench classify`.
//!
//! On a machine shared with other work, wall-clock time counts the time the scheduler gives to
//! others; the group `classify-on-cpu` therefore also measures the calling thread's on-CPU time
//! (from `/proc/thread-self/schedstat`, in nanoseconds), which is the whole cost.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use task_classifier::TaskClassifier;

const QUESTIONS: [&str; 4] = [
    "Please turn on all the lights in the kitchen.",
    "Please draft a text message asking my friend to bring some ketchup on their way over.",
    "What are the calorie counts for potatoes and cucumbers?",
    "I'm inviting friends over for a dinner party. Do you have any simple cocktail recommendations?",
];

fn classify(c: &mut Criterion) {
    let model_dir = match llm_engine::default_model_dir() {
        Ok(dir) => dir.join("all-minilm-l6-v2"),
        Err(e) => panic!("no model directory: {e}"),
    };
    let classifier = match TaskClassifier::with_default_head(&model_dir) {
        Ok(classifier) => classifier,
        Err(e) => panic!("{e}"),
    };
    eprintln!("kernels: {}", llm_engine::kernel_level());
    let mut group = c.benchmark_group("classify");
    group.bench_function("one question (4 questions in turn)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % QUESTIONS.len();
            black_box(classifier.classify(black_box(QUESTIONS[i])).map(|c| c.task).ok())
        })
    });
    group.bench_function("short question", |b| {
        b.iter(|| black_box(classifier.classify(black_box("Is anyone home?")).ok()))
    });
    group.finish();
}

/// The calling thread's time on a CPU so far (first field of `/proc/thread-self/schedstat`).
fn thread_on_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok().map(Duration::from_nanos)
}

fn classify_on_cpu(c: &mut Criterion) {
    if thread_on_cpu().is_none() {
        eprintln!("no /proc/thread-self/schedstat: skipping the on-CPU time group");
        return;
    }
    let model_dir = match llm_engine::default_model_dir() {
        Ok(dir) => dir.join("all-minilm-l6-v2"),
        Err(e) => panic!("no model directory: {e}"),
    };
    let classifier = match TaskClassifier::with_default_head(&model_dir) {
        Ok(classifier) => classifier,
        Err(e) => panic!("{e}"),
    };
    let mut group = c.benchmark_group("classify-on-cpu");
    group.bench_function("one question (4 questions in turn)", |b| {
        b.iter_custom(|iters| {
            let start = thread_on_cpu().unwrap_or_default();
            for i in 0..iters {
                let question = QUESTIONS[i as usize % QUESTIONS.len()];
                black_box(classifier.classify(black_box(question)).map(|c| c.task).ok());
            }
            thread_on_cpu().unwrap_or_default().saturating_sub(start)
        })
    });
    group.finish();
}

criterion_group!(benches, classify, classify_on_cpu);
criterion_main!(benches);

//! Training the head: multinomial logistic regression by full-batch gradient descent in f64,
//! from zero weights, in a fixed order: the same embeddings give the same head, bit for bit.
//! Also the examples of an M4A1 dataset and the folds of a k-fold evaluation.

use std::collections::{BTreeMap, HashMap};

use policy_onnx::TaskCategory;
use policy_onnx::m4a1::Dialogue;
use sha2::{Digest, Sha256};

use crate::embed::{EMBEDDING_DIM, Embedder};
use crate::error::{ClassifierError, Result};
use crate::head::{CLASSES, Head, TrainingInfo};

/// The training method recorded in heads.
pub const METHOD: &str = "softmax regression, full-batch gradient descent (f64), zero init";

/// Hyper-parameters of [`train_head`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainParams {
    /// Full-batch gradient steps.
    pub epochs: u32,
    /// Step size.
    pub learning_rate: f64,
    /// L2 penalty on the weights (not the bias).
    pub l2: f64,
    /// Weight each category by the inverse of its frequency.
    pub class_balanced: bool,
}

impl Default for TrainParams {
    fn default() -> Self {
        Self { epochs: 1500, learning_rate: 4.0, l2: 1e-3, class_balanced: true }
    }
}

/// One question of a dataset, with its category and the dialogue it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledQuestion {
    /// The dialogue's id; `None` for a question of the supplementary set.
    pub dialogue: Option<u64>,
    /// The question text.
    pub question: String,
    /// Its category.
    pub task: TaskCategory,
}

/// Every question of the dialogues, in file order.
pub fn labeled_questions(dialogues: &[Dialogue]) -> Vec<LabeledQuestion> {
    dialogues
        .iter()
        .flat_map(|d| {
            d.interactions.iter().map(|i| LabeledQuestion {
                dialogue: Some(d.id),
                question: i.question.clone(),
                task: i.task_cat,
            })
        })
        .collect()
}

/// The supplementary question set that ships with the crate (`data/supplementary-questions.jsonl`,
/// see `data/README.md`): hand-written kitchen-assistant questions, 25 per category, none of them
/// an M4A1 text or a paraphrase of one. The shipped head trains on it with the M4A1 questions.
pub const SUPPLEMENTARY_QUESTIONS: &str = include_str!("../data/supplementary-questions.jsonl");

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SupplementaryLine {
    task: String,
    question: String,
}

/// The questions of a supplementary set: JSON Lines, one `{"task": <category name>, "question":
/// <text>}` per line (blank lines skipped). `source_name` names the text in errors.
pub fn supplementary_questions(text: &str, source_name: &str) -> Result<Vec<LabeledQuestion>> {
    let mut questions = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |detail: String| {
            ClassifierError::Training(format!("{source_name} line {}: {detail}", number + 1))
        };
        let parsed: SupplementaryLine = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let task = TaskCategory::from_name(&parsed.task)
            .ok_or_else(|| bad(format!("unknown task category {:?}", parsed.task)))?;
        if parsed.question.trim().is_empty() {
            return Err(bad("empty question".to_string()));
        }
        questions.push(LabeledQuestion { dialogue: None, question: parsed.question, task });
    }
    if questions.is_empty() {
        return Err(ClassifierError::Training(format!("{source_name} holds no questions")));
    }
    Ok(questions)
}

/// A labeled question with its embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The question.
    pub question: LabeledQuestion,
    /// Its unit-norm embedding.
    pub embedding: Vec<f32>,
}

/// Embeds the questions, each distinct text once.
pub fn embed_questions(embedder: &Embedder, questions: &[LabeledQuestion]) -> Result<Vec<Example>> {
    let mut cache: HashMap<&str, Vec<f32>> = HashMap::new();
    let mut examples = Vec::with_capacity(questions.len());
    for question in questions {
        let embedding = match cache.get(question.question.as_str()) {
            Some(embedding) => embedding.clone(),
            None => {
                let embedding = embedder.embed(&question.question)?;
                cache.insert(&question.question, embedding.clone());
                embedding
            }
        };
        examples.push(Example { question: question.clone(), embedding });
    }
    Ok(examples)
}

/// How k-fold evaluation groups questions so a group is never split between training and test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoldBy {
    /// By dialogue: a dialogue's questions are tested together (the same question text may
    /// occur in other, training dialogues).
    Dialogue,
    /// By question text: a text is never seen in training when it is tested.
    Question,
}

/// The fold (0..k) of each question: the distinct groups, sorted (dialogue ids, or question
/// texts), are dealt round-robin.
pub fn fold_assignments(questions: &[LabeledQuestion], k: usize, by: FoldBy) -> Result<Vec<usize>> {
    if k < 2 {
        return Err(ClassifierError::Training(format!("k-fold needs k >= 2, got {k}")));
    }
    let key = |q: &LabeledQuestion| match by {
        FoldBy::Dialogue => q.dialogue.map_or_else(|| format!("text {}", q.question), |d| format!("{d:020}")),
        FoldBy::Question => q.question.clone(),
    };
    let groups: BTreeMap<String, usize> = {
        let mut keys: Vec<String> = questions.iter().map(key).collect();
        keys.sort();
        keys.dedup();
        if keys.len() < k {
            return Err(ClassifierError::Training(format!("{} groups cannot make {k} folds", keys.len())));
        }
        keys.into_iter().enumerate().map(|(i, key)| (key, i % k)).collect()
    };
    Ok(questions.iter().map(|q| groups[&key(q)]).collect())
}

fn embeddings_digest(examples: &[Example]) -> String {
    let mut hasher = Sha256::new();
    for example in examples {
        for value in &example.embedding {
            hasher.update(value.to_le_bytes());
        }
    }
    hex::encode(hasher.finalize())
}

/// Trains a head on the examples. `data_sha256` and `supplementary_sha256` record the dataset
/// file and the supplementary set, when they were used.
pub fn train_head(
    examples: &[Example],
    params: &TrainParams,
    data_sha256: Option<String>,
    supplementary_sha256: Option<String>,
) -> Result<Head> {
    if examples.is_empty() {
        return Err(ClassifierError::Training("no examples".to_string()));
    }
    if let Some(bad) = examples.iter().find(|e| e.embedding.len() != EMBEDDING_DIM) {
        return Err(ClassifierError::Training(format!(
            "an embedding has {} values, expected {EMBEDDING_DIM}",
            bad.embedding.len()
        )));
    }
    if !(params.learning_rate > 0.0 && params.l2 >= 0.0) {
        return Err(ClassifierError::Training("learning rate must be > 0 and l2 >= 0".to_string()));
    }
    let mut class_counts = [0usize; CLASSES];
    for example in examples {
        class_counts[example.question.task.id()] += 1;
    }
    let n = examples.len() as f64;
    let present = class_counts.iter().filter(|&&c| c > 0).count() as f64;
    let class_weight = class_counts.map(|c| {
        if c == 0 {
            0.0
        } else if params.class_balanced {
            n / (present * c as f64)
        } else {
            1.0
        }
    });

    // Identical texts have identical embeddings: train on distinct texts with summed weights.
    let mut distinct: Vec<(Vec<f64>, usize, f64)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for example in examples {
        let class = example.question.task.id();
        let weight = class_weight[class] / n;
        match index.get(example.question.question.as_str()) {
            Some(&i) if distinct[i].1 == class => distinct[i].2 += weight,
            _ => {
                index.insert(&example.question.question, distinct.len());
                distinct.push((example.embedding.iter().map(|&v| f64::from(v)).collect(), class, weight));
            }
        }
    }
    let distinct_questions = index.len();

    let mut weight = vec![0f64; CLASSES * EMBEDDING_DIM];
    let mut bias = [0f64; CLASSES];
    let mut grad_weight = vec![0f64; CLASSES * EMBEDDING_DIM];
    for _ in 0..params.epochs {
        grad_weight.iter_mut().for_each(|g| *g = 0.0);
        let mut grad_bias = [0f64; CLASSES];
        for (x, class, sample_weight) in &distinct {
            let p = probabilities(&weight, &bias, x);
            for c in 0..CLASSES {
                let g = sample_weight * (p[c] - if c == *class { 1.0 } else { 0.0 });
                grad_bias[c] += g;
                let row = &mut grad_weight[c * EMBEDDING_DIM..(c + 1) * EMBEDDING_DIM];
                row.iter_mut().zip(x).for_each(|(gw, xv)| *gw += g * xv);
            }
        }
        for (w, g) in weight.iter_mut().zip(&grad_weight) {
            *w -= params.learning_rate * (g + params.l2 * *w);
        }
        for (b, g) in bias.iter_mut().zip(grad_bias) {
            *b -= params.learning_rate * g;
        }
    }
    let data_loss: f64 = distinct
        .iter()
        .map(|(x, class, w)| -w * probabilities(&weight, &bias, x)[*class].max(1e-300).ln())
        .sum();
    let penalty = 0.5 * params.l2 * weight.iter().map(|w| w * w).sum::<f64>();

    let training = TrainingInfo {
        method: METHOD.to_string(),
        epochs: params.epochs,
        learning_rate: params.learning_rate,
        l2: params.l2,
        class_balanced: params.class_balanced,
        examples: examples.len(),
        distinct_questions,
        class_counts,
        data_sha256,
        supplementary_sha256,
        embeddings_sha256: embeddings_digest(examples),
        final_loss: data_loss + penalty,
    };
    Head::new(weight.iter().map(|&w| w as f32).collect(), bias.map(|b| b as f32), training)
}

fn probabilities(weight: &[f64], bias: &[f64; CLASSES], x: &[f64]) -> [f64; CLASSES] {
    let mut logits = *bias;
    for (c, logit) in logits.iter_mut().enumerate() {
        *logit +=
            weight[c * EMBEDDING_DIM..(c + 1) * EMBEDDING_DIM].iter().zip(x).map(|(w, v)| w * v).sum::<f64>();
    }
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp = logits.map(|l| (l - max).exp());
    let total: f64 = exp.iter().sum();
    exp.map(|e| e / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(dialogue: u64, text: &str, task: TaskCategory, axis: usize) -> Example {
        let mut embedding = vec![0f32; EMBEDDING_DIM];
        embedding[axis] = 1.0;
        Example {
            question: LabeledQuestion { dialogue: Some(dialogue), question: text.into(), task },
            embedding,
        }
    }

    fn toy() -> Vec<Example> {
        TaskCategory::ALL
            .iter()
            .enumerate()
            .flat_map(|(i, &task)| {
                (0..3).map(move |j| example(j, &format!("q{i}-{j}"), task, i * 10 + j as usize))
            })
            .collect()
    }

    #[test]
    fn separable_toy_data_is_learned_and_training_is_deterministic() {
        let params = TrainParams { epochs: 300, ..TrainParams::default() };
        let head = train_head(&toy(), &params, None, None).expect("trains");
        for example in toy() {
            let p = head.probabilities(&example.embedding);
            let best = (0..CLASSES).max_by(|&a, &b| p[a].total_cmp(&p[b])).expect("classes");
            assert_eq!(best, example.question.task.id());
        }
        let again = train_head(&toy(), &params, None, None).expect("trains");
        assert_eq!(head.to_bytes().expect("bytes"), again.to_bytes().expect("bytes"));
    }

    #[test]
    fn no_examples_is_an_error() {
        assert!(matches!(
            train_head(&[], &TrainParams::default(), None, None),
            Err(ClassifierError::Training(_))
        ));
    }

    #[test]
    fn folds_keep_groups_whole() {
        let questions: Vec<LabeledQuestion> = toy().into_iter().map(|e| e.question).collect();
        let by_dialogue = fold_assignments(&questions, 3, FoldBy::Dialogue).expect("folds");
        for (q, fold) in questions.iter().zip(&by_dialogue) {
            assert_eq!(Some(*fold as u64), q.dialogue.map(|d| d % 3));
        }
        let by_text = fold_assignments(&questions, 2, FoldBy::Question).expect("folds");
        for (a, fa) in questions.iter().zip(&by_text) {
            for (b, fb) in questions.iter().zip(&by_text) {
                if a.question == b.question {
                    assert_eq!(fa, fb);
                }
            }
        }
        assert!(fold_assignments(&questions, 13, FoldBy::Question).is_err(), "12 texts, 13 folds");
    }

    #[test]
    fn shipped_supplementary_set_is_balanced_and_distinct() {
        let questions = supplementary_questions(SUPPLEMENTARY_QUESTIONS, "supplementary").expect("parses");
        for task in TaskCategory::ALL {
            assert_eq!(questions.iter().filter(|q| q.task == task).count(), 25, "{task}");
        }
        let mut texts: Vec<&str> = questions.iter().map(|q| q.question.as_str()).collect();
        texts.sort_unstable();
        texts.dedup();
        assert_eq!(texts.len(), questions.len(), "no repeated text");
    }

    #[test]
    fn bad_supplementary_lines_name_the_line() {
        let good = r#"{"task": "Query", "question": "Is the kettle on?"}"#;
        for (text, expected) in [
            (format!("{good}\n{{\"task\": \"Gossip\", \"question\": \"x\"}}"), "line 2: unknown task"),
            (format!("{good}\n\nnot json"), "line 3:"),
            (r#"{"task": "Query", "question": "  "}"#.to_string(), "line 1: empty question"),
            (r#"{"task": "Query", "question": "q", "extra": 1}"#.to_string(), "line 1:"),
            ("\n".to_string(), "no questions"),
        ] {
            let error = supplementary_questions(&text, "extra.jsonl").expect_err(&text);
            assert!(error.to_string().contains(expected), "{error}");
            assert!(error.to_string().contains("extra.jsonl"), "{error}");
        }
        assert_eq!(supplementary_questions(good, "one").expect("parses")[0].task, TaskCategory::Query);
    }
}

//! `tmoctl classifier train` and `tmoctl classifier eval`: the task classifier's head, trained
//! on the questions of an M4A1 dataset, and its k-fold evaluation (accuracy per fold and per
//! category, confusion matrix, time per question).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use llm_engine::registry::{default_model_dir, resolve_model_in};
use policy_onnx::TaskCategory;
use policy_onnx::m4a1;
use task_classifier::train::{
    Example, FoldBy, LabeledQuestion, SUPPLEMENTARY_QUESTIONS, TrainParams, embed_questions,
    fold_assignments, labeled_questions, supplementary_questions, train_head,
};
use task_classifier::{CLASSES, Embedder, TaskClassifier};

/// The registry name of the embedding model.
const EMBEDDING_MODEL: &str = "all-minilm-l6-v2";

/// Classifier commands.
#[derive(Debug, Subcommand)]
pub enum ClassifierCommand {
    /// Train the head on a dataset's questions and write it (safetensors).
    Train {
        /// Dialogues in the M4A1 format.
        #[arg(long)]
        data: PathBuf,
        /// Where to write the head.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// K-fold evaluation: accuracy per fold and per category, confusion matrix, ms per question.
    /// The supplementary set is always in training; folds hold out the dataset's questions
    /// (`--by dialogue` or `--by question`), or, with `--by supplementary`, one supplementary
    /// question at a time (leave-one-out, training on the whole dataset and the rest of the set).
    Eval {
        /// Dialogues in the M4A1 format.
        #[arg(long)]
        data: PathBuf,
        /// Number of folds (ignored by `--by supplementary`, which leaves one question out at a time).
        #[arg(long, default_value_t = 5)]
        kfold: usize,
        /// What a fold holds out: whole dialogues, whole question texts (never seen in training),
        /// or one supplementary question.
        #[arg(long, value_enum, default_value_t = FoldGroup::Dialogue)]
        by: FoldGroup,
        #[command(flatten)]
        common: CommonArgs,
    },
}

/// Options shared by train and eval.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// The all-MiniLM-L6-v2 directory (default: `all-minilm-l6-v2` in $TMO_MODEL_DIR or
    /// ~/.cache/tmo-edge/models, installed by `tmoctl model fetch all-minilm-l6-v2`).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Full-batch gradient steps.
    #[arg(long, default_value_t = TrainParams::default().epochs)]
    epochs: u32,
    /// Step size.
    #[arg(long, default_value_t = TrainParams::default().learning_rate)]
    learning_rate: f64,
    /// L2 penalty on the weights.
    #[arg(long, default_value_t = TrainParams::default().l2)]
    l2: f64,
    /// Do not weight categories by inverse frequency.
    #[arg(long)]
    unbalanced: bool,
    /// Supplementary questions (JSON Lines of `{"task", "question"}`) added to training; default:
    /// the set the crate ships (task-classifier/data/supplementary-questions.jsonl).
    #[arg(long, conflicts_with = "no_supplementary")]
    supplementary: Option<PathBuf>,
    /// Train on the dataset's questions only.
    #[arg(long)]
    no_supplementary: bool,
}

/// What a fold holds out.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FoldGroup {
    /// Whole dialogues.
    Dialogue,
    /// Whole question texts.
    Question,
    /// One supplementary question at a time (leave-one-out).
    Supplementary,
}

impl CommonArgs {
    fn params(&self) -> TrainParams {
        TrainParams {
            epochs: self.epochs,
            learning_rate: self.learning_rate,
            l2: self.l2,
            class_balanced: !self.unbalanced,
        }
    }

    fn embedder(&self) -> anyhow::Result<Embedder> {
        let dir = match &self.model_dir {
            Some(dir) => dir.clone(),
            None => {
                let models = default_model_dir().context("choosing the model directory")?;
                resolve_model_in(EMBEDDING_MODEL, &models).context("finding the embedding model")?
            }
        };
        Embedder::load(&dir).with_context(|| format!("loading the embedding model from {}", dir.display()))
    }

    /// The supplementary questions and the sha256 of their file (none with `--no-supplementary`).
    fn supplementary(&self) -> anyhow::Result<(Vec<LabeledQuestion>, Option<String>)> {
        if self.no_supplementary {
            return Ok((Vec::new(), None));
        }
        let (text, name) = match &self.supplementary {
            Some(path) => (
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
                path.display().to_string(),
            ),
            None => (SUPPLEMENTARY_QUESTIONS.to_string(), "the shipped supplementary set".to_string()),
        };
        let questions = supplementary_questions(&text, &name)?;
        Ok((questions, Some(m4a1::data_hash(text.as_bytes()))))
    }
}

fn load_questions(data: &Path) -> anyhow::Result<(Vec<LabeledQuestion>, String)> {
    let bytes = std::fs::read(data).with_context(|| format!("reading {}", data.display()))?;
    let dialogues = m4a1::parse(&bytes, &data.display().to_string())?;
    Ok((labeled_questions(&dialogues), m4a1::data_hash(&bytes)))
}

fn short(task: TaskCategory) -> &'static str {
    match task {
        TaskCategory::AssistiveSystem => "Assistive",
        TaskCategory::MessageEditing => "Message",
        TaskCategory::Query => "Query",
        TaskCategory::Recommendation => "Recommend",
    }
}

fn print_balance(label: &str, questions: &[LabeledQuestion]) {
    let mut counts = [0usize; CLASSES];
    let mut texts: Vec<Vec<&str>> = vec![Vec::new(); CLASSES];
    for q in questions {
        counts[q.task.id()] += 1;
        texts[q.task.id()].push(&q.question);
    }
    println!("{label}: questions per category (distinct texts):");
    for task in TaskCategory::ALL {
        let distinct = &mut texts[task.id()];
        distinct.sort_unstable();
        distinct.dedup();
        println!("  {:<17} {:>4} ({})", task.name(), counts[task.id()], distinct.len());
    }
}

fn argmax(p: &[f32; CLASSES]) -> usize {
    (0..CLASSES).fold(0, |best, c| if p[c] > p[best] { c } else { best })
}

fn print_confusion(confusion: &[[usize; CLASSES]; CLASSES]) {
    let total: usize = confusion.iter().flatten().sum();
    let correct: usize = (0..CLASSES).map(|c| confusion[c][c]).sum();
    println!("pooled {correct}/{total} = {:.1}%", correct as f64 / total.max(1) as f64 * 100.0);
    println!("confusion (rows true, columns predicted):");
    print!("  {:<10}", "");
    for task in TaskCategory::ALL {
        print!(" {:>9}", short(task));
    }
    println!("  accuracy");
    for task in TaskCategory::ALL {
        let row = confusion[task.id()];
        print!("  {:<10}", short(task));
        for count in row {
            print!(" {count:>9}");
        }
        let n: usize = row.iter().sum();
        println!("  {:.1}%", row[task.id()] as f64 / n.max(1) as f64 * 100.0);
    }
}

/// Embeds every question (no cache), timing each: that is the classifier's cost.
fn embed_timed(
    embedder: &Embedder,
    questions: &[LabeledQuestion],
    embed_ms: &mut Vec<f64>,
) -> anyhow::Result<Vec<Example>> {
    let mut examples = Vec::with_capacity(questions.len());
    for question in questions {
        let started = Instant::now();
        let embedding = embedder.embed(&question.question)?;
        embed_ms.push(started.elapsed().as_secs_f64() * 1e3);
        examples.push(Example { question: question.clone(), embedding });
    }
    Ok(examples)
}

/// Runs a classifier command.
pub fn run(command: ClassifierCommand) -> anyhow::Result<()> {
    match command {
        ClassifierCommand::Train { data, out, common } => {
            let (mut questions, data_sha256) = load_questions(&data)?;
            print_balance(&data.display().to_string(), &questions);
            let (supplementary, supplementary_sha256) = common.supplementary()?;
            if !supplementary.is_empty() {
                print_balance("supplementary", &supplementary);
            }
            questions.extend(supplementary);
            let embedder = common.embedder()?;
            let started = Instant::now();
            let examples = embed_questions(&embedder, &questions).context("embedding the questions")?;
            let embedded = started.elapsed();
            let head = train_head(&examples, &common.params(), Some(data_sha256), supplementary_sha256)
                .context("training the head")?;
            let bytes = head.to_bytes()?;
            let partial = out.with_extension("partial");
            std::fs::write(&partial, &bytes).with_context(|| format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, &out).with_context(|| format!("writing {}", out.display()))?;
            let info = head.info();
            let classifier = TaskClassifier::new(embedder, head.clone());
            let correct = examples
                .iter()
                .filter(|e| classifier.classify_embedding(&e.embedding).task == e.question.task)
                .count();
            println!(
                "embedded {} distinct of {} questions in {:.2} s; trained {} epochs in {:.2} s; loss {:.5}",
                info.training.distinct_questions,
                info.training.examples,
                embedded.as_secs_f64(),
                info.training.epochs,
                (started.elapsed() - embedded).as_secs_f64(),
                info.training.final_loss
            );
            println!("training accuracy {correct}/{}", examples.len());
            println!(
                "wrote {} ({} bytes, weights sha256 {})",
                out.display(),
                bytes.len(),
                info.weights_sha256
            );
            Ok(())
        }
        ClassifierCommand::Eval { data, kfold, by, common } => {
            let (questions, _) = load_questions(&data)?;
            print_balance(&data.display().to_string(), &questions);
            let (supplementary, _) = common.supplementary()?;
            if !supplementary.is_empty() {
                print_balance("supplementary (always in training)", &supplementary);
            }
            let embedder = common.embedder()?;
            let mut embed_ms = Vec::with_capacity(questions.len() + supplementary.len());
            let examples = embed_timed(&embedder, &questions, &mut embed_ms)?;
            let extra = embed_timed(&embedder, &supplementary, &mut embed_ms)?;
            let params = common.params();
            let mut confusion = [[0usize; CLASSES]; CLASSES];
            let mut head_us = Vec::new();
            let mut score = |head: &task_classifier::Head, example: &Example| -> bool {
                let started = Instant::now();
                let p = head.probabilities(&example.embedding);
                head_us.push(started.elapsed().as_secs_f64() * 1e6);
                let predicted = argmax(&p);
                confusion[example.question.task.id()][predicted] += 1;
                predicted == example.question.task.id()
            };
            let by = match by {
                FoldGroup::Dialogue => Some(FoldBy::Dialogue),
                FoldGroup::Question => Some(FoldBy::Question),
                FoldGroup::Supplementary => None,
            };
            match by {
                Some(by) => {
                    let folds = fold_assignments(&questions, kfold, by)?;
                    let mut accuracies = Vec::with_capacity(kfold);
                    println!(
                        "{kfold}-fold by {by:?} over {} ({} supplementary questions always in training), {params:?}",
                        data.display(),
                        extra.len()
                    );
                    for fold in 0..kfold {
                        let mut train: Vec<Example> = examples
                            .iter()
                            .zip(&folds)
                            .filter(|(_, f)| **f != fold)
                            .map(|(e, _)| e.clone())
                            .collect();
                        train.extend(extra.iter().cloned());
                        let test: Vec<&Example> = examples
                            .iter()
                            .zip(&folds)
                            .filter(|(_, f)| **f == fold)
                            .map(|(e, _)| e)
                            .collect();
                        let head = train_head(&train, &params, None, None)?;
                        let train_texts: std::collections::HashSet<&str> =
                            train.iter().map(|e| e.question.question.as_str()).collect();
                        let unseen = test
                            .iter()
                            .filter(|e| !train_texts.contains(e.question.question.as_str()))
                            .count();
                        let mut per_class = [(0usize, 0usize); CLASSES];
                        for example in &test {
                            let ok = score(&head, example);
                            let entry = &mut per_class[example.question.task.id()];
                            entry.0 += usize::from(ok);
                            entry.1 += 1;
                        }
                        let correct: usize = per_class.iter().map(|c| c.0).sum();
                        let accuracy = correct as f64 / test.len() as f64;
                        accuracies.push(accuracy);
                        let classes: Vec<String> = TaskCategory::ALL
                            .iter()
                            .filter(|t| per_class[t.id()].1 > 0)
                            .map(|t| format!("{} {}/{}", short(*t), per_class[t.id()].0, per_class[t.id()].1))
                            .collect();
                        println!(
                            "fold {}: {correct}/{} = {:.1}% ({} test questions whose text is not in training; {})",
                            fold + 1,
                            test.len(),
                            accuracy * 100.0,
                            unseen,
                            classes.join(", ")
                        );
                    }
                    let mean = accuracies.iter().sum::<f64>() / accuracies.len() as f64;
                    print!("mean fold accuracy {:.1}%; ", mean * 100.0);
                }
                None => {
                    if extra.is_empty() {
                        anyhow::bail!("--by supplementary needs a supplementary set");
                    }
                    println!(
                        "leave-one-out over {} supplementary questions (training: all {} of {} and the other \
                         supplementary questions), {params:?}",
                        extra.len(),
                        examples.len(),
                        data.display()
                    );
                    for held_out in 0..extra.len() {
                        let mut train = examples.clone();
                        train.extend(
                            extra.iter().enumerate().filter(|(i, _)| *i != held_out).map(|(_, e)| e.clone()),
                        );
                        let head = train_head(&train, &params, None, None)?;
                        let example = &extra[held_out];
                        if !score(&head, example) {
                            let p = head.probabilities(&example.embedding);
                            println!(
                                "  wrong: {:?} ({}) -> {} ({:.2})",
                                example.question.question,
                                short(example.question.task),
                                short(TaskCategory::ALL[argmax(&p)]),
                                p[argmax(&p)]
                            );
                        }
                    }
                }
            }
            print_confusion(&confusion);
            embed_ms.sort_by(f64::total_cmp);
            let mean_ms = embed_ms.iter().sum::<f64>() / embed_ms.len() as f64;
            let mean_head_us = head_us.iter().sum::<f64>() / head_us.len().max(1) as f64;
            println!(
                "time per question: embedding mean {mean_ms:.2} ms, median {:.2} ms, max {:.2} ms; head {mean_head_us:.1} us \
                 ({} questions, one thread, {} kernels)",
                embed_ms[embed_ms.len() / 2],
                embed_ms[embed_ms.len() - 1],
                embed_ms.len(),
                llm_engine::kernel_level()
            );
            Ok(())
        }
    }
}

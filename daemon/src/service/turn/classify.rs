//! Stage 1: the question's task, as the app named it or as the classifier finds it.

use policy_onnx::TaskCategory;

use crate::service::{AskError, Service};

/// A question's task and where it came from.
pub(super) struct Classified {
    pub task: TaskCategory,
    /// `request` (named by the app) or `classifier`.
    pub source: &'static str,
    /// The classifier's probability of each task (empty when the app named it).
    pub probabilities: Vec<f32>,
}

impl Service {
    /// The task `named` by the request, or the classifier's for `question`.
    pub(super) fn classify(&self, question: &str, named: Option<&str>) -> Result<Classified, AskError> {
        match named {
            Some(name) => {
                let task = TaskCategory::from_name(name).ok_or_else(|| {
                    AskError::BadRequest(format!(
                        "unknown task {name:?} (one of: {})",
                        TaskCategory::ALL.map(TaskCategory::name).join(", ")
                    ))
                })?;
                Ok(Classified { task, source: "request", probabilities: Vec::new() })
            }
            None => {
                let c = self.classifier.classify(question).map_err(|e| AskError::Internal(e.to_string()))?;
                Ok(Classified { task: c.task, source: "classifier", probabilities: c.probabilities.to_vec() })
            }
        }
    }
}

//! The M4A1 dataset format (the paper's dialogues), read by the trainer and written by
//! `tmoctl outcomes export --format m4a1`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::schema::{Action, ModalitySet, TaskCategory, Turn};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read dataset {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("dataset {path} is not M4A1 JSON: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("dataset {path}, dialogue {dialogue}: {reason}")]
    Invalid { path: String, dialogue: u64, reason: String },
}

/// One dialogue: its camera views, its turns, and how related each view is to each turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dialogue {
    pub id: u64,
    /// One image per modality (their files are not part of the public sample).
    pub image_paths: Vec<String>,
    pub interactions: Vec<Interaction>,
    /// `association_score[turn][modality]`.
    pub association_score: Vec<Vec<f64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    pub question: String,
    pub task_cat: TaskCategory,
    /// 0 local, 1 cloud.
    pub action: u8,
    /// The views uploaded with a cloud call, in upload order; null for none.
    pub image_index: Option<Vec<usize>>,
    pub answer: String,
    /// Judge score relative to a reference answer; can exceed 1.
    pub score: f64,
    pub interaction_time: f64,
    pub usage_cost: f64,
}

impl Interaction {
    /// The action this interaction logged.
    pub fn logged_action(&self) -> Action {
        if self.action == 0 {
            Action::Local
        } else {
            let modalities = ModalitySet::from_indices(self.image_index.iter().flatten().copied());
            Action::Cloud { modalities }
        }
    }

    pub fn turn(&self) -> Turn {
        Turn { task: self.task_cat, action: self.logged_action() }
    }
}

/// Reads and checks a dataset file.
pub fn load(path: &Path) -> Result<Vec<Dialogue>, DatasetError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| DatasetError::Io { path: name.clone(), source })?;
    parse(&bytes, &name)
}

/// Parses and checks dataset bytes; `name` names them in errors.
pub fn parse(bytes: &[u8], name: &str) -> Result<Vec<Dialogue>, DatasetError> {
    let dialogues: Vec<Dialogue> = serde_json::from_slice(bytes)
        .map_err(|source| DatasetError::Parse { path: name.to_owned(), source })?;
    for d in &dialogues {
        let invalid =
            |reason: String| DatasetError::Invalid { path: name.to_owned(), dialogue: d.id, reason };
        if d.interactions.is_empty() {
            return Err(invalid("has no interactions".into()));
        }
        if d.association_score.len() != d.interactions.len() {
            return Err(invalid(format!(
                "has {} association rows for {} interactions",
                d.association_score.len(),
                d.interactions.len()
            )));
        }
        let views = d.image_paths.len();
        if let Some(row) = d.association_score.iter().find(|r| r.len() != views) {
            return Err(invalid(format!("association row of {} scores for {views} views", row.len())));
        }
        for (t, i) in d.interactions.iter().enumerate() {
            if i.action > 1 {
                return Err(invalid(format!("turn {t}: action {} is neither 0 nor 1", i.action)));
            }
            if let Some(v) = i.image_index.iter().flatten().find(|v| **v >= views) {
                return Err(invalid(format!("turn {t}: image index {v} out of {views} views")));
            }
        }
    }
    Ok(dialogues)
}

/// sha256 of a dataset file's bytes, hex: the "data hash" of policy manifests.
pub fn data_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schema;

    pub(crate) fn train_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/m4a1/m4a1-train.json")
    }

    fn dialogue(id: u64) -> Dialogue {
        load(&train_path()).unwrap().into_iter().find(|d| d.id == id).unwrap()
    }

    #[test]
    fn loads_the_training_sample() {
        let data = load(&train_path()).unwrap();
        assert_eq!(data.len(), 80);
        assert_eq!(data.iter().map(|d| d.interactions.len()).sum::<usize>(), 287);
    }

    /// Dialogue 8: Query local; Query cloud {m0}; Message Editing cloud {m0, m1};
    /// Assistive System local; Assistive System cloud text-only.
    #[test]
    fn encodes_dialogue_8_by_hand() {
        let d = dialogue(8);
        let turns: Vec<Turn> = d.interactions.iter().map(Interaction::turn).collect();
        let s = Schema::default();

        // Third turn (Message Editing = 1): two padded slots, then turns 0..=2.
        let obs = s.observation(&turns[..2], turns[2].task, 12.5, 0.04);
        #[rustfmt::skip]
        let expected = vec![
            -1.0, -1.0, -1.0, -1.0, -1.0,
            -1.0, -1.0, -1.0, -1.0, -1.0,
            -1.0, 0.0, 0.0, 0.0, 2.0, // first turn: Query
            0.0, 0.0, 0.0, 0.0, 2.0,  // after a local turn: Query
            1.0, 1.0, 0.0, 0.0, 1.0,  // after cloud with m0: Message Editing
            12.5, 0.04,
        ];
        assert_eq!(obs, expected);

        // Fifth turn (Assistive System = 0): the whole dialogue fills the window.
        let obs = s.observation(&turns[..4], turns[4].task, 3.0, 0.001);
        #[rustfmt::skip]
        let expected = vec![
            -1.0, 0.0, 0.0, 0.0, 2.0,
            0.0, 0.0, 0.0, 0.0, 2.0,
            1.0, 1.0, 0.0, 0.0, 1.0,
            1.0, 1.0, 1.0, 0.0, 0.0, // after cloud with m0, m1: Assistive System
            0.0, 0.0, 0.0, 0.0, 0.0, // after a local turn: Assistive System
            3.0, 0.001,
        ];
        assert_eq!(obs, expected);
    }

    /// Dialogue 2: Assistive cloud text-only, Query cloud with views [0, 2, 1], Message local.
    #[test]
    fn encodes_dialogue_2_by_hand() {
        let d = dialogue(2);
        let turns: Vec<Turn> = d.interactions.iter().map(Interaction::turn).collect();
        assert_eq!(Schema::default().action_index(turns[1].action), Some(8));
        assert_eq!(Schema::default().action_index(turns[0].action), Some(1));
        let obs = Schema::default().observation(&turns[..2], turns[2].task, 30.0, 0.05);
        #[rustfmt::skip]
        let expected = vec![
            -1.0, -1.0, -1.0, -1.0, -1.0,
            -1.0, -1.0, -1.0, -1.0, -1.0,
            -1.0, 0.0, 0.0, 0.0, 0.0,
            1.0, 0.0, 0.0, 0.0, 2.0, // after cloud text-only: Query
            1.0, 1.0, 1.0, 1.0, 1.0, // after cloud with all three views: Message Editing
            30.0, 0.05,
        ];
        assert_eq!(obs, expected);
    }

    #[test]
    fn rejects_broken_datasets_with_reasons() {
        assert!(matches!(parse(b"{not json", "x"), Err(DatasetError::Parse { .. })));
        let mut d = dialogue(2);
        d.association_score.pop();
        let bytes = serde_json::to_vec(&vec![d]).unwrap();
        let err = parse(&bytes, "x").unwrap_err().to_string();
        assert!(err.contains("association rows"), "{err}");
        let mut d = dialogue(2);
        d.interactions[1].image_index = Some(vec![7]);
        let err = parse(&serde_json::to_vec(&vec![d]).unwrap(), "x").unwrap_err().to_string();
        assert!(err.contains("image index 7"), "{err}");
    }

    #[test]
    fn round_trips_through_json() {
        let data = load(&train_path()).unwrap();
        let again = parse(&serde_json::to_vec(&data).unwrap(), "again").unwrap();
        assert_eq!(data, again);
    }
}

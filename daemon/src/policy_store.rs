//! Pushed policies on disk: `<state_dir>/policies/<sha256>.onnx` and `policy-state.json`, which
//! names the serving policy, the one before it (for rollback) and the highest bundle sequence
//! taken. Every file is written under a temporary name, fsynced, renamed and its directory
//! fsynced, so a crash (or kill -9) leaves the old state or the new one, never a mix.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A policy the device has served, as recorded on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub version: String,
    /// sha256 of the ONNX bytes (hex): also the file name.
    pub sha256: String,
    /// When its bundle was made (unix ms); 0 for the configured or built-in policy.
    pub created_unix_ms: u64,
}

/// `policy-state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreState {
    pub current: Option<StoredPolicy>,
    pub previous: Option<StoredPolicy>,
    /// The highest bundle sequence taken (adopted, or found to be the one serving): a bundle
    /// at or below it is refused, across restarts.
    #[serde(default)]
    pub sequence_high_water: u64,
    /// The current policy has not passed its health check yet (its first decisions): if tmod
    /// stops without having stopped cleanly, the next start goes back to the previous policy.
    #[serde(default)]
    pub on_trial: bool,
    /// tmod stopped cleanly while the current policy was on trial: its trial goes on.
    #[serde(default)]
    pub trial_stopped_cleanly: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// The policies directory.
#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
}

impl PolicyStore {
    /// The store in `<state_dir>/policies`, created at the first save (a read-only state
    /// directory only makes saves fail: the pushed policy is then refused with the reason).
    pub fn open(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("policies") }
    }

    fn create_dir(&self) -> Result<(), StoreError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| StoreError::Io { path: self.dir.clone(), source })
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("policy-state.json")
    }

    fn onnx_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.onnx"))
    }

    /// The recorded state; none recorded yet is the default.
    pub fn state(&self) -> Result<StoreState, StoreError> {
        let path = self.state_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Corrupt { path, reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoreState::default()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Records `state`, then deletes policy files it no longer names.
    pub fn save_state(&self, state: &StoreState) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| StoreError::Corrupt { path: self.state_path(), reason: e.to_string() })?;
        self.create_dir()?;
        write_atomically(&self.state_path(), &json)?;
        let keep: Vec<String> = [&state.current, &state.previous]
            .into_iter()
            .flatten()
            .map(|p| format!("{}.onnx", p.sha256))
            .collect();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".onnx") && !keep.contains(&name) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    /// Stores ONNX bytes under their hash (idempotent).
    pub fn save_onnx(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.onnx_path(sha256);
        if path.is_file() {
            return Ok(());
        }
        self.create_dir()?;
        write_atomically(&path, bytes)
    }

    /// The ONNX bytes of `policy`, checked against its hash.
    pub fn load_onnx(&self, policy: &StoredPolicy) -> Result<Vec<u8>, StoreError> {
        let path = self.onnx_path(&policy.sha256);
        let bytes = std::fs::read(&path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
        let actual = tmo_protocol::bundle::sha256_hex(&bytes);
        if actual != policy.sha256 {
            return Err(StoreError::Corrupt { path, reason: format!("sha256 is {actual}") });
        }
        Ok(bytes)
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let io = |source| StoreError::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(version: &str, bytes: &[u8]) -> StoredPolicy {
        StoredPolicy {
            version: version.into(),
            sha256: tmo_protocol::bundle::sha256_hex(bytes),
            created_unix_ms: 1,
        }
    }

    #[test]
    fn state_and_files_round_trip_and_old_files_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PolicyStore::open(dir.path());
        assert_eq!(store.state().expect("state"), StoreState::default());
        let (a, b, c) = (b"policy a".as_slice(), b"policy b".as_slice(), b"policy c".as_slice());
        for bytes in [a, b, c] {
            store.save_onnx(&tmo_protocol::bundle::sha256_hex(bytes), bytes).expect("save");
        }
        let state = StoreState {
            current: Some(stored("c", c)),
            previous: Some(stored("b", b)),
            sequence_high_water: 1_790_000_000_000,
            on_trial: true,
            trial_stopped_cleanly: false,
        };
        store.save_state(&state).expect("save state");
        assert_eq!(PolicyStore::open(dir.path()).state().expect("state"), state);
        assert_eq!(store.load_onnx(&stored("b", b)).expect("b"), b);
        assert!(store.load_onnx(&stored("a", a)).is_err(), "a is no longer named, so it was deleted");
    }

    #[test]
    fn a_changed_file_and_a_corrupt_state_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PolicyStore::open(dir.path());
        let p = stored("a", b"policy a");
        store.save_onnx(&p.sha256, b"policy a").expect("save");
        std::fs::write(dir.path().join("policies").join(format!("{}.onnx", p.sha256)), b"policy A")
            .expect("edit");
        assert!(matches!(store.load_onnx(&p), Err(StoreError::Corrupt { .. })));
        std::fs::write(dir.path().join("policies/policy-state.json"), b"{\"current\": ").expect("torn");
        assert!(matches!(store.state(), Err(StoreError::Corrupt { .. })));
    }
}

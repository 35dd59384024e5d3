//! What the fleet manager pushed to each group: every signed bundle, so that a rollback signs
//! an earlier policy again under a newer sequence (replacing the retained bundle, so it holds
//! across the devices' reconnects and restarts), and so that a push's sequence is above every
//! earlier one of the group even when the clock went back.
//!
//! `<dir>/<group>/<sequence, 20 digits>.bundle` holds the bundle's CBOR body, written under a
//! temporary name, fsynced, then renamed.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use tmo_protocol::bundle::sha256_hex;
use tmo_protocol::codec::CborMessage;
use tmo_protocol::{GroupName, PolicyBundle, PolicyManifest};

use crate::push::{BundleSpec, PushError};

/// Largest bundle file read back (a bundle must fit one MQTT packet anyway).
const MAX_BUNDLE_BYTES: usize = 256 << 20;

/// Why the history could not be read or written, or holds nothing to go back to.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not a bundle, or its ONNX does not match its manifest.
    #[error("{path}: not a pushed bundle: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No earlier push to go back to.
    #[error("{0}")]
    NothingToRollBackTo(String),
    /// Encoding failed.
    #[error(transparent)]
    Encode(#[from] tmo_protocol::EncodeError),
}

/// A bundle pushed earlier, with its manifest.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The manifest (decoded from the bundle; the ONNX bytes match it).
    pub manifest: PolicyManifest,
    /// The bundle as it was published.
    pub bundle: PolicyBundle,
}

/// The push history in one directory.
#[derive(Debug, Clone)]
pub struct PushHistory {
    dir: PathBuf,
}

impl PushHistory {
    /// The history in `dir` (created at the first push).
    pub fn open(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Where `tmoctl fleet` keeps it unless told: `$TMO_FLEET_HISTORY`, else
    /// `$XDG_STATE_HOME/tmo-edge/pushes`, else `$HOME/.local/state/tmo-edge/pushes`.
    pub fn default_dir() -> Option<PathBuf> {
        let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        env("TMO_FLEET_HISTORY")
            .or_else(|| env("XDG_STATE_HOME").map(|d| d.join("tmo-edge/pushes")))
            .or_else(|| env("HOME").map(|d| d.join(".local/state/tmo-edge/pushes")))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn group_dir(&self, group: &GroupName) -> PathBuf {
        self.dir.join(group.as_str())
    }

    /// Every push to `group`, oldest sequence first.
    pub fn pushes(&self, group: &GroupName) -> Result<Vec<Pushed>, HistoryError> {
        let dir = self.group_dir(group);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HistoryError::Io { path, source }
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&dir)(e)),
        };
        let mut files = Vec::new();
        for entry in entries {
            let path = entry.map_err(io(&dir))?.path();
            if path.extension().is_some_and(|e| e == "bundle") {
                files.push(path);
            }
        }
        files.sort();
        let mut pushes = Vec::with_capacity(files.len());
        for path in files {
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let corrupt = |reason: String| HistoryError::Corrupt { path: path.clone(), reason };
            let bundle =
                PolicyBundle::from_cbor(&bytes, MAX_BUNDLE_BYTES).map_err(|e| corrupt(e.to_string()))?;
            let manifest: PolicyManifest = ciborium::from_reader(bundle.manifest.as_slice())
                .map_err(|e| corrupt(format!("manifest: {e}")))?;
            if sha256_hex(&bundle.onnx) != manifest.onnx_sha256 {
                return Err(corrupt("the ONNX bytes do not have the manifest's sha256".into()));
            }
            pushes.push(Pushed { manifest, bundle });
        }
        pushes.sort_by_key(|p| p.manifest.sequence);
        Ok(pushes)
    }

    /// The sequence for a new push to `group` at `now_unix_ms`: the time, or one above the
    /// group's last push when that is later (a clock that went back).
    pub fn next_sequence(&self, group: &GroupName, now_unix_ms: u64) -> Result<u64, HistoryError> {
        let last = self.pushes(group)?.last().map_or(0, |p| p.manifest.sequence);
        Ok(now_unix_ms.max(last + 1))
    }

    /// Records a published bundle of `group`; returns its file.
    pub fn record(&self, group: &GroupName, bundle: &PolicyBundle) -> Result<PathBuf, HistoryError> {
        let manifest: PolicyManifest =
            ciborium::from_reader(bundle.manifest.as_slice()).map_err(|e| HistoryError::Corrupt {
                path: PathBuf::from("(bundle to record)"),
                reason: format!("manifest: {e}"),
            })?;
        let dir = self.group_dir(group);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HistoryError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(format!("{:020}.bundle", manifest.sequence));
        let temporary = dir.join(format!(".{:020}.bundle.tmp", manifest.sequence));
        let body = bundle.to_cbor()?;
        let mut file = std::fs::File::create(&temporary).map_err(io(&temporary))?;
        file.write_all(&body).and_then(|()| file.sync_all()).map_err(io(&temporary))?;
        std::fs::rename(&temporary, &path).map_err(io(&path))?;
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(io(&dir))?;
        Ok(path)
    }

    /// What a rollback of `group` goes back to: the newest push of `to_version`, or without
    /// it the newest push of another version than the latest push's.
    pub fn rollback_target(
        &self,
        group: &GroupName,
        to_version: Option<&str>,
    ) -> Result<Pushed, HistoryError> {
        let pushes = self.pushes(group)?;
        let Some(latest) = pushes.last() else {
            return Err(self.nothing_pushed(group));
        };
        let current = latest.manifest.version.as_str();
        let Some(wanted) = to_version else {
            return newest_other(&pushes, group, current);
        };
        if wanted == current {
            return Err(HistoryError::NothingToRollBackTo(format!(
                "{current} is the group's latest push already"
            )));
        }
        pushes.iter().rev().find(|p| p.manifest.version == wanted).cloned().ok_or_else(|| {
            HistoryError::NothingToRollBackTo(format!(
                "no push of version {wanted} to group {group} is recorded in {}",
                self.dir.display()
            ))
        })
    }

    /// What a rollback from `current` (pushed last, or about to be) goes back to: the newest
    /// push of `group` of another version.
    pub fn rollback_target_from(&self, group: &GroupName, current: &str) -> Result<Pushed, HistoryError> {
        let pushes = self.pushes(group)?;
        if pushes.is_empty() {
            return Err(self.nothing_pushed(group));
        }
        newest_other(&pushes, group, current)
    }

    fn nothing_pushed(&self, group: &GroupName) -> HistoryError {
        HistoryError::NothingToRollBackTo(format!(
            "no push to group {group} is recorded in {}: push the earlier policy again with `tmoctl fleet \
             push`, or give the history directory it was pushed from (--history)",
            self.dir.display()
        ))
    }
}

/// The newest of `pushes` of another version than `current`.
fn newest_other(pushes: &[Pushed], group: &GroupName, current: &str) -> Result<Pushed, HistoryError> {
    pushes.iter().rev().find(|p| p.manifest.version != current).cloned().ok_or_else(|| {
        HistoryError::NothingToRollBackTo(format!(
            "every recorded push to group {group} is of version {current}: nothing earlier to go back to"
        ))
    })
}

/// Signs `earlier`'s policy again for `spec`'s group, devices, sequence, expiry and canary
/// share: its version, schema, hashes, opset, training data, minimum daemon version and
/// making time stay, so devices that still serve it only raise their sequence mark.
pub fn rebundle(earlier: &Pushed, spec: &BundleSpec, key: &SigningKey) -> Result<PolicyBundle, PushError> {
    if spec.sequence <= earlier.manifest.sequence {
        return Err(PushError::InvalidSpec(format!(
            "sequence {} is not above the earlier bundle's {}",
            spec.sequence, earlier.manifest.sequence
        )));
    }
    let manifest = PolicyManifest {
        group: spec.group.to_string(),
        devices: spec.devices.iter().map(ToString::to_string).collect(),
        sequence: spec.sequence,
        expires_unix_ms: spec.expires_unix_ms,
        canary_percent: spec.canary_percent,
        ..earlier.manifest.clone()
    };
    Ok(PolicyBundle::sign(&manifest, earlier.bundle.onnx.clone(), key)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[5; 32])
    }

    fn push(history: &PushHistory, group: &GroupName, version: &str, sequence: u64) -> PolicyBundle {
        let spec = BundleSpec { version: Some(version.into()), sequence, ..BundleSpec::new(group.clone()) };
        let bundle = crate::build_bundle(policy_onnx::DEFAULT_POLICY.to_vec(), &spec, &key()).unwrap();
        history.record(group, &bundle).unwrap();
        bundle
    }

    #[test]
    fn rollback_goes_back_to_the_push_before_the_latest_and_signs_it_newer() {
        let dir = tempfile::tempdir().unwrap();
        let history = PushHistory::open(dir.path());
        let group: GroupName = "kitchens".parse().unwrap();
        assert!(matches!(history.rollback_target(&group, None), Err(HistoryError::NothingToRollBackTo(_))));
        assert_eq!(history.next_sequence(&group, 5).unwrap(), 5);
        push(&history, &group, "p-1", 10);
        push(&history, &group, "p-2", 20);
        push(&history, &group, "p-2", 30);
        // A clock behind the last push still gives a higher sequence.
        assert_eq!(history.next_sequence(&group, 7).unwrap(), 31);
        assert_eq!(history.next_sequence(&group, 1_000).unwrap(), 1_000);

        let target = history.rollback_target(&group, None).unwrap();
        assert_eq!((target.manifest.version.as_str(), target.manifest.sequence), ("p-1", 10));
        assert!(history.rollback_target(&group, Some("p-2")).is_err(), "p-2 is the latest");
        assert!(history.rollback_target(&group, Some("p-9")).is_err());
        let other: GroupName = "labs".parse().unwrap();
        assert!(history.rollback_target(&other, None).is_err());

        let spec = BundleSpec { sequence: 40, ..BundleSpec::new(group.clone()) };
        let again = rebundle(&target, &spec, &key()).unwrap();
        let manifest = again.verify(&[key().verifying_key()]).unwrap();
        assert_eq!((manifest.version.as_str(), manifest.sequence), ("p-1", 40));
        assert_eq!(manifest.onnx_sha256, target.manifest.onnx_sha256);
        assert_eq!(manifest.created_unix_ms, target.manifest.created_unix_ms);
        let stale = BundleSpec { sequence: 10, ..BundleSpec::new(group.clone()) };
        assert!(rebundle(&target, &stale, &key()).is_err());
    }

    #[test]
    fn a_damaged_history_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let history = PushHistory::open(dir.path());
        let group: GroupName = "kitchens".parse().unwrap();
        push(&history, &group, "p-1", 10);
        let file = dir.path().join("kitchens").join(format!("{:020}.bundle", 10));
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap(); // torn by hand
        let e = history.pushes(&group).unwrap_err();
        assert!(
            matches!(e, HistoryError::Corrupt { .. })
                && e.to_string().contains("00000000000000000010.bundle"),
            "{e}"
        );
    }
}

//! Policy bundles: build (manifest + ONNX + Ed25519 signature) and publish retained on a group.
//!
//! A bundle travels as one whole frame in one MQTT packet: a retained message is a single
//! publish, so it cannot be chunked. A bundle too large for the broker's packet limit is
//! refused before anything is sent.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use policy_onnx::{LoadOptions, Policy, PolicyError};
use sha2::{Digest, Sha256};
use tmo_protocol::chunk::{SplitError, WHOLE_HEADER_BYTES, new_message_id, split};
use tmo_protocol::codec::{CborMessage, EncodeError};
use tmo_protocol::link::{LinkConfig, Message, Publisher, QoS};
use tmo_protocol::{DeviceId, GroupName, PolicyBundle, PolicyManifest, Topic};

use crate::net::{self, NetError};

/// The manifest's schema name of policy contract v1 (27 floats in, 9 scores out), whose
/// ONNX files carry the schema name [`policy_onnx::SCHEMA_V1`].
pub const SCHEMA: &str = "v1";
/// The manifest's schema name of policy contract v2 (37 floats in: v1 and the cost table).
pub const SCHEMA_V2: &str = "v2";
/// The first daemon version that decides with contract v2: a v2 bundle never asks for less, so
/// older daemons refuse it by its minimum version.
pub const V2_MIN_DAEMON_VERSION: &str = "0.2.0";

/// Why a bundle could not be built or published.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The ONNX file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The ONNX is not a policy of the v1 contract (devices would refuse it).
    #[error("the policy is not a valid policy of contract {SCHEMA} or {SCHEMA_V2}: {0}")]
    InvalidPolicy(#[source] PolicyError),
    /// A manifest value is out of range.
    #[error("invalid bundle: {0}")]
    InvalidSpec(String),
    /// Encoding failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Framing failed.
    #[error(transparent)]
    Split(#[from] SplitError),
    /// The bundle does not fit one MQTT packet of this broker.
    #[error(
        "the bundle is {bundle_bytes} bytes, more than the {max_payload_bytes} bytes one retained MQTT packet can \
         carry here (broker/configured packet limit {max_packet_bytes}); a retained bundle cannot be chunked: \
         raise the broker's max_packet_size and --max-packet-bytes, or push a smaller policy"
    )]
    TooLarge {
        /// Framed bundle size.
        bundle_bytes: usize,
        /// Largest payload of one packet on the policy topic.
        max_payload_bytes: usize,
        /// The packet limit.
        max_packet_bytes: usize,
    },
    /// The broker could not be reached or did not take the publish.
    #[error(transparent)]
    Net(#[from] NetError),
}

/// How long a bundle stays valid by default: a device that comes back after longer refuses the
/// retained bundle as expired (and reports it) until the group is pushed again.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// What goes into a manifest besides what the ONNX itself tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSpec {
    /// The device group it is for.
    pub group: GroupName,
    /// Only these devices of the group (empty: all of them).
    pub devices: Vec<DeviceId>,
    /// Above every earlier bundle's of the group (default: now in unix ms; see
    /// [`crate::history::PushHistory::next_sequence`]).
    pub sequence: u64,
    /// When devices stop taking it, unix ms (default: [`DEFAULT_VALIDITY`] from now).
    pub expires_unix_ms: u64,
    /// The version; `None`: the version in the ONNX's own metadata manifest, else the first
    /// 12 hex digits of its sha256.
    pub version: Option<String>,
    /// Share of the group's devices that take it, 1..=100 (`None`: all).
    pub canary_percent: Option<u8>,
    /// sha256 of the training data (see [`training_data_sha256`]).
    pub training_data_sha256: Option<String>,
    /// Oldest daemon version that may load it.
    pub min_daemon_version: String,
    /// When it was made, unix ms.
    pub created_unix_ms: u64,
}

impl BundleSpec {
    /// A spec for all devices of `group`, versioned from the ONNX, for daemons of this build or
    /// later, made now with the time as its sequence, valid for [`DEFAULT_VALIDITY`].
    pub fn new(group: GroupName) -> Self {
        let now = crate::unix_ms_now();
        Self {
            group,
            devices: Vec::new(),
            sequence: now,
            expires_unix_ms: now + DEFAULT_VALIDITY.as_millis() as u64,
            version: None,
            canary_percent: None,
            training_data_sha256: None,
            min_daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            created_unix_ms: now,
        }
    }
}

/// Checks `onnx` against the policy contract (tract loads and probes it), fills the manifest
/// (version, schema, sha256, size, opset, ...) and signs it with `key`.
pub fn build_bundle(onnx: Vec<u8>, spec: &BundleSpec, key: &SigningKey) -> Result<PolicyBundle, PushError> {
    if let Some(p) = spec.canary_percent
        && !(1..=100).contains(&p)
    {
        return Err(PushError::InvalidSpec(format!("canary percent {p} is outside 1..=100")));
    }
    if spec.version.as_deref().is_some_and(|v| v.trim().is_empty()) {
        return Err(PushError::InvalidSpec("empty version".into()));
    }
    if spec.sequence == 0 {
        return Err(PushError::InvalidSpec("sequence 0 (sequences start at 1)".into()));
    }
    if spec.expires_unix_ms <= spec.created_unix_ms {
        return Err(PushError::InvalidSpec(format!(
            "expiry {} is not after the bundle's making {}",
            spec.expires_unix_ms, spec.created_unix_ms
        )));
    }
    let policy = Policy::from_bytes(&onnx, &LoadOptions::default()).map_err(PushError::InvalidPolicy)?;
    let info = policy.info();
    let manifest = PolicyManifest {
        version: spec.version.clone().unwrap_or_else(|| info.version()),
        schema: manifest_schema(&info.schema)?.to_owned(),
        onnx_sha256: String::new(),
        onnx_size_bytes: 0,
        opset: info.opset.and_then(|o| u32::try_from(o).ok()),
        training_data_sha256: spec.training_data_sha256.clone(),
        min_daemon_version: if info.schema == policy_onnx::SCHEMA_V2 {
            later_version(&spec.min_daemon_version, V2_MIN_DAEMON_VERSION).to_owned()
        } else {
            spec.min_daemon_version.clone()
        },
        created_unix_ms: spec.created_unix_ms,
        canary_percent: spec.canary_percent,
        group: spec.group.to_string(),
        devices: spec.devices.iter().map(ToString::to_string).collect(),
        sequence: spec.sequence,
        expires_unix_ms: spec.expires_unix_ms,
    }
    .describe(&onnx);
    Ok(PolicyBundle::sign(&manifest, onnx, key)?)
}

/// The manifest's schema name for an ONNX's schema name.
fn manifest_schema(onnx_schema: &str) -> Result<&'static str, PushError> {
    match onnx_schema {
        policy_onnx::SCHEMA_V1 => Ok(SCHEMA),
        policy_onnx::SCHEMA_V2 => Ok(SCHEMA_V2),
        _ => {
            Err(PushError::InvalidSpec(format!("policy schema {onnx_schema:?} has no manifest schema name")))
        }
    }
}

/// The later of two `major.minor.patch` versions (`b` when `a` does not parse).
fn later_version<'v>(a: &'v str, b: &'v str) -> &'v str {
    let parse = |v: &str| -> Option<(u64, u64, u64)> {
        let mut parts = v.trim().trim_start_matches('v').split('.').map(|p| p.parse::<u64>().ok());
        Some((parts.next()??, parts.next().unwrap_or(Some(0))?, parts.next().unwrap_or(Some(0))?))
    };
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) if x >= y => a,
        _ => b,
    }
}

/// Reads an ONNX file and builds its bundle (see [`build_bundle`]).
pub fn build_bundle_from_file(
    path: &Path,
    spec: &BundleSpec,
    key: &SigningKey,
) -> Result<PolicyBundle, PushError> {
    let onnx = std::fs::read(path).map_err(|source| PushError::Read { path: path.to_path_buf(), source })?;
    build_bundle(onnx, spec, key)
}

/// The manifest a bundle carries, decoded without checking the signature (for printing).
pub fn manifest_of(bundle: &PolicyBundle) -> Option<PolicyManifest> {
    ciborium::from_reader(bundle.manifest.as_slice()).ok()
}

/// sha256 (hex) of training data: a file's bytes, or for a directory every regular file below
/// it in path order, each as its relative path, a NUL, its length (8 bytes, big-endian) and
/// its bytes, so that renaming or moving data changes the hash.
pub fn training_data_sha256(path: &Path) -> Result<String, PushError> {
    let read_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| PushError::Read { path: p, source }
    };
    let mut hasher = Sha256::new();
    let meta = std::fs::metadata(path).map_err(read_err(path))?;
    if meta.is_file() {
        hash_file(path, &mut hasher).map_err(read_err(path))?;
        return Ok(hex::encode(hasher.finalize()));
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(read_err(&dir))? {
            let entry = entry.map_err(read_err(&dir))?;
            let kind = entry.file_type().map_err(read_err(&entry.path()))?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    for file in files {
        let relative = file.strip_prefix(path).unwrap_or(&file);
        hasher.update(relative.to_string_lossy().as_bytes());
        hasher.update([0u8]);
        let len = std::fs::metadata(&file).map_err(read_err(&file))?.len();
        hasher.update(len.to_be_bytes());
        hash_file(&file, &mut hasher).map_err(read_err(&file))?;
    }
    Ok(hex::encode(hasher.finalize()))
}

fn hash_file(path: &Path, hasher: &mut Sha256) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

/// What a publish of a bundle sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedBundle {
    /// The topic.
    pub topic: String,
    /// The payload (framed CBOR) size.
    pub payload_bytes: usize,
}

/// Publishes any bundle (also a deliberately broken one: nothing is checked here) retained,
/// QoS 1, as one whole frame on the group's policy topic, and waits for the broker's PUBACK.
pub async fn publish_bundle(
    publisher: &Publisher,
    group: &GroupName,
    bundle: &PolicyBundle,
    timeout: Duration,
) -> Result<PublishedBundle, PushError> {
    let topic = Topic::Policy(group.clone()).name();
    let template = Message::new(topic.clone(), QoS::AtLeastOnce, Bytes::new()).retained(true);
    let body = bundle.to_cbor()?;
    let max_payload_bytes = publisher.max_frame_bytes(&template);
    if body.len() + WHOLE_HEADER_BYTES > max_payload_bytes {
        return Err(PushError::TooLarge {
            bundle_bytes: body.len() + WHOLE_HEADER_BYTES,
            max_payload_bytes,
            max_packet_bytes: publisher.max_packet_bytes(),
        });
    }
    let mut frames = split(&body, max_payload_bytes, new_message_id())?;
    let frame = frames.pop().unwrap_or_default();
    let payload_bytes = frame.len();
    let message = Message { payload: Bytes::from(frame), ..template };
    net::publish_confirmed(publisher, message, timeout).await?;
    Ok(PublishedBundle { topic, payload_bytes })
}

/// Connects with `config`, publishes the bundle (see [`publish_bundle`]) and disconnects.
pub async fn push_bundle(
    config: &LinkConfig,
    group: &GroupName,
    bundle: &PolicyBundle,
    timeout: Duration,
) -> Result<PublishedBundle, PushError> {
    let link = net::connect(config, Vec::new(), timeout).await?;
    let result = publish_bundle(&link.publisher(), group, bundle, timeout).await;
    link.shutdown(Duration::from_secs(2)).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[3; 32])
    }

    fn spec() -> BundleSpec {
        BundleSpec::new("kitchens".parse().unwrap())
    }

    #[test]
    fn the_manifest_describes_the_onnx_and_verifies() {
        let onnx = policy_onnx::DEFAULT_POLICY.to_vec();
        let spec = BundleSpec {
            canary_percent: Some(25),
            version: Some("p-7".into()),
            devices: vec!["kitchen-a".parse().unwrap()],
            ..spec()
        };
        let bundle = build_bundle(onnx.clone(), &spec, &key()).unwrap();
        let manifest = bundle.verify(&[key().verifying_key()]).unwrap();
        assert_eq!(manifest.version, "p-7");
        // The default policy reads contract v2.
        assert_eq!(manifest.schema, "v2");
        assert_eq!(manifest.onnx_size_bytes, onnx.len() as u64);
        assert_eq!(manifest.onnx_sha256, tmo_protocol::bundle::sha256_hex(&onnx));
        assert_eq!(manifest.opset, Some(17));
        assert_eq!(manifest.canary_percent, Some(25));
        assert_eq!(manifest.min_daemon_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(
            (manifest.group.as_str(), manifest.devices.as_slice()),
            ("kitchens", &["kitchen-a".to_owned()][..])
        );
        assert_eq!(manifest.sequence, spec.sequence);
        assert_eq!(manifest.expires_unix_ms - manifest.created_unix_ms, DEFAULT_VALIDITY.as_millis() as u64);
        assert_eq!(manifest_of(&bundle), Some(manifest));
    }

    /// A v2 bundle never asks for a daemon older than the first that decides with v2, so such
    /// daemons refuse it by version; a v1 bundle asks for what the spec says.
    #[test]
    fn v2_bundles_ask_for_a_v2_daemon() {
        let old = BundleSpec { min_daemon_version: "0.1.0".into(), ..spec() };
        let v2 = build_bundle(policy_onnx::DEFAULT_POLICY.to_vec(), &old, &key()).unwrap();
        let manifest = v2.verify(&[key().verifying_key()]).unwrap();
        assert_eq!(
            (manifest.schema.as_str(), manifest.min_daemon_version.as_str()),
            ("v2", V2_MIN_DAEMON_VERSION)
        );
        let newer = BundleSpec { min_daemon_version: "0.3.1".into(), ..spec() };
        let v2 = build_bundle(policy_onnx::DEFAULT_POLICY.to_vec(), &newer, &key()).unwrap();
        assert_eq!(v2.verify(&[key().verifying_key()]).unwrap().min_daemon_version, "0.3.1");
        use policy_onnx::mlp::{Activation, Dense, Mlp};
        let layer = Dense {
            inputs: 27,
            outputs: 9,
            weights: vec![0.01; 27 * 9],
            bias: vec![0.0; 9],
            activation: Activation::Identity,
        };
        let mlp = Mlp::new(vec![layer]).unwrap();
        let onnx = policy_onnx::export::mlp_to_onnx(&mlp, &policy_onnx::export::ExportOptions::default());
        let v1 = build_bundle(onnx, &old, &key()).unwrap();
        let manifest = v1.verify(&[key().verifying_key()]).unwrap();
        assert_eq!((manifest.schema.as_str(), manifest.min_daemon_version.as_str()), ("v1", "0.1.0"));
    }

    #[test]
    fn garbage_and_bad_specs_are_refused_before_signing() {
        assert!(matches!(
            build_bundle(b"not onnx".to_vec(), &spec(), &key()),
            Err(PushError::InvalidPolicy(_))
        ));
        let onnx = policy_onnx::DEFAULT_POLICY.to_vec();
        for bad in [Some(0), Some(101)] {
            let spec = BundleSpec { canary_percent: bad, ..spec() };
            assert!(matches!(build_bundle(onnx.clone(), &spec, &key()), Err(PushError::InvalidSpec(_))));
        }
        let base = spec();
        for bad in [
            BundleSpec { version: Some(" ".into()), ..spec() },
            BundleSpec { sequence: 0, ..spec() },
            BundleSpec { expires_unix_ms: base.created_unix_ms, ..spec() },
        ] {
            assert!(matches!(build_bundle(onnx.clone(), &bad, &key()), Err(PushError::InvalidSpec(_))));
        }
    }

    #[test]
    fn training_data_hash_covers_names_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("2026-11-24")).unwrap();
        std::fs::write(dir.path().join("2026-11-24/a.jsonl"), b"{}\n").unwrap();
        let h1 = training_data_sha256(dir.path()).unwrap();
        assert_eq!(h1, training_data_sha256(dir.path()).unwrap());
        std::fs::rename(dir.path().join("2026-11-24/a.jsonl"), dir.path().join("2026-11-24/b.jsonl"))
            .unwrap();
        assert_ne!(h1, training_data_sha256(dir.path()).unwrap());
        let file = dir.path().join("2026-11-24/b.jsonl");
        assert_eq!(training_data_sha256(&file).unwrap(), tmo_protocol::bundle::sha256_hex(b"{}\n"));
        assert!(matches!(training_data_sha256(&dir.path().join("missing")), Err(PushError::Read { .. })));
    }
}

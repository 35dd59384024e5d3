//! Policy bundles: the envelope (manifest, ONNX bytes, Ed25519 signature) published retained on
//! [`crate::Topic::Policy`].
//!
//! The signature covers the manifest's exact CBOR bytes, which are carried as a byte string, so
//! that no re-encoding is needed to verify; the manifest holds the ONNX bytes' sha256 and size,
//! so the signature covers the model too. What a device does with a verified bundle (schema
//! check, probe run, atomic swap) is the daemon's business.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::{CborMessage, EncodeError, MessageKind};
use crate::topic::{DeviceId, GroupName};

/// What a policy bundle claims about its model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyManifest {
    /// The policy version (free text, unique per push).
    pub version: String,
    /// Observation schema, e.g. `v1` (27 floats in, 9 scores out).
    pub schema: String,
    /// Lower-case hex sha256 of the ONNX bytes.
    pub onnx_sha256: String,
    /// Length of the ONNX bytes.
    pub onnx_size_bytes: u64,
    /// ONNX opset of the model.
    pub opset: Option<u32>,
    /// Hash of the training data the policy was fitted on.
    pub training_data_sha256: Option<String>,
    /// Oldest daemon version that may load it.
    pub min_daemon_version: String,
    /// When it was made (unix ms).
    pub created_unix_ms: u64,
    /// Share of the group's devices that take it, in percent (None: all).
    pub canary_percent: Option<u8>,
    /// The device group the bundle was made for: a device of another group refuses it. Empty
    /// in bundles made before bundles were bound (refused as [`BindingError::Unbound`]).
    #[serde(default)]
    pub group: String,
    /// The devices of the group that may take it; empty: every device of the group.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Increases with every bundle made for the group (`tmoctl fleet push` takes the time in
    /// ms, above every earlier push it knows): a device takes only a bundle above the highest
    /// it has taken, and keeps that mark across restarts, so an older bundle cannot be
    /// replayed to downgrade it.
    #[serde(default)]
    pub sequence: u64,
    /// After this time (unix ms) no device takes the bundle.
    #[serde(default)]
    pub expires_unix_ms: u64,
}

/// The signed envelope (CBOR body).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyBundle {
    /// The manifest's CBOR bytes, as signed.
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
    /// The ONNX model.
    #[serde(with = "serde_bytes")]
    pub onnx: Vec<u8>,
    /// Ed25519 public key of the signer (32 bytes).
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// Ed25519 signature of `manifest` (64 bytes).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for PolicyBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyBundle")
            .field("manifest_bytes", &self.manifest.len())
            .field("onnx_bytes", &self.onnx.len())
            .field("public_key", &hex::encode(&self.public_key))
            .finish()
    }
}

impl CborMessage for PolicyBundle {
    const KIND: MessageKind = MessageKind::PolicyBundle;
}

/// Why a bundle is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The signer's key is not in the trust list.
    #[error("bundle signed by key {0}, which is not trusted")]
    UnknownKey(String),
    /// The public key or signature has the wrong length or is not a valid point.
    #[error("malformed key or signature: {0}")]
    MalformedSignature(String),
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// The manifest bytes are not a manifest.
    #[error("malformed manifest: {0}")]
    MalformedManifest(String),
    /// The ONNX bytes do not have the manifest's hash.
    #[error("ONNX sha256 {actual} differs from the manifest's {expected}")]
    HashMismatch {
        /// From the manifest.
        expected: String,
        /// Of the bytes.
        actual: String,
    },
    /// The ONNX bytes do not have the manifest's size.
    #[error("ONNX is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// From the manifest.
        expected: u64,
        /// Of the bytes.
        actual: u64,
    },
}

/// Why a verified bundle is not for this device now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// Made before bundles named their group, sequence and expiry.
    #[error("the bundle names no group, sequence or expiry (made by an older tmoctl): push it again")]
    Unbound,
    /// Made for another group.
    #[error("the bundle is for group {bundle:?}, this device is in group {device:?}")]
    OtherGroup {
        /// The bundle's group.
        bundle: String,
        /// The device's group.
        device: String,
    },
    /// The bundle lists its devices, and not this one.
    #[error("the bundle is for {listed} named devices of the group, not this one")]
    NotListed {
        /// How many devices it names.
        listed: usize,
    },
    /// Past its expiry.
    #[error("the bundle expired at {expires_unix_ms} (unix ms); it is {now_unix_ms}")]
    Expired {
        /// The bundle's expiry.
        expires_unix_ms: u64,
        /// The device's clock.
        now_unix_ms: u64,
    },
    /// Not above the highest sequence the device has taken: a replayed or older bundle.
    #[error(
        "sequence {sequence} is not above {high_water}, the highest this device has taken: an older \
         bundle (a replay, or a policy rolled back) is not taken again"
    )]
    NotNewer {
        /// The bundle's sequence.
        sequence: u64,
        /// The device's high-water mark.
        high_water: u64,
    },
}

/// A public key from its hex form (64 hex digits, surrounding whitespace ignored): how trust
/// lists and `.pub` files hold the keys that sign bundles.
pub fn public_key_from_hex(text: &str) -> Result<VerifyingKey, String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("not hex ({e})"))?;
    let bytes: [u8; 32] =
        bytes.as_slice().try_into().map_err(|_| format!("{} bytes, expected 32", bytes.len()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not a valid curve point ({e})"))
}

/// Lower-case hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl PolicyBundle {
    /// Signs `manifest` (whose hash and size fields must describe `onnx`; use
    /// [`PolicyManifest::describe`] to fill them) with `key`.
    pub fn sign(manifest: &PolicyManifest, onnx: Vec<u8>, key: &SigningKey) -> Result<Self, EncodeError> {
        let mut manifest_bytes = Vec::new();
        ciborium::into_writer(manifest, &mut manifest_bytes)
            .map_err(|e| EncodeError::Cbor { what: "policy manifest", reason: e.to_string() })?;
        let signature = key.sign(&manifest_bytes);
        Ok(Self {
            manifest: manifest_bytes,
            onnx,
            public_key: key.verifying_key().to_bytes().to_vec(),
            signature: signature.to_bytes().to_vec(),
        })
    }

    /// Verifies the signature against the trust list, then the ONNX hash and size; returns
    /// the manifest.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<PolicyManifest, BundleError> {
        let key_bytes: [u8; 32] = self.public_key.as_slice().try_into().map_err(|_| {
            BundleError::MalformedSignature(format!("public key of {} bytes", self.public_key.len()))
        })?;
        let key = trusted
            .iter()
            .find(|k| k.as_bytes() == &key_bytes)
            .ok_or_else(|| BundleError::UnknownKey(hex::encode(key_bytes)))?;
        let signature = Signature::from_slice(&self.signature)
            .map_err(|e| BundleError::MalformedSignature(e.to_string()))?;
        key.verify(&self.manifest, &signature).map_err(|_| BundleError::BadSignature)?;
        let manifest: PolicyManifest = ciborium::from_reader(self.manifest.as_slice())
            .map_err(|e| BundleError::MalformedManifest(e.to_string()))?;
        let actual_size = self.onnx.len() as u64;
        if actual_size != manifest.onnx_size_bytes {
            return Err(BundleError::SizeMismatch {
                expected: manifest.onnx_size_bytes,
                actual: actual_size,
            });
        }
        let actual = sha256_hex(&self.onnx);
        if actual != manifest.onnx_sha256 {
            return Err(BundleError::HashMismatch { expected: manifest.onnx_sha256, actual });
        }
        Ok(manifest)
    }
}

impl PolicyManifest {
    /// Sets the hash and size fields from the ONNX bytes.
    pub fn describe(mut self, onnx: &[u8]) -> Self {
        self.onnx_sha256 = sha256_hex(onnx);
        self.onnx_size_bytes = onnx.len() as u64;
        self
    }

    /// Whether the bundle is for `device` of `group` now, and newer than `high_water`, the
    /// highest sequence the device has taken: named group, listed device (when it lists
    /// them), not expired, sequence above the mark. The first failed check is the reason.
    pub fn check_binding(
        &self,
        group: &GroupName,
        device: &DeviceId,
        now_unix_ms: u64,
        high_water: u64,
    ) -> Result<(), BindingError> {
        if self.group.is_empty() || self.sequence == 0 || self.expires_unix_ms == 0 {
            return Err(BindingError::Unbound);
        }
        if self.group != group.as_str() {
            return Err(BindingError::OtherGroup { bundle: self.group.clone(), device: group.to_string() });
        }
        if !self.devices.is_empty() && !self.devices.iter().any(|d| d == device.as_str()) {
            return Err(BindingError::NotListed { listed: self.devices.len() });
        }
        if now_unix_ms >= self.expires_unix_ms {
            return Err(BindingError::Expired { expires_unix_ms: self.expires_unix_ms, now_unix_ms });
        }
        if self.sequence <= high_water {
            return Err(BindingError::NotNewer { sequence: self.sequence, high_water });
        }
        Ok(())
    }
}

/// Whether `device` is in the canary share of a push of `version` at `percent` (0..=100).
/// Stable: the same device, version and share give the same answer on every device and in
/// the fleet CLI; a larger share includes every device of a smaller one.
pub fn in_canary(device: &DeviceId, version: &str, percent: u8) -> bool {
    let digest = Sha256::new()
        .chain_update(version.as_bytes())
        .chain_update([0u8])
        .chain_update(device.as_str().as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let bucket = u64::from_be_bytes(first) % 10_000;
    bucket < u64::from(percent.min(100)) * 100
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn manifest() -> PolicyManifest {
        PolicyManifest {
            version: "p-5".into(),
            schema: "v1".into(),
            onnx_sha256: String::new(),
            onnx_size_bytes: 0,
            opset: Some(17),
            training_data_sha256: None,
            min_daemon_version: "0.1.0".into(),
            created_unix_ms: 1,
            canary_percent: None,
            group: "kitchens".into(),
            devices: Vec::new(),
            sequence: 10,
            expires_unix_ms: 2_000,
        }
    }

    /// Each binding is checked, in order, and names its reason; the mark is exclusive.
    #[test]
    fn bindings_refuse_other_groups_devices_expired_and_older_bundles() {
        let kitchens: GroupName = "kitchens".parse().unwrap();
        let device = DeviceId::new("kitchen-a").unwrap();
        let m = manifest();
        assert_eq!(m.check_binding(&kitchens, &device, 1_000, 9), Ok(()));
        assert_eq!(
            m.check_binding(&kitchens, &device, 1_000, 10),
            Err(BindingError::NotNewer { sequence: 10, high_water: 10 })
        );
        assert!(matches!(m.check_binding(&kitchens, &device, 2_000, 0), Err(BindingError::Expired { .. })));
        let other: GroupName = "labs".parse().unwrap();
        assert!(matches!(m.check_binding(&other, &device, 1_000, 0), Err(BindingError::OtherGroup { .. })));
        let listed = PolicyManifest { devices: vec!["kitchen-b".into()], ..manifest() };
        assert_eq!(
            listed.check_binding(&kitchens, &device, 1_000, 0),
            Err(BindingError::NotListed { listed: 1 })
        );
        let named = PolicyManifest { devices: vec!["kitchen-b".into(), "kitchen-a".into()], ..manifest() };
        assert_eq!(named.check_binding(&kitchens, &device, 1_000, 0), Ok(()));
        for unbound in [
            PolicyManifest { group: String::new(), ..manifest() },
            PolicyManifest { sequence: 0, ..manifest() },
            PolicyManifest { expires_unix_ms: 0, ..manifest() },
        ] {
            assert_eq!(unbound.check_binding(&kitchens, &device, 1_000, 0), Err(BindingError::Unbound));
        }
    }

    /// A manifest signed before the binding fields existed still decodes (and is then refused
    /// as unbound, with a reason, rather than as malformed).
    #[test]
    fn manifests_without_bindings_decode_as_unbound() {
        #[derive(Serialize)]
        struct Old {
            version: String,
            schema: String,
            onnx_sha256: String,
            onnx_size_bytes: u64,
            opset: Option<u32>,
            training_data_sha256: Option<String>,
            min_daemon_version: String,
            created_unix_ms: u64,
            canary_percent: Option<u8>,
        }
        let old = Old {
            version: "p-1".into(),
            schema: "v1".into(),
            onnx_sha256: String::new(),
            onnx_size_bytes: 0,
            opset: None,
            training_data_sha256: None,
            min_daemon_version: "0.1.0".into(),
            created_unix_ms: 1,
            canary_percent: None,
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&old, &mut bytes).unwrap();
        let m: PolicyManifest = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!((m.group.as_str(), m.sequence, m.expires_unix_ms), ("", 0, 0));
        let kitchens: GroupName = "kitchens".parse().unwrap();
        let device = DeviceId::new("kitchen-a").unwrap();
        assert_eq!(m.check_binding(&kitchens, &device, 1_000, 0), Err(BindingError::Unbound));
    }

    #[test]
    fn signed_bundle_verifies_after_a_cbor_round_trip() {
        let onnx = vec![7u8; 5000];
        let bundle = PolicyBundle::sign(&manifest().describe(&onnx), onnx, &key(1)).unwrap();
        let body = bundle.to_cbor().unwrap();
        let back = PolicyBundle::from_cbor(&body, 1 << 20).unwrap();
        let m = back.verify(&[key(2).verifying_key(), key(1).verifying_key()]).unwrap();
        assert_eq!(m.version, "p-5");
        assert_eq!(m.onnx_size_bytes, 5000);
    }

    #[test]
    fn tampering_is_refused_with_its_reason() {
        let onnx = vec![7u8; 5000];
        let good = PolicyBundle::sign(&manifest().describe(&onnx), onnx, &key(1)).unwrap();
        let trusted = [key(1).verifying_key()];
        assert!(matches!(good.verify(&[key(2).verifying_key()]), Err(BundleError::UnknownKey(_))));
        let mut flipped = good.clone();
        flipped.onnx[100] ^= 1;
        assert!(matches!(flipped.verify(&trusted), Err(BundleError::HashMismatch { .. })));
        let mut longer = good.clone();
        longer.onnx.push(0);
        assert!(matches!(longer.verify(&trusted), Err(BundleError::SizeMismatch { .. })));
        let mut forged = good.clone();
        forged.manifest[5] ^= 1;
        assert_eq!(forged.verify(&trusted), Err(BundleError::BadSignature));
        let mut short = good;
        short.signature.pop();
        assert!(matches!(short.verify(&trusted), Err(BundleError::MalformedSignature(_))));
    }

    #[test]
    fn canary_is_stable_and_about_the_right_share() {
        let devices: Vec<DeviceId> = (0..2000).map(|i| DeviceId::new(format!("d{i}")).unwrap()).collect();
        let ten = devices.iter().filter(|d| in_canary(d, "p-5", 10)).count();
        assert!((150..250).contains(&ten), "{ten}");
        for d in &devices {
            if in_canary(d, "p-5", 10) {
                assert!(in_canary(d, "p-5", 50));
            }
            assert!(in_canary(d, "p-5", 100));
            assert!(!in_canary(d, "p-5", 0));
        }
    }
}

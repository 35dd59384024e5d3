//! `PolicyBundle::verify`, as a device checks a retained bundle, two ways:
//!
//! - first byte 0: the rest is a CBOR body decoded as a bundle and verified against a trust
//!   list (only a bundle naming a trusted key can pass);
//! - otherwise: `[manifest length u16 BE][manifest CBOR][ONNX bytes]`, signed here with the
//!   trusted key, so that the fuzzer reaches what follows the signature (the manifest parser,
//!   the size and hash checks, the binding checks). A verified manifest must describe the ONNX.

#![no_main]

use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;
use tmo_protocol::bundle::sha256_hex;
use tmo_protocol::{CborMessage, DeviceId, GroupName, PolicyBundle, in_canary};

fn trusted() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn check(bundle: &PolicyBundle) {
    let trust = [SigningKey::from_bytes(&[8; 32]).verifying_key(), trusted().verifying_key()];
    match bundle.verify(&trust) {
        Ok(manifest) => {
            assert!(
                trust.iter().any(|k| k.as_bytes().as_slice() == bundle.public_key),
                "untrusted key passed"
            );
            assert_eq!(manifest.onnx_size_bytes, bundle.onnx.len() as u64);
            assert_eq!(manifest.onnx_sha256, sha256_hex(&bundle.onnx));
            let group: GroupName = "kitchens".parse().expect("group");
            let device = DeviceId::new("kitchen-a").expect("device");
            let _ = manifest.check_binding(&group, &device, 1_800_000_000_000, 5);
            let _ = in_canary(&device, &manifest.version, manifest.canary_percent.unwrap_or(100));
        }
        Err(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    match data {
        [0, body @ ..] => {
            if let Ok(bundle) = PolicyBundle::from_cbor(body, 1 << 20) {
                check(&bundle);
            }
        }
        [_, hi, lo, rest @ ..] => {
            let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
            let (manifest, onnx) = rest.split_at(len);
            let key = trusted();
            let bundle = PolicyBundle {
                manifest: manifest.to_vec(),
                onnx: onnx.to_vec(),
                public_key: key.verifying_key().to_bytes().to_vec(),
                signature: key.sign(manifest).to_bytes().to_vec(),
            };
            check(&bundle);
            // The same bundle through the wire encoding.
            let body = bundle.to_cbor().expect("encodes");
            let back = PolicyBundle::from_cbor(&body, usize::MAX).expect("decodes");
            assert!(back == bundle);
        }
        _ => {}
    }
});

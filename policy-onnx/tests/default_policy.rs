//! The committed default policy is what `policies/make-default.sh` produces: retrain with the
//! same inputs and settings, compare the bytes.

use std::path::Path;

use device_profiles::DeviceProfile;
use policy_onnx::train::{Provenance, TrainConfig, train};
use policy_onnx::{LoadOptions, Policy, m4a1};

#[test]
fn default_policy_is_reproducible() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data =
        std::fs::read(root.join("../../shared/data/m4a1/m4a1-train.json")).expect("the M4A1 training sample");
    let dialogues = m4a1::parse(&data, "m4a1-train.json").expect("valid M4A1");
    let profile =
        DeviceProfile::from_path(&root.join("../device-profiles/jetson-tx2.toml")).expect("profile");
    let data_hash = m4a1::data_hash(&data);
    let trained = train(
        &dialogues,
        Provenance { data_hash: &data_hash, profile: &profile },
        &TrainConfig::default(),
        &mut |_| {},
    )
    .expect("training");
    let committed = std::fs::read(root.join("policies/default.onnx")).expect("policies/default.onnx");
    assert!(
        trained.to_onnx() == committed,
        "policies/default.onnx differs from a fresh default training run"
    );

    let policy = Policy::from_bytes(&committed, &LoadOptions::default()).expect("the default policy loads");
    let manifest = policy.info().manifest.clone().expect("a manifest");
    assert_eq!(manifest["schema"], "tmo-obs-v2");
    assert_eq!(policy.info().input_shape, ["N", "37"]);
    assert_eq!(manifest["profile"], "jetson-tx2");
    assert_eq!(manifest["data_hash"], data_hash.as_str());
    assert_eq!(manifest["metrics"]["train_over_budget"], 0);
    assert!(committed.len() < 64 * 1024, "the default policy stays small");
}

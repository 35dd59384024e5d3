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

/// The shipped v2 policy's choices follow its cost table the way the table implies, on the first
/// turn of every task: a dearer attachment (a slower uplink, a higher price) never makes it attach
/// more, a faster board never sends it to the cloud when a slower one stayed local, and less
/// budget never buys more.
#[test]
fn the_default_policy_follows_the_cost_table_monotonically() {
    use policy_onnx::{ClassCosts, Schema, TaskCategory};
    let policy = Policy::from_bytes(policy_onnx::DEFAULT_POLICY, &LoadOptions::default()).expect("loads");
    let schema = Schema::v2(3, 5);
    let mut session = policy.session().expect("session");
    let mut scores = vec![0.0; 9];
    let mut choose = |classes: &ClassCosts, task, latency, usage| {
        let obs = schema.observation_with_costs(&[], task, latency, usage, classes);
        session.scores_into(&obs, &mut scores).expect("scores");
        let best = (0..9).fold(0, |b, i| if scores[i] > scores[b] { i } else { b });
        // Attachments sent (-1: local).
        schema.action(best).map_or(-1, |a| if a.is_cloud() { a.modalities().len() as i32 } else { -1 })
    };
    let wifi = |upload_per_attachment: f64, price: f64, local_secs: f64| ClassCosts {
        latency_secs: vec![
            local_secs,
            0.5,
            1.898 + upload_per_attachment,
            2.016 + 2.0 * upload_per_attachment,
            2.238 + 3.0 * upload_per_attachment,
        ],
        usage_usd: vec![1e-8, 0.00049 * price, 0.005 * price, 0.00945 * price, 0.01368 * price],
    };
    let mut uplink_mattered = false;
    for task in TaskCategory::ALL {
        let attached: Vec<i32> =
            (0..12).map(|i| choose(&wifi(i as f64, 1.0, 1.0), task, 30.0, 0.05)).collect();
        assert!(attached.windows(2).all(|w| w[1] <= w[0]), "{task}: slower uplink {attached:?}");
        uplink_mattered |= attached[0] > attached[11];
        let attached: Vec<i32> = [1.0, 2.0, 4.0, 8.0, 16.0]
            .iter()
            .map(|p| choose(&wifi(0.0, *p, 1.0), task, 30.0, 0.05))
            .collect();
        assert!(attached.windows(2).all(|w| w[1] <= w[0]), "{task}: higher prices {attached:?}");
        let attached: Vec<i32> = [30.0, 20.0, 12.0, 8.0, 4.0, 1.0]
            .iter()
            .map(|l| choose(&wifi(0.0, 1.0, 1.0), task, *l, 0.05))
            .collect();
        assert!(attached.windows(2).all(|w| w[1] <= w[0]), "{task}: less time left {attached:?}");
        // (Boards slow enough that 5 local answers overrun the budget leave no room for the
        // cloud at all: the budget rule keeps a local answer for every later turn.)
        let cloud: Vec<bool> = [5.0, 3.0, 2.0, 1.0, 0.5, 0.05]
            .iter()
            .map(|local| choose(&wifi(3.0, 4.0, *local), task, 30.0, 0.05) >= 0)
            .collect();
        assert!(cloud.windows(2).all(|w| w[0] || !w[1]), "{task}: a faster board, cloud {cloud:?}");
    }
    assert!(uplink_mattered, "a slower uplink changed no task's choice");
}

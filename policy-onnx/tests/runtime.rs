//! The policy runtime against real ONNX files: the paper's exported agents, policies written by
//! our exporter, and files that must be rejected.

use std::path::PathBuf;
use std::sync::Arc;

use policy_onnx::export::{ExportOptions, MANIFEST_KEY, mlp_to_onnx};
use policy_onnx::mlp::{Activation, Mlp};
use policy_onnx::runtime::DEFAULT_MAX_POLICY_BYTES;
use policy_onnx::{
    Availability, Decider, DecisionRequest, Exploration, LoadOptions, ModalitySet, ObservationVersion,
    Policy, PolicyError, PolicySlot, Schema, TaskCategory, Turn,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn shared_policy(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/policies").join(name)
}

fn random_mlp(inputs: usize, outputs: usize, seed: u64) -> Mlp {
    Mlp::random(inputs, &[64, 64], outputs, Activation::Tanh, &mut ChaCha8Rng::seed_from_u64(seed))
}

fn export(mlp: &Mlp) -> Vec<u8> {
    mlp_to_onnx(mlp, &ExportOptions::default())
}

/// Observations used to pin the paper's agents (their scores below were computed by
/// onnxruntime from the same files: `policy-onnx/tests/reference/scores.py`).
fn pinned_observations() -> Vec<Vec<f32>> {
    let s = Schema::default();
    let cloud_all = policy_onnx::Action::Cloud { modalities: ModalitySet::all(3) };
    let history = [
        Turn { task: TaskCategory::Query, action: policy_onnx::Action::Local },
        Turn { task: TaskCategory::Recommendation, action: cloud_all },
    ];
    vec![
        s.observation(&[], TaskCategory::Query, 30.0, 0.05),
        s.observation(&[], TaskCategory::AssistiveSystem, 30.0, 0.05),
        s.observation(&history, TaskCategory::MessageEditing, 18.0, 0.03),
        s.observation(&history, TaskCategory::Recommendation, 2.0, 0.001),
    ]
}

include!("reference/scores.rs");

fn assert_close(found: &[f32], expected: &[f32], tolerance: f32) {
    assert_eq!(found.len(), expected.len());
    for (i, (f, e)) in found.iter().zip(expected).enumerate() {
        assert!((f - e).abs() <= tolerance * (1.0 + e.abs()), "score {i}: {f} vs {e} ({found:?})");
    }
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

#[test]
fn the_papers_agents_load_and_match_onnxruntime() {
    for (name, expected) in [("sb3-rc-ppo-m4a1.onnx", SB3_RC_PPO), ("sb3-rc-dqn-m4a1.onnx", SB3_RC_DQN)] {
        let policy = Policy::from_file(&shared_policy(name), &LoadOptions::default()).unwrap();
        let info = policy.info();
        assert_eq!(info.input_name, "obs", "{name}");
        assert_eq!(info.output_name, "logits", "{name}");
        assert_eq!(info.input_shape.last().map(String::as_str), Some("27"));
        assert_eq!(info.output_shape.last().map(String::as_str), Some("9"));
        assert_eq!(info.opset, Some(17));
        assert!(info.parameter_count > 27 * 64, "{name}: {}", info.parameter_count);
        for (obs, expected) in pinned_observations().iter().zip(expected.iter()) {
            let scores = policy.scores(obs).unwrap();
            assert_close(&scores, expected, 1e-4);
            assert_eq!(argmax(&scores), argmax(expected), "{name}: decision differs from onnxruntime");
        }
    }
}

#[test]
fn exported_mlp_round_trips_through_tract() {
    let schema = Schema::default();
    for (seed, activation) in [(1, Activation::Tanh), (2, Activation::Relu)] {
        let mlp = Mlp::random(27, &[64, 32], 9, activation, &mut ChaCha8Rng::seed_from_u64(seed));
        let bytes = export(&mlp);
        let policy = Policy::from_bytes(&bytes, &LoadOptions::default()).unwrap();
        assert_eq!(policy.info().parameter_count as usize, mlp.parameter_count());
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
        for obs in policy_onnx::runtime::probe_observations(&schema) {
            let expected = mlp.forward(&obs);
            let found = policy.scores(&obs).unwrap();
            for (f, e) in found.iter().zip(&expected) {
                assert!((f - e).abs() <= 1e-5 * (1.0 + e.abs()), "{f} vs {e}");
            }
        }
        // Random inputs far from the probes too.
        use rand::Rng;
        for _ in 0..50 {
            let obs: Vec<f32> = (0..27).map(|_| rng.random_range(-3.0..3.0)).collect();
            let (found, expected) = (policy.scores(&obs).unwrap(), mlp.forward(&obs));
            for (f, e) in found.iter().zip(&expected) {
                assert!((f - e).abs() <= 1e-5 * (1.0 + e.abs()), "{f} vs {e}");
            }
        }
        // Deterministic bytes.
        assert_eq!(bytes, export(&mlp));
    }
}

#[test]
fn rejects_bytes_that_are_not_onnx() {
    let options = LoadOptions::default();
    for bytes in [&b""[..], b"hello, I am not a model", &[0xff; 64][..]] {
        let err = Policy::from_bytes(bytes, &options).unwrap_err();
        assert!(matches!(err, PolicyError::NotOnnx(_)), "{err}");
    }
    // A real policy cut in half.
    let bytes = std::fs::read(shared_policy("sb3-rc-ppo-m4a1.onnx")).unwrap();
    let err = Policy::from_bytes(&bytes[..bytes.len() / 2], &options).unwrap_err();
    assert!(matches!(err, PolicyError::NotOnnx(_)), "{err}");
}

#[test]
fn rejects_graphs_of_the_wrong_shape() {
    let err = Policy::from_bytes(&export(&random_mlp(26, 9, 3)), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, PolicyError::InputMismatch { .. }), "{err}");
    assert!(err.to_string().contains("27"), "{err}");
    let err = Policy::from_bytes(&export(&random_mlp(27, 8, 3)), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, PolicyError::OutputMismatch { .. }), "{err}");
    // The same files fit a schema of their own shape: X = 2 gives 5 actions and 5 * 4 + 2 inputs.
    let options = LoadOptions { schema: Schema::new(2, 5), ..LoadOptions::default() };
    Policy::from_bytes(&export(&random_mlp(22, 5, 3)), &options).unwrap();
}

#[test]
fn rejects_policies_with_non_finite_scores() {
    let mut mlp = random_mlp(27, 9, 4);
    mlp.layers_mut()[2].bias[5] = f32::NAN;
    let err = Policy::from_bytes(&export(&mlp), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, PolicyError::NonFinite { probe: 0, .. }), "{err}");
    let mut mlp = random_mlp(27, 9, 4);
    mlp.layers_mut()[2].bias[0] = f32::INFINITY;
    let err = Policy::from_bytes(&export(&mlp), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, PolicyError::NonFinite { .. }), "{err}");
}

#[test]
fn rejects_files_over_the_size_limit_before_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.onnx");
    let bytes = export(&random_mlp(27, 9, 5));
    std::fs::write(&path, &bytes).unwrap();
    let options = LoadOptions { max_bytes: bytes.len() as u64 - 1, ..LoadOptions::default() };
    let err = Policy::from_file(&path, &options).unwrap_err();
    assert!(matches!(err, PolicyError::TooLarge { .. }), "{err}");
    assert!(matches!(Policy::from_bytes(&bytes, &options), Err(PolicyError::TooLarge { .. })));
    assert!(DEFAULT_MAX_POLICY_BYTES > bytes.len() as u64);
    let err = Policy::from_file(&dir.path().join("missing.onnx"), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, PolicyError::Io { .. }), "{err}");
}

#[test]
fn rejects_a_manifest_of_another_schema() {
    let mlp = random_mlp(27, 9, 6);
    let with = |json: &str| ExportOptions {
        metadata: vec![(MANIFEST_KEY.into(), json.into())],
        ..ExportOptions::default()
    };
    let ok = mlp_to_onnx(&mlp, &with(r#"{"schema": "tmo-obs-v1", "version": "2026.11.24-1"}"#));
    let policy = Policy::from_bytes(&ok, &LoadOptions::default()).unwrap();
    assert_eq!(policy.info().version(), "2026.11.24-1");
    // A 27-wide file whose manifest says v2 does not read a v2 observation.
    let v2 = mlp_to_onnx(&mlp, &with(r#"{"schema": "tmo-obs-v2"}"#));
    let err = Policy::from_bytes(&v2, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, PolicyError::InputMismatch { schema: ObservationVersion::V2, .. }), "{err}");
    let v3 = mlp_to_onnx(&mlp, &with(r#"{"schema": "tmo-obs-v3"}"#));
    let err = Policy::from_bytes(&v3, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, PolicyError::SchemaMismatch { .. }), "{err}");
    let broken = mlp_to_onnx(&mlp, &with("{not json"));
    assert!(matches!(Policy::from_bytes(&broken, &LoadOptions::default()), Err(PolicyError::BadManifest(_))));
}

/// The observation follows the policy: a file without a manifest is v1 when 27 wide, v2 when 37
/// wide (manifest `schema` 2 or `tmo-obs-v2` says the same); anything else is refused.
#[test]
fn the_version_follows_the_manifest_or_the_input_width() {
    let with = |json: &str| ExportOptions {
        metadata: vec![(MANIFEST_KEY.into(), json.into())],
        ..ExportOptions::default()
    };
    let v1 = Policy::from_bytes(&export(&random_mlp(27, 9, 1)), &LoadOptions::default()).unwrap();
    assert_eq!((v1.version(), v1.schema().observation_len()), (ObservationVersion::V1, 27));
    let wide = random_mlp(37, 9, 2);
    for bytes in [
        export(&wide),
        mlp_to_onnx(&wide, &with(r#"{"schema": 2}"#)),
        mlp_to_onnx(&wide, &with(r#"{"schema": "tmo-obs-v2"}"#)),
    ] {
        let v2 = Policy::from_bytes(&bytes, &LoadOptions::default()).unwrap();
        assert_eq!((v2.version(), v2.schema().observation_len()), (ObservationVersion::V2, 37));
        assert_eq!(v2.info().schema, "tmo-obs-v2");
    }
    let err = Policy::from_bytes(&mlp_to_onnx(&wide, &with(r#"{"schema": 1}"#)), &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(err, PolicyError::InputMismatch { schema: ObservationVersion::V1, .. }), "{err}");
    let err = Policy::from_bytes(&export(&random_mlp(30, 9, 3)), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, PolicyError::InputMismatch { .. }), "{err}");
}

/// A v2 policy's decider reads the availability's cost table, the device's live expectation.
#[test]
fn a_v2_decider_encodes_the_live_cost_table() {
    let policy = Arc::new(Policy::from_bytes(policy_onnx::DEFAULT_POLICY, &LoadOptions::default()).unwrap());
    assert_eq!(policy.version(), ObservationVersion::V2);
    let mut costs = device_profiles::DeviceProfile::builtin("x86-dev").unwrap().costs;
    let mut decider = Decider::new(policy.clone(), Exploration::Greedy, Some(1)).unwrap();
    fn request(costs: &device_profiles::CostTable) -> DecisionRequest<'_> {
        DecisionRequest {
            history: &[],
            task: TaskCategory::Query,
            availability: Availability {
                modalities: ModalitySet::all(3),
                cloud_reachable: true,
                remaining_latency_secs: 30.0,
                remaining_cost_usd: 0.05,
                costs,
            },
        }
    }
    decider.decide(&request(&costs)).unwrap();
    let obs = decider.observation().to_vec();
    assert_eq!(obs.len(), 37);
    assert_eq!(&obs[27..32], &[1.5, 6.4603, 4.76134, 6.24569, 6.98211]);
    costs.cloud.latency_secs[2] = 12.5;
    costs.local.cost_usd = 1e-5;
    decider.decide(&request(&costs)).unwrap();
    assert_eq!(decider.observation()[30], 12.5);
    assert_eq!(decider.observation()[32], 1e-5);
    // A v1 policy swapped in reads 27 floats again.
    let v1 = Arc::new(Policy::from_bytes(&export(&random_mlp(27, 9, 4)), &LoadOptions::default()).unwrap());
    decider.set_policy(v1).unwrap();
    decider.decide(&request(&costs)).unwrap();
    assert_eq!(decider.observation().len(), 27);
}

#[test]
fn a_rejected_policy_never_replaces_the_serving_one() {
    let options = LoadOptions::default();
    let first = export(&random_mlp(27, 9, 7));
    let slot = PolicySlot::new(Policy::from_bytes(&first, &options).unwrap());
    let serving = slot.current().info().sha256.clone();
    let mut flipped = first.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0xff;
    for bad in [&b"garbage"[..], &flipped, &export(&random_mlp(27, 8, 7))] {
        if slot.replace_with_bytes(bad, &options).is_ok() {
            // A flipped weight byte can still be a valid model; it is then a different policy.
            assert_ne!(slot.current().info().sha256, serving);
            slot.replace(Arc::new(Policy::from_bytes(&first, &options).unwrap()));
        }
        assert_eq!(slot.current().info().sha256, serving);
    }
    let second = export(&random_mlp(27, 9, 8));
    let previous = slot.replace_with_bytes(&second, &options).unwrap();
    assert_eq!(previous.info().sha256, serving);
    assert_ne!(slot.current().info().sha256, serving);
}

#[test]
fn the_decider_masks_and_reports_propensity() {
    let policy =
        Arc::new(Policy::from_file(&shared_policy("sb3-rc-ppo-m4a1.onnx"), &LoadOptions::default()).unwrap());
    let costs = device_profiles::DeviceProfile::builtin("jetson-tx2").unwrap().costs;
    let mut decider = Decider::new(policy.clone(), Exploration::Greedy, Some(1)).unwrap();
    let availability = Availability {
        modalities: ModalitySet::all(3),
        cloud_reachable: true,
        remaining_latency_secs: 30.0,
        remaining_cost_usd: 0.05,
        costs: &costs,
    };
    let request = DecisionRequest { history: &[], task: TaskCategory::Query, availability };
    let d = decider.decide(&request).unwrap();
    assert_eq!(d.propensity, 1.0);
    assert_eq!(d.action_index, argmax(&SB3_RC_PPO[0]));
    assert_eq!(decider.observation(), pinned_observations()[0].as_slice());

    // With the cloud down, only local is left.
    let offline =
        DecisionRequest { availability: Availability { cloud_reachable: false, ..availability }, ..request };
    let d = decider.decide(&offline).unwrap();
    assert_eq!((d.action_index, d.action), (0, policy_onnx::Action::Local));

    let mut explorer = Decider::new(policy, Exploration::EpsilonGreedy { epsilon: 0.2 }, Some(3)).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..400 {
        let d = explorer.decide(&request).unwrap();
        assert!(d.propensity > 0.0 && d.propensity <= 1.0);
        seen.insert(d.action_index);
    }
    assert_eq!(seen.len(), 9, "epsilon-greedy reaches every allowed action: {seen:?}");
}

/// Found by fuzzing (fuzz target `policy_from_bytes`, a mutation of the default policy): a Gather
/// whose indices are out of range made tract panic in the probe run, outside the guard around
/// tract's preparation. Loading it is now an error.
#[test]
fn a_policy_that_panics_tract_when_run_is_refused() {
    let bytes = include_bytes!("data/gather-index-out-of-range.onnx");
    match Policy::from_bytes(bytes, &LoadOptions::default()) {
        Err(PolicyError::Run(reason) | PolicyError::Unrunnable(reason)) => {
            assert!(reason.contains("panicked"), "{reason}")
        }
        Ok(_) => panic!("the policy loaded"),
        Err(other) => panic!("expected a run error, got {other}"),
    }
}

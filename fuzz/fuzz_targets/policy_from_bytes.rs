//! `Policy::from_bytes`: the daemon loads a policy pushed in a bundle or found on disk
//! (protobuf decoding, the contract checks, tract's preparation, the probe run). A policy that
//! loads must score an observation of its schema's length.

#![no_main]

use libfuzzer_sys::fuzz_target;
use policy_onnx::{LoadOptions, Policy};

fuzz_target!(
    init: {
        // Policy::from_bytes catches tract's panics while preparing the model (an error, not an
        // abort of tmod).
        tmo_edge_fuzz::let_caught_panics_unwind(&["tract-"]);
    },
    |bytes: &[u8]| {
        let options = LoadOptions { max_bytes: 1 << 20, ..LoadOptions::default() };
        if let Ok(policy) = Policy::from_bytes(bytes, &options) {
            let observation = vec![0.5; policy.schema().observation_len()];
            let scores = policy.scores(&observation).expect("a loaded policy scores");
            assert_eq!(scores.len(), policy.schema().action_count());
            let _ = policy.info().version();
        }
    }
);

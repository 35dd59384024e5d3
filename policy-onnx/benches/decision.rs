//! One decision (encode + tract run + mask + arg-max) for the 27-in (v1) and 37-in (v2), 9-out
//! policy contracts: the paper's PPO export, a 64x64 MLP of ours, and the shipped v2 default
//! (cost features, MLP, budget rule).
//!
//!     cargo bench -p policy-onnx --bench decision
//!
//! Criterion measures the mean and median; afterwards the bench times 200,000 single decisions
//! one by one and prints their median, p99 and p99.9, and counts heap allocations per decision.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use criterion::Criterion;
use policy_onnx::export::{ExportOptions, mlp_to_onnx};
use policy_onnx::mlp::{Activation, Mlp};
use policy_onnx::{
    Action, Availability, Decider, DecisionRequest, Exploration, LoadOptions, ModalitySet, Policy,
    TaskCategory, Turn,
};
use rand::SeedableRng;

fn policies() -> Vec<(&'static str, Arc<Policy>)> {
    let options = LoadOptions::default();
    let sb3 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/policies/sb3-rc-ppo-m4a1.onnx");
    let mlp = Mlp::random(27, &[64, 64], 9, Activation::Tanh, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
    let ours = mlp_to_onnx(&mlp, &ExportOptions::default());
    vec![
        ("sb3-rc-ppo", Arc::new(Policy::from_file(&sb3, &options).expect("the paper's PPO policy loads"))),
        ("mlp-64x64", Arc::new(Policy::from_bytes(&ours, &options).expect("our export loads"))),
        (
            "v2-default",
            Arc::new(Policy::from_bytes(policy_onnx::DEFAULT_POLICY, &options).expect("the default loads")),
        ),
    ]
}

fn main() {
    let costs = device_profiles::DeviceProfile::builtin("jetson-tx2").expect("builtin profile").costs;
    let history = [
        Turn { task: TaskCategory::Query, action: Action::Local },
        Turn {
            task: TaskCategory::Recommendation,
            action: Action::Cloud { modalities: ModalitySet::all(3) },
        },
    ];
    let request = DecisionRequest {
        history: &history,
        task: TaskCategory::MessageEditing,
        availability: Availability {
            modalities: ModalitySet::from_indices([0, 2]),
            cloud_reachable: true,
            remaining_latency_secs: 18.0,
            remaining_cost_usd: 0.03,
            costs: &costs,
        },
    };

    let mut criterion = Criterion::default().configure_from_args();
    for (name, policy) in policies() {
        for (mode, exploration) in
            [("greedy", Exploration::Greedy), ("epsilon", Exploration::EpsilonGreedy { epsilon: 0.05 })]
        {
            let mut decider = Decider::new(policy.clone(), exploration, Some(7)).expect("decider");
            criterion.bench_function(&format!("decision/{name}/{mode}"), |b| {
                b.iter(|| black_box(decider.decide(black_box(&request)).expect("decision")))
            });
        }
    }
    criterion.final_summary();

    println!("\nsingle-decision latency, 200000 decisions each (greedy):");
    for (name, policy) in policies() {
        let mut decider = Decider::new(policy, Exploration::Greedy, Some(7)).expect("decider");
        for _ in 0..10_000 {
            black_box(decider.decide(&request).expect("decision"));
        }
        let n = 200_000;
        let mut nanos = Vec::with_capacity(n);
        for _ in 0..n {
            let start = Instant::now();
            black_box(decider.decide(black_box(&request)).expect("decision"));
            nanos.push(start.elapsed().as_nanos() as u64);
        }
        nanos.sort_unstable();
        let at = |q: f64| nanos[((n as f64 * q) as usize).min(n - 1)] as f64 / 1000.0;
        let allocations = allocation_counter::measure(|| {
            for _ in 0..1000 {
                black_box(decider.decide(&request).expect("decision"));
            }
        });
        println!(
            "  {name:<12} median {:>6.2} us  p99 {:>6.2} us  p99.9 {:>6.2} us  max {:>8.2} us  allocations/decision {:.1} ({:.0} bytes)",
            at(0.5),
            at(0.99),
            at(0.999),
            at(1.0),
            allocations.count_total as f64 / 1000.0,
            allocations.bytes_total as f64 / 1000.0,
        );
    }
}

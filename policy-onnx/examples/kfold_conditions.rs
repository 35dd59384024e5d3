//! One v2 policy for every condition against a v1 policy trained for each condition, by k-fold
//! over the M4A1 training sample: for each fold, the v2 trainer (default settings) runs once and
//! the v1 trainer (default settings) once per condition, and both play the fold's test dialogues
//! under that condition with the paper's evaluation. Prints, per condition, the mean rewards,
//! their ratio and the dialogues over budget.
//!
//! `cargo run --release -p policy-onnx --example kfold_conditions [-- FOLDS SEED]`
//!
//! With `KFOLD_V1_CACHE=FILE` the v1 figures (which do not change while the v2 trainer is being
//! worked on) are read from FILE when it exists, and written to it otherwise.
//!
//! Conditions: the TX2 board on the paper's four networks, and made-up ones outside its tables
//! (a congested 4G uplink that charges each image, a slow board on Wi-Fi, pricier cloud calls
//! on 5G, a fast board on a slow wired link).

use std::path::Path;
use std::time::Instant;

use device_profiles::DeviceProfile;
use policy_onnx::m4a1;
use policy_onnx::train::conditions::Network;
use policy_onnx::train::eval::folds;
use policy_onnx::train::sim::{self, CostModel, Simulator};
use policy_onnx::train::{Provenance, TrainConfig, mean_reward, train};
use policy_onnx::{Schema, TaskCategory};

fn conditions(tx2: &DeviceProfile) -> Vec<(String, DeviceProfile)> {
    let mut out = Vec::new();
    for n in Network::ALL {
        out.push((format!("tx2/{}", n.name()), DeviceProfile { costs: n.apply(&tx2.costs), ..tx2.clone() }));
    }
    let custom = |name: &str, local: (f64, f64), latency: [f64; 4], usage: [f64; 4]| {
        let mut p = tx2.clone();
        p.costs.local.latency_secs = local.0;
        p.costs.local.cost_usd = local.1;
        p.costs.cloud.latency_secs = latency.to_vec();
        p.costs.cloud.cost_usd = usage.to_vec();
        (name.to_owned(), p)
    };
    let paper_usage = [0.00049, 0.005, 0.00945, 0.01368];
    out.push(custom("congested-4g-uplink", (0.0114, 7.9e-9), [0.9, 13.0, 21.0, 29.5], paper_usage));
    out.push(custom("slow-board-wifi", (2.4, 2.2e-6), [0.7, 2.6, 2.9, 3.3], paper_usage));
    out.push(custom("pricey-5g", (0.0114, 7.9e-9), [0.5, 6.0, 6.4, 7.1], [0.002, 0.012, 0.021, 0.03]));
    out.push(custom("fast-board-slow-wired", (0.0004, 2e-9), [9.5, 8.0, 9.8, 11.0], paper_usage));
    out
}

/// The v2 trainer's defaults, with `KFOLD_STEPS`, `KFOLD_EPOCHS`, `KFOLD_BASE_SHARE`,
/// `KFOLD_PRICE_SPREAD`, `KFOLD_POOL` and `KFOLD_HIDDEN` (e.g. `96,96`) overriding them when set.
fn v2_config() -> TrainConfig {
    let var = |name: &str| std::env::var(name).ok();
    let mut c = TrainConfig::default();
    if let Some(v) = var("KFOLD_STEPS").and_then(|v| v.parse().ok()) {
        c.steps = v;
    }
    if let Some(v) = var("KFOLD_EPOCHS").and_then(|v| v.parse().ok()) {
        c.distill.epochs = v;
    }
    if let Some(v) = var("KFOLD_BASE_SHARE").and_then(|v| v.parse().ok()) {
        c.conditions.base_share = v;
    }
    if let Some(v) = var("KFOLD_PRICE_SPREAD").and_then(|v| v.parse().ok()) {
        c.conditions.price_spread = v;
    }
    if let Some(v) = var("KFOLD_POOL").and_then(|v| v.parse().ok()) {
        c.conditions.pool = v;
    }
    if let Some(v) = var("KFOLD_HIDDEN") {
        c.distill.hidden = v.split(',').filter_map(|h| h.parse().ok()).collect();
    }
    eprintln!("v2 settings: {}", serde_json::to_string(&c).unwrap_or_default());
    c
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let k: usize = args.get(1).map_or(Ok(5), |a| a.parse())?;
    let seed: u64 = args.get(2).map_or(Ok(0), |a| a.parse())?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = std::fs::read(root.join("../../shared/data/m4a1/m4a1-train.json"))?;
    let dialogues = m4a1::parse(&data, "m4a1-train.json")?;
    let tx2 = DeviceProfile::builtin("jetson-tx2")?;
    let conditions = conditions(&tx2);
    let schema = Schema::default();
    // Per condition: summed (reward x dialogues) and over-budget counts for v2, v1.
    let mut totals = vec![(0.0, 0usize, 0.0, 0usize, 0usize); conditions.len()];
    let started = Instant::now();
    let cache_path = std::env::var_os("KFOLD_V1_CACHE").map(std::path::PathBuf::from);
    let cached: Option<Vec<Vec<(f64, usize)>>> = match &cache_path {
        Some(p) if p.exists() => Some(serde_json::from_slice(&std::fs::read(p)?)?),
        _ => None,
    };
    let mut v1_results: Vec<Vec<(f64, usize)>> = Vec::new();
    for (fold, (train_part, test_part)) in folds(&dialogues, k, seed)?.into_iter().enumerate() {
        let provenance = Provenance { data_hash: "", profile: &tx2 };
        let v2 = train(&train_part, provenance, &v2_config(), &mut |_| {})?;
        let train_eps = sim::episodes(&train_part, &schema)?;
        let test_eps = sim::episodes(&test_part, &schema)?;
        let base = Simulator::new(&train_eps, &tx2, schema.clone())?;
        v1_results.push(Vec::new());
        for (c, (name, profile)) in conditions.iter().enumerate() {
            let sim = base.with_costs(CostModel::new(profile, &schema)?);
            let (r2, o2) = mean_reward(&sim, &test_eps, v2.network.agent().as_mut())?;
            let (r1, o1) = match &cached {
                Some(cached) => cached[fold][c],
                None => {
                    let provenance = Provenance { data_hash: "", profile };
                    let v1 = train(&train_part, provenance, &TrainConfig::v1(), &mut |_| {})?;
                    mean_reward(&sim, &test_eps, v1.network.agent().as_mut())?
                }
            };
            v1_results[fold].push((r1, o1));
            let n = test_eps.len();
            let t = &mut totals[c];
            t.0 += r2 * n as f64;
            t.1 += o2;
            t.2 += r1 * n as f64;
            t.3 += o1;
            t.4 += n;
            eprintln!(
                "fold {fold} {name:<24} v2 {r2:.4} ({o2} over)  v1 {r1:.4} ({o1} over)  [{:.0} s]",
                started.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "{k}-fold (shuffle seed {seed}) over {} dialogues; tasks {}",
        dialogues.len(),
        TaskCategory::ALL.len()
    );
    println!("{:<24} {:>8} {:>5} {:>8} {:>5} {:>7}", "condition", "v2", "over", "v1/cond", "over", "ratio");
    for ((name, _), t) in conditions.iter().zip(&totals) {
        let (r2, r1) = (t.0 / t.4 as f64, t.2 / t.4 as f64);
        println!("{name:<24} {r2:>8.4} {:>5} {r1:>8.4} {:>5} {:>7.4}", t.1, t.3, r2 / r1);
    }
    Ok(())
}

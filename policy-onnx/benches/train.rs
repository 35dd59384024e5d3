//! Training speed: the two phases of `tmoctl policy train` (planning rollouts, regression) and
//! the whole default run. `cargo bench -p policy-onnx --bench train`; the whole run takes about
//! as long as one `tmoctl policy train`, so criterion's ten samples take a few minutes.

use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use device_profiles::DeviceProfile;
use policy_onnx::m4a1;
use policy_onnx::train::distill::DistillConfig;
use policy_onnx::train::{Provenance, TrainConfig, train};

fn data() -> Vec<m4a1::Dialogue> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/m4a1/m4a1-train.json");
    m4a1::load(&path).expect("the M4A1 training sample")
}

fn bench_train(c: &mut Criterion) {
    let dialogues = data();
    let profile = DeviceProfile::builtin("jetson-tx2").expect("built-in profile");
    let provenance = Provenance { data_hash: "bench", profile: &profile };
    let mut group = c.benchmark_group("train");
    group.sample_size(10).measurement_time(Duration::from_secs(60));
    let planning_only = TrainConfig {
        distill: DistillConfig { epochs: 1, ..DistillConfig::default() },
        ..TrainConfig::default()
    };
    group.bench_function("planning (default steps, 1 epoch)", |b| {
        b.iter(|| train(&dialogues, provenance, &planning_only, &mut |_| {}).expect("training"))
    });
    group.measurement_time(Duration::from_secs(200));
    group.bench_function("default settings", |b| {
        b.iter(|| train(&dialogues, provenance, &TrainConfig::default(), &mut |_| {}).expect("training"))
    });
    group.finish();
}

criterion_group!(benches, bench_train);
criterion_main!(benches);

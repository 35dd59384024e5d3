//! Writes `policies/default.onnx`: the default settings of `tmoctl policy train` on the public
//! M4A1 training sample for the paper's board, and prints how long training took.
//! `cargo run --release -p policy-onnx --example default_policy` (what `policies/make-default.sh`
//! runs; `tmoctl policy train` with the same arguments writes the same bytes).

use std::path::Path;
use std::time::Instant;

use device_profiles::DeviceProfile;
use policy_onnx::m4a1;
use policy_onnx::train::{Provenance, TrainConfig, train};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = std::fs::read(root.join("../../shared/data/m4a1/m4a1-train.json"))?;
    let dialogues = m4a1::parse(&data, "m4a1-train.json")?;
    let profile = DeviceProfile::from_path(&root.join("../device-profiles/jetson-tx2.toml"))?;
    let data_hash = m4a1::data_hash(&data);
    let started = Instant::now();
    let trained = train(
        &dialogues,
        Provenance { data_hash: &data_hash, profile: &profile },
        &TrainConfig::default(),
        &mut |_| {},
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let out = root.join("policies/default.onnx");
    std::fs::write(&out, trained.to_onnx())?;
    println!("wrote {} in {seconds:.2} s of training", out.display());
    println!("{}", serde_json::to_string_pretty(&trained.metrics)?);
    Ok(())
}

//! Where a policy's time goes in tract: the optimised plan's nodes, the time of a whole run
//! (mean, and the best mean over batches, which is what an idle core gives), and each node's
//! mean time. For laying out exported graphs (tract's cost is per node).
//!
//!     cargo run --release -p policy-onnx --example node_profile -- [POLICY.onnx [WIDTH]]
//!
//! Without arguments: the shipped default policy; WIDTH is the observation's (37 for v2 with
//! three modalities, 27 for v1).

use std::time::Instant;

use tract_onnx::prelude::*;

fn main() -> TractResult<()> {
    let mut args = std::env::args().skip(1);
    let bytes = match args.next() {
        Some(path) => std::fs::read(path)?,
        None => policy_onnx::DEFAULT_POLICY.to_vec(),
    };
    let width: usize = args.next().map(|w| w.parse()).transpose()?.unwrap_or(37);
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])?
        .with_input_fact(0, f32::fact([1, width]).into())?
        .into_optimized()?;
    let plan = model.into_runnable()?;
    let mut state = TypedSimpleState::new(&plan)?;
    let observation: Vec<f32> = (0..width).map(|i| (i as f32 * 0.37).sin()).collect();
    let input = || Ok::<_, TractError>(tvec!(Tensor::from_shape(&[1, width], &observation)?.into_tvalue()));

    let runs = 20_000;
    for _ in 0..2_000 {
        state.run(input()?)?;
    }
    let started = Instant::now();
    for _ in 0..runs {
        state.run(input()?)?;
    }
    let mean = started.elapsed().as_secs_f64() * 1e6 / runs as f64;
    let mut best = f64::MAX;
    for _ in 0..300 {
        let started = Instant::now();
        for _ in 0..200 {
            state.run(input()?)?;
        }
        best = best.min(started.elapsed().as_secs_f64() * 1e6 / 200.0);
    }

    let mut nanos = vec![0u128; plan.model().nodes().len()];
    for _ in 0..runs {
        state.run_plan_with_eval(input()?, |session, op_state, node, inputs| {
            let started = Instant::now();
            let outputs = tract_onnx::tract_core::plan::eval(session, op_state, node, inputs);
            nanos[node.id] += started.elapsed().as_nanos();
            outputs
        })?;
    }
    let mut nodes = 0;
    for (node, ns) in plan.model().nodes().iter().zip(&nanos) {
        if node.op().name() == "Const" {
            continue;
        }
        nodes += 1;
        println!(
            "{:>4} {:<24} {:>7.3} µs  {}",
            node.id,
            node.op().name(),
            *ns as f64 / runs as f64 / 1e3,
            node.name
        );
    }
    println!("{nodes} nodes (constants left out); a run: {mean:.2} µs mean, {best:.2} µs best batch of 200");
    Ok(())
}

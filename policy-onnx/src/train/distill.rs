//! Regression of the planner's action values into an [`Mlp`] of the contract.
//!
//! Inputs are standardised while training and the standardisation is folded into the first
//! layer afterwards, so the exported network reads raw contract observations. Plain f32
//! arithmetic in a fixed order and a seeded generator: the same samples and seed give the same
//! weights, bit for bit, on any build profile.

use rand::Rng;
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::mlp::{Activation, Mlp};

/// One training example: an observation and the value target of every action.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub observation: Vec<f32>,
    pub targets: Vec<f32>,
    /// The action the planner takes there (for the agreement metric).
    pub best: usize,
    /// Weight of the example in the loss (how often the rollouts visited the observation).
    pub weight: f32,
}

/// Settings of the regression.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DistillConfig {
    pub hidden: Vec<usize>,
    pub epochs: usize,
    pub batch_size: usize,
    /// Adam's step size at the start; it decays linearly to a tenth at the end.
    pub learning_rate: f32,
    /// Weight of the ranking term: a hinge loss `max(0, y_a - y_best + rank_margin)` for every
    /// action a other than the planner's, added to the squared error so that the network's
    /// arg-max is the planner's action and not only close in value (0 turns it off).
    pub rank_weight: f32,
    /// How far below the planner's action the network must score every other action.
    pub rank_margin: f32,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            hidden: vec![64, 64],
            epochs: 300,
            batch_size: 32,
            learning_rate: 3e-3,
            rank_weight: 1.0,
            rank_margin: 0.05,
        }
    }
}

/// How the regression ended.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DistillReport {
    /// Mean squared error over the samples, after folding the standardisation.
    pub mse: f64,
    /// Share of samples where the network's arg-max is the planner's action.
    pub agreement: f64,
    pub samples: usize,
    pub parameters: usize,
}

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const ADAM_EPSILON: f32 = 1e-8;

/// Fits an MLP `observation -> targets` on `samples`; `on_epoch(epoch, mse)` reports progress.
///
/// # Panics
/// If `samples` is empty or the samples disagree on their lengths (the trainer builds them).
pub fn fit(
    samples: &[Sample],
    config: &DistillConfig,
    rng: &mut impl Rng,
    on_epoch: &mut dyn FnMut(usize, f64),
) -> (Mlp, DistillReport) {
    assert!(!samples.is_empty(), "distillation needs samples");
    let inputs = samples[0].observation.len();
    let outputs = samples[0].targets.len();
    let (mean, scale) = standardisation(samples);
    let normalised: Vec<Vec<f32>> = samples
        .iter()
        .map(|s| s.observation.iter().zip(&mean).zip(&scale).map(|((x, m), s)| (x - m) / s).collect())
        .collect();

    let mut mlp = Mlp::random(inputs, &config.hidden, outputs, Activation::Relu, rng);
    let mut adam: Vec<AdamState> = mlp.layers().iter().map(AdamState::new).collect();
    let mut grads: Vec<(Vec<f32>, Vec<f32>)> =
        mlp.layers().iter().map(|l| (vec![0.0; l.weights.len()], vec![0.0; l.bias.len()])).collect();
    let mut work = Workspace::new(&mlp);
    let mut order: Vec<usize> = (0..samples.len()).collect();
    let batch_size = config.batch_size.max(1);
    let total_steps = config.epochs * samples.len().div_ceil(batch_size);
    let (mut step, mut b1t, mut b2t) = (0usize, 1.0f32, 1.0f32);
    for epoch in 0..config.epochs {
        order.shuffle(rng);
        let mut epoch_loss = 0.0f64;
        for batch in order.chunks(batch_size) {
            grads.iter_mut().for_each(|(w, b)| {
                w.fill(0.0);
                b.fill(0.0);
            });
            let batch_weight: f32 = batch.iter().map(|&i| samples[i].weight).sum();
            let scale_loss = 1.0 / (batch_weight.max(f32::MIN_POSITIVE) * outputs as f32);
            for &i in batch {
                let scale = scale_loss * samples[i].weight;
                let rank =
                    Ranking { best: samples[i].best, weight: config.rank_weight, margin: config.rank_margin };
                epoch_loss +=
                    work.accumulate(&mlp, &normalised[i], &samples[i].targets, scale, rank, &mut grads);
            }
            step += 1;
            b1t *= BETA1;
            b2t *= BETA2;
            let progress = step as f32 / total_steps.max(1) as f32;
            let lr = config.learning_rate * (1.0 - 0.9 * progress);
            for ((layer, state), (gw, gb)) in mlp.layers_mut().iter_mut().zip(&mut adam).zip(&grads) {
                state.weights.update(&mut layer.weights, gw, lr, b1t, b2t);
                state.bias.update(&mut layer.bias, gb, lr, b1t, b2t);
            }
        }
        on_epoch(epoch, epoch_loss / (samples.len() * outputs) as f64);
    }

    fold_standardisation(&mut mlp, &mean, &scale);
    let (mut squared, mut agree) = (0.0f64, 0usize);
    for s in samples {
        let y = mlp.forward(&s.observation);
        squared += y.iter().zip(&s.targets).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>();
        if super::sim::argmax(&y) == s.best {
            agree += 1;
        }
    }
    let report = DistillReport {
        mse: squared / (samples.len() * outputs) as f64,
        agreement: agree as f64 / samples.len() as f64,
        samples: samples.len(),
        parameters: mlp.parameter_count(),
    };
    (mlp, report)
}

/// Per-feature mean and standard deviation (1 for constant features).
fn standardisation(samples: &[Sample]) -> (Vec<f32>, Vec<f32>) {
    let n = samples.len() as f64;
    let d = samples[0].observation.len();
    let mut mean = vec![0.0f64; d];
    for s in samples {
        for (m, x) in mean.iter_mut().zip(&s.observation) {
            *m += f64::from(*x);
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0.0f64; d];
    for s in samples {
        for ((v, m), x) in var.iter_mut().zip(&mean).zip(&s.observation) {
            *v += (f64::from(*x) - m).powi(2);
        }
    }
    let scale = var.iter().map(|v| if *v / n > 1e-12 { (v / n).sqrt() as f32 } else { 1.0 }).collect();
    (mean.iter().map(|m| *m as f32).collect(), scale)
}

/// Rewrites the first layer so that it takes raw inputs: `W (x - m) / s + b = (W / s) x + (b - W m / s)`.
fn fold_standardisation(mlp: &mut Mlp, mean: &[f32], scale: &[f32]) {
    let first = &mut mlp.layers_mut()[0];
    let inputs = first.inputs;
    for (row, b) in first.weights.chunks_exact_mut(inputs).zip(&mut first.bias) {
        let mut shift = 0.0f32;
        for ((w, m), s) in row.iter_mut().zip(mean).zip(scale) {
            *w /= s;
            shift += *w * m;
        }
        *b -= shift;
    }
}

/// The ranking term of one sample: the planner's action and the hinge's weight and margin.
#[derive(Debug, Clone, Copy)]
struct Ranking {
    best: usize,
    weight: f32,
    margin: f32,
}

/// Activations of one forward pass, reused across samples.
struct Workspace {
    /// `activations[0]` is the input, `activations[l + 1]` the output of layer l.
    activations: Vec<Vec<f32>>,
    deltas: Vec<Vec<f32>>,
}

impl Workspace {
    fn new(mlp: &Mlp) -> Self {
        let mut activations = vec![vec![0.0; mlp.inputs()]];
        activations.extend(mlp.layers().iter().map(|l| vec![0.0; l.outputs]));
        let deltas = mlp.layers().iter().map(|l| vec![0.0; l.outputs]).collect();
        Workspace { activations, deltas }
    }

    /// Adds the gradient of `scale * (|f(x) - target|^2 + ranking hinge)` to `grads`; returns
    /// the squared error.
    fn accumulate(
        &mut self,
        mlp: &Mlp,
        x: &[f32],
        target: &[f32],
        scale: f32,
        rank: Ranking,
        grads: &mut [(Vec<f32>, Vec<f32>)],
    ) -> f64 {
        self.activations[0].copy_from_slice(x);
        for (l, layer) in mlp.layers().iter().enumerate() {
            let (before, after) = self.activations.split_at_mut(l + 1);
            layer.forward(&before[l], &mut after[0]);
        }
        let last = mlp.layers().len() - 1;
        let mut squared = 0.0f64;
        for ((d, y), t) in self.deltas[last].iter_mut().zip(&self.activations[last + 1]).zip(target) {
            let e = y - t;
            squared += f64::from(e * e);
            *d = 2.0 * e * scale;
        }
        if rank.weight > 0.0 {
            let y = &self.activations[last + 1];
            let deltas = &mut self.deltas[last];
            let best = y[rank.best];
            for (a, ya) in y.iter().enumerate() {
                if a != rank.best && ya - best + rank.margin > 0.0 {
                    deltas[a] += rank.weight * scale;
                    deltas[rank.best] -= rank.weight * scale;
                }
            }
        }
        for l in (0..=last).rev() {
            let layer = &mlp.layers()[l];
            let input = &self.activations[l];
            let (gw, gb) = &mut grads[l];
            for (o, d) in self.deltas[l].iter().enumerate() {
                gb[o] += d;
                for (g, a) in gw[o * layer.inputs..(o + 1) * layer.inputs].iter_mut().zip(input) {
                    *g += d * a;
                }
            }
            if l > 0 {
                let (before, after) = self.deltas.split_at_mut(l);
                let prev = &mut before[l - 1];
                prev.fill(0.0);
                for (o, d) in after[0].iter().enumerate() {
                    for (p, w) in
                        prev.iter_mut().zip(&layer.weights[o * layer.inputs..(o + 1) * layer.inputs])
                    {
                        *p += w * d;
                    }
                }
                // The hidden layers are ReLU: the derivative is 1 where the output is positive.
                for (p, a) in prev.iter_mut().zip(&self.activations[l]) {
                    if *a <= 0.0 {
                        *p = 0.0;
                    }
                }
            }
        }
        squared
    }
}

struct AdamState {
    weights: Moments,
    bias: Moments,
}

impl AdamState {
    fn new(layer: &crate::mlp::Dense) -> Self {
        AdamState { weights: Moments::new(layer.weights.len()), bias: Moments::new(layer.bias.len()) }
    }
}

struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Moments {
    fn new(n: usize) -> Self {
        Moments { m: vec![0.0; n], v: vec![0.0; n] }
    }

    /// One Adam step; `b1t`, `b2t` are beta1^t and beta2^t.
    fn update(&mut self, params: &mut [f32], grads: &[f32], lr: f32, b1t: f32, b2t: f32) {
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(&mut self.m).zip(&mut self.v) {
            *m = BETA1 * *m + (1.0 - BETA1) * g;
            *v = BETA2 * *v + (1.0 - BETA2) * g * g;
            let m_hat = *m / (1.0 - b1t);
            let v_hat = *v / (1.0 - b2t);
            *p -= lr * m_hat / (v_hat.sqrt() + ADAM_EPSILON);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A target that is a known function of the inputs: the fit must learn it and rank like it.
    fn samples() -> Vec<Sample> {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        (0..400)
            .map(|_| {
                let observation: Vec<f32> = vec![rng.random_range(-1.0..1.0), rng.random_range(0.0..30.0)];
                let a = observation[0];
                let b = observation[1] / 30.0;
                let targets = vec![a, b, 0.5 - a.abs()];
                let best = super::super::sim::argmax(&targets);
                Sample { observation, targets, best, weight: 1.0 }
            })
            .collect()
    }

    #[test]
    fn learns_a_known_function_and_folds_the_scaling() {
        let config = DistillConfig {
            hidden: vec![16],
            epochs: 60,
            batch_size: 16,
            learning_rate: 1e-2,
            ..DistillConfig::default()
        };
        let (mlp, report) = fit(&samples(), &config, &mut ChaCha8Rng::seed_from_u64(1), &mut |_, _| {});
        assert!(report.mse < 5e-3, "{report:?}");
        assert!(report.agreement > 0.9, "{report:?}");
        // Raw inputs in, with the standardisation folded: a hand-checked point.
        let y = mlp.forward(&[0.5, 15.0]);
        assert!((y[0] - 0.5).abs() < 0.15 && (y[1] - 0.5).abs() < 0.15, "{y:?}");
    }

    /// Two actions whose values differ by far less than they vary: the squared error alone
    /// barely ranks them, the ranking term makes the planner's action the arg-max.
    #[test]
    fn the_ranking_term_fixes_the_arg_max_of_close_values() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let samples: Vec<Sample> = (0..400)
            .map(|_| {
                let observation: Vec<f32> = vec![rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)];
                let gap = if observation[1] > 0.0 { 0.01 } else { -0.01 };
                let targets = vec![observation[0], observation[0] + gap];
                let best = super::super::sim::argmax(&targets);
                Sample { observation, targets, best, weight: 1.0 }
            })
            .collect();
        let config = DistillConfig {
            hidden: vec![16],
            epochs: 40,
            batch_size: 16,
            learning_rate: 1e-2,
            rank_weight: 0.0,
            ..DistillConfig::default()
        };
        let fit_with = |rank_weight| {
            let config = DistillConfig { rank_weight, ..config.clone() };
            fit(&samples, &config, &mut ChaCha8Rng::seed_from_u64(1), &mut |_, _| {}).1
        };
        let plain = fit_with(0.0);
        let ranked = fit_with(1.0);
        assert!(ranked.agreement > 0.95, "{ranked:?}");
        assert!(ranked.agreement > plain.agreement, "{ranked:?} vs {plain:?}");
        // The values stay values: the squared error is still small.
        assert!(ranked.mse < 5e-3, "{ranked:?}");
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let config = DistillConfig {
            hidden: vec![8],
            epochs: 3,
            batch_size: 16,
            learning_rate: 1e-2,
            ..DistillConfig::default()
        };
        let run = |seed| fit(&samples(), &config, &mut ChaCha8Rng::seed_from_u64(seed), &mut |_, _| {}).0;
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }
}

//! A multi-layer perceptron: the policies this project trains, and their forward pass in Rust.
//! [`crate::export`] writes one as ONNX in the policy contract.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The non-linearity after a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Identity,
    Relu,
    Tanh,
}

impl Activation {
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Identity => x,
            Activation::Relu => x.max(0.0),
            Activation::Tanh => x.tanh(),
        }
    }
}

/// A fully connected layer: `y = activation(W x + b)`, `W` row-major `[outputs, inputs]`
/// (the layout of a PyTorch `Linear` and of an ONNX `Gemm` with `transB = 1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dense {
    pub inputs: usize,
    pub outputs: usize,
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
    pub activation: Activation,
}

impl Dense {
    /// A layer with uniform Glorot initialisation and zero bias.
    pub fn random(inputs: usize, outputs: usize, activation: Activation, rng: &mut impl Rng) -> Self {
        let limit = (6.0 / (inputs + outputs) as f32).sqrt();
        let weights = (0..inputs * outputs).map(|_| rng.random_range(-limit..=limit)).collect();
        Dense { inputs, outputs, weights, bias: vec![0.0; outputs], activation }
    }

    /// `out = activation(W x + b)`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        debug_assert_eq!(x.len(), self.inputs);
        debug_assert_eq!(out.len(), self.outputs);
        for ((o, row), b) in out.iter_mut().zip(self.weights.chunks_exact(self.inputs)).zip(&self.bias) {
            let dot: f32 = row.iter().zip(x).map(|(w, v)| w * v).sum();
            *o = self.activation.apply(dot + b);
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MlpError {
    #[error("an MLP needs at least one layer")]
    Empty,
    #[error("layer {layer}: {reason}")]
    Shape { layer: usize, reason: String },
}

/// Layers applied in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mlp {
    layers: Vec<Dense>,
}

impl Mlp {
    /// Checks that the layers chain and that every tensor has the size its shape says.
    pub fn new(layers: Vec<Dense>) -> Result<Self, MlpError> {
        if layers.is_empty() {
            return Err(MlpError::Empty);
        }
        for (i, l) in layers.iter().enumerate() {
            let shape = |reason: String| MlpError::Shape { layer: i, reason };
            if l.inputs == 0 || l.outputs == 0 {
                return Err(shape("has an empty dimension".into()));
            }
            if l.weights.len() != l.inputs * l.outputs {
                return Err(shape(format!("{} weights for {}x{}", l.weights.len(), l.outputs, l.inputs)));
            }
            if l.bias.len() != l.outputs {
                return Err(shape(format!("{} biases for {} outputs", l.bias.len(), l.outputs)));
            }
            if i > 0 && layers[i - 1].outputs != l.inputs {
                return Err(shape(format!(
                    "takes {} inputs after a layer of {}",
                    l.inputs,
                    layers[i - 1].outputs
                )));
            }
        }
        Ok(Mlp { layers })
    }

    /// An MLP `inputs -> hidden... -> outputs` with `activation` between layers and identity on
    /// the output, randomly initialised.
    pub fn random(
        inputs: usize,
        hidden: &[usize],
        outputs: usize,
        activation: Activation,
        rng: &mut impl Rng,
    ) -> Self {
        let mut sizes = vec![inputs];
        sizes.extend_from_slice(hidden);
        sizes.push(outputs);
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let act = if i + 2 == sizes.len() { Activation::Identity } else { activation };
                Dense::random(w[0], w[1], act, rng)
            })
            .collect();
        Mlp { layers }
    }

    pub fn layers(&self) -> &[Dense] {
        &self.layers
    }

    pub fn layers_mut(&mut self) -> &mut [Dense] {
        &mut self.layers
    }

    pub fn inputs(&self) -> usize {
        self.layers[0].inputs
    }

    pub fn outputs(&self) -> usize {
        self.layers[self.layers.len() - 1].outputs
    }

    /// Number of weights and biases.
    pub fn parameter_count(&self) -> usize {
        self.layers.iter().map(|l| l.weights.len() + l.bias.len()).sum()
    }

    /// The forward pass of one input.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut current = x.to_vec();
        for layer in &self.layers {
            let mut next = vec![0.0; layer.outputs];
            layer.forward(&current, &mut next);
            current = next;
        }
        current
    }
}

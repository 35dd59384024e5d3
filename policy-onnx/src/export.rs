//! Writes an [`Mlp`] as an ONNX policy in the contract: one float32 input `[N, inputs]`, one
//! float32 output `[N, outputs]`, Gemm / Relu / Tanh nodes, opset 17. Built on the protobuf types
//! tract-onnx ships (`tract_onnx::pb`), encoded with prost.

use prost::Message;
use tract_onnx::pb;

use crate::mlp::{Activation, Dense, Mlp};

/// The ONNX opset the writer targets.
pub const OPSET: i64 = 17;
/// IR version 8 is the one that goes with opset 17.
const IR_VERSION: i64 = 8;
/// The metadata key under which a policy's manifest (JSON) is stored in the model.
pub const MANIFEST_KEY: &str = "tmo.manifest";

/// Names and metadata of the exported graph.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub input_name: String,
    pub output_name: String,
    /// `metadata_props` entries (for example [`MANIFEST_KEY`] with the manifest JSON).
    pub metadata: Vec<(String, String)>,
}

impl Default for ExportOptions {
    /// The names of the contract's reference policies: `obs` in, `logits` out.
    fn default() -> Self {
        ExportOptions { input_name: "obs".into(), output_name: "logits".into(), metadata: Vec::new() }
    }
}

/// Serialises `mlp` as ONNX bytes. Deterministic: the same MLP and options give the same bytes.
pub fn mlp_to_onnx(mlp: &Mlp, options: &ExportOptions) -> Vec<u8> {
    let mut graph = GraphWriter::new();
    graph.mlp(mlp, &options.input_name, Some(&options.output_name));
    graph.into_model(options, mlp.inputs(), mlp.outputs()).encode_to_vec()
}

/// Builds a policy graph node by node: constants become initializers, node outputs get unique
/// names. [`mlp_to_onnx`] and the v2 network ([`crate::cost_aware`]) write through it.
#[derive(Debug, Default)]
pub(crate) struct GraphWriter {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
    count: usize,
}

impl GraphWriter {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A float32 initializer named `name`.
    pub(crate) fn constant(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        self.initializers.push(tensor(name, &dims, values));
        name.to_owned()
    }

    /// An int64 initializer named `name` (indices, axes).
    pub(crate) fn int_constant(&mut self, name: &str, dims: &[usize], values: &[i64]) -> String {
        self.initializers.push(pb::TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            int64_data: values.to_vec(),
            ..Default::default()
        });
        name.to_owned()
    }

    /// A node whose one output gets a fresh name, returned.
    pub(crate) fn node(&mut self, op: &str, inputs: &[&str], attributes: &[pb::AttributeProto]) -> String {
        self.count += 1;
        let output = format!("{}.{}", op.to_lowercase(), self.count);
        self.named_node(op, inputs, attributes, &output);
        output
    }

    /// A node with the output name `output` (and the same node name).
    pub(crate) fn named_node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: &[pb::AttributeProto],
        output: &str,
    ) {
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|i| (*i).to_owned()).collect(),
            output: vec![output.to_owned()],
            name: output.to_owned(),
            op_type: op.into(),
            attribute: attributes.to_vec(),
            ..Default::default()
        });
    }

    /// The layers of `mlp` applied to `input` (Gemm with transB = 1, then the activation); the
    /// last node's output is `output` when given. Returns the output's name.
    pub(crate) fn mlp(&mut self, mlp: &Mlp, input: &str, output: Option<&str>) -> String {
        let last = mlp.layers().len() - 1;
        let mut current = input.to_owned();
        for (i, layer) in mlp.layers().iter().enumerate() {
            current = self.dense(i, layer, &current, output.filter(|_| i == last));
        }
        current
    }

    /// Layer `index` (its initializers and nodes are named `layer{index}.*`) applied to `input`;
    /// its last node's output is `output` when given. Returns the output's name.
    pub(crate) fn dense(&mut self, index: usize, layer: &Dense, input: &str, output: Option<&str>) -> String {
        let i = index;
        let w = self.constant(&format!("layer{i}.weight"), &[layer.outputs, layer.inputs], &layer.weights);
        let b = self.constant(&format!("layer{i}.bias"), &[layer.outputs], &layer.bias);
        let activation = match layer.activation {
            Activation::Identity => None,
            Activation::Relu => Some("Relu"),
            Activation::Tanh => Some("Tanh"),
        };
        let gemm_out = match output {
            Some(name) if activation.is_none() => name.to_owned(),
            _ => format!("layer{i}.linear"),
        };
        self.nodes.push(pb::NodeProto {
            input: vec![input.to_owned(), w, b],
            output: vec![gemm_out.clone()],
            name: format!("layer{i}.gemm"),
            op_type: "Gemm".into(),
            attribute: vec![pb::AttributeProto {
                name: "transB".into(),
                r#type: pb::attribute_proto::AttributeType::Int as i32,
                i: 1,
                ..Default::default()
            }],
            ..Default::default()
        });
        let Some(op) = activation else { return gemm_out };
        let out = match output {
            Some(name) => name.to_owned(),
            None => format!("layer{i}.{}", op.to_lowercase()),
        };
        self.nodes.push(pb::NodeProto {
            input: vec![gemm_out],
            output: vec![out.clone()],
            name: format!("layer{i}.{}", op.to_lowercase()),
            op_type: op.into(),
            ..Default::default()
        });
        out
    }

    /// The model: one float32 input `[N, inputs]` named as `options` says, one output `[N, outputs]`.
    pub(crate) fn into_model(self, options: &ExportOptions, inputs: usize, outputs: usize) -> pb::ModelProto {
        let float = pb::tensor_proto::DataType::Float as i32;
        let batch_shape = |features: usize| pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: float,
                shape: Some(pb::TensorShapeProto {
                    dim: vec![
                        dim(pb::tensor_shape_proto::dimension::Value::DimParam("N".into())),
                        dim(pb::tensor_shape_proto::dimension::Value::DimValue(features as i64)),
                    ],
                }),
            })),
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: OPSET }],
            producer_name: "tmo-edge".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(pb::GraphProto {
                name: "policy".into(),
                node: self.nodes,
                initializer: self.initializers,
                input: vec![pb::ValueInfoProto {
                    name: options.input_name.clone(),
                    r#type: Some(batch_shape(inputs)),
                    ..Default::default()
                }],
                output: vec![pb::ValueInfoProto {
                    name: options.output_name.clone(),
                    r#type: Some(batch_shape(outputs)),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            metadata_props: options
                .metadata
                .iter()
                .map(|(key, value)| pb::StringStringEntryProto { key: key.clone(), value: value.clone() })
                .collect(),
            ..Default::default()
        }
    }
}

fn dim(value: pb::tensor_shape_proto::dimension::Value) -> pb::tensor_shape_proto::Dimension {
    pb::tensor_shape_proto::Dimension { value: Some(value), ..Default::default() }
}

fn tensor(name: &str, dims: &[i64], values: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

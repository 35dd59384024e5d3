//! Writes an [`Mlp`] as an ONNX policy in the contract: one float32 input `[N, inputs]`, one
//! float32 output `[N, outputs]`, Gemm / Relu / Tanh nodes, opset 17. Built on the protobuf types
//! tract-onnx ships (`tract_onnx::pb`), encoded with prost.

use prost::Message;
use tract_onnx::pb;

use crate::mlp::{Activation, Mlp};

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

    let mut nodes = Vec::new();
    let mut initializers = Vec::new();
    let mut current = options.input_name.clone();
    let last = mlp.layers().len() - 1;
    for (i, layer) in mlp.layers().iter().enumerate() {
        let w = format!("layer{i}.weight");
        let b = format!("layer{i}.bias");
        initializers.push(tensor(&w, &[layer.outputs as i64, layer.inputs as i64], &layer.weights));
        initializers.push(tensor(&b, &[layer.outputs as i64], &layer.bias));
        let is_output = i == last && layer.activation == Activation::Identity;
        let gemm_out = if is_output { options.output_name.clone() } else { format!("layer{i}.linear") };
        nodes.push(pb::NodeProto {
            input: vec![current.clone(), w, b],
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
        current = gemm_out;
        let op = match layer.activation {
            Activation::Identity => None,
            Activation::Relu => Some("Relu"),
            Activation::Tanh => Some("Tanh"),
        };
        if let Some(op) = op {
            let out = if i == last {
                options.output_name.clone()
            } else {
                format!("layer{i}.{}", op.to_lowercase())
            };
            nodes.push(pb::NodeProto {
                input: vec![current.clone()],
                output: vec![out.clone()],
                name: format!("layer{i}.{}", op.to_lowercase()),
                op_type: op.into(),
                ..Default::default()
            });
            current = out;
        }
    }

    let model = pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: "tmo-edge".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(pb::GraphProto {
            name: "policy".into(),
            node: nodes,
            initializer: initializers,
            input: vec![pb::ValueInfoProto {
                name: options.input_name.clone(),
                r#type: Some(batch_shape(mlp.inputs())),
                ..Default::default()
            }],
            output: vec![pb::ValueInfoProto {
                name: options.output_name.clone(),
                r#type: Some(batch_shape(mlp.outputs())),
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
    };
    model.encode_to_vec()
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

//! The policy side of tmo-edge, with no async runtime in it:
//!
//! - [`schema`]: policy contracts v1 and v2 (DESIGN.md): task ids, the action space 1 + 2^X, the
//!   observation of the last Z turns and the remaining budgets, and (v2) the live cost table.
//! - [`cost_aware`]: the v2 network (cost features, MLP, budget rule) and its ONNX graph.
//! - [`runtime`]: ONNX policies loaded and validated with tract, scored per thread.
//! - [`decision`]: the mask of allowed actions, the arg-max and exploration with propensities.
//! - [`mlp`] and [`export`]: the policies this project trains and their ONNX writer.
//! - [`m4a1`]: the paper's dataset format.
//! - [`train`]: the paper's simulator, the offline trainer and the evaluation.

pub mod cost_aware;
pub mod decision;
pub mod export;
pub mod m4a1;
pub mod mlp;
pub mod runtime;
pub mod schema;
pub mod train;

pub use decision::{
    Availability, Decider, DeciderError, Decision, DecisionError, DecisionRequest, Exploration,
};
pub use runtime::{LoadOptions, Policy, PolicyError, PolicyInfo, PolicySlot};
pub use schema::{
    Action, ClassCosts, ModalitySet, ObservationVersion, SCHEMA_V1, SCHEMA_V2, Schema, TaskCategory, Turn,
};

/// The default policy (`policies/default.onnx`, made by `policies/make-default.sh`), built into
/// every binary that serves decisions.
pub const DEFAULT_POLICY: &[u8] = include_bytes!("../policies/default.onnx");

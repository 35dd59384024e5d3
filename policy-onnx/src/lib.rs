//! The policy side of tmo-edge, with no async runtime in it:
//!
//! - [`schema`]: policy contract v1 (DESIGN.md): task ids, the action space 1 + 2^X, the
//!   observation of the last Z turns and the remaining budgets.
//! - [`runtime`]: ONNX policies loaded and validated with tract, scored per thread.
//! - [`decision`]: the mask of allowed actions, the arg-max and exploration with propensities.
//! - [`mlp`] and [`export`]: the policies this project trains and their ONNX writer.
//! - [`m4a1`]: the paper's dataset format.
//! - [`train`]: the paper's simulator, the offline trainer and the evaluation.

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
pub use schema::{Action, ModalitySet, SCHEMA_V1, Schema, TaskCategory, Turn};

/// The default policy (`policies/default.onnx`, made by `policies/make-default.sh`), built into
/// every binary that serves decisions.
pub const DEFAULT_POLICY: &[u8] = include_bytes!("../policies/default.onnx");

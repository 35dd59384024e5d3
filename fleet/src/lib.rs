//! fleet: the fleet manager's side of tmo-edge's fleet loop (behind `tmoctl fleet`).
//!
//! - [`collector`]: outcome batches in (shared subscription), rows once each into the day-
//!   partitioned dataset of `outcome_log::dataset`, durable before the ack goes out;
//! - [`push`]: signed policy bundles (manifest + ONNX + Ed25519), published retained on a
//!   group's policy topic as one packet;
//! - [`history`]: every bundle pushed per group, for rollbacks (an earlier policy signed again
//!   under a newer sequence) and sequences that only rise;
//! - [`keys`]: Ed25519 key files (hex seed, mode 0600, and `<file>.pub`);
//! - [`status`]: the fleet's status table from retained status and availability messages;
//! - [`rollout`]: staged rollouts judged against abort rules from the group's statuses;
//! - [`net`]: connecting and publishing with confirmation.
//!
//! Topic strings and payload encodings come from `tmo-protocol`; this crate knows none itself.

pub mod collector;
pub mod history;
pub mod keys;
pub mod net;
pub mod push;
pub mod rollout;
pub mod status;

pub use collector::{Collector, CollectorConfig, CollectorError, CollectorStats, DEFAULT_SHARE};
pub use history::{HistoryError, PushHistory, Pushed, rebundle};
pub use keys::KeyError;
pub use net::NetError;
pub use push::{
    BundleSpec, PublishedBundle, PushError, build_bundle, build_bundle_from_file, publish_bundle, push_bundle,
};
pub use rollout::{AbortRules, Rollout, RolloutFigures};
pub use status::{DeviceEntry, FleetView, StatusError};

/// Unix time now, in milliseconds.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

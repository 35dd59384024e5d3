//! tmo-protocol: the MQTT protocol of tmo-edge, version 1 (`tmo/v1/...`).
//!
//! The only crate that knows topic strings and payload encodings:
//! - [`topic`]: topic names and subscription filters, with validated device ids and group names;
//! - [`messages`], [`bundle`]: payload types; [`codec`]: their CBOR and JSON encodings with typed
//!   decode errors;
//! - [`inbox`]: frames in, typed messages out, refusals counted and logged;
//! - [`chunk`]: frames, splitting payloads larger than the broker's packet limit and
//!   reassembling them with limits, a timeout and a checksum;
//! - [`link`]: the MQTT connection task (rumqttc, MQTT v5) that keeps polling, reconnects with
//!   backoff, re-subscribes and exposes `connected`;
//! - `testing` (feature `testing`): a real Mosquitto broker on a free loopback port for tests,
//!   and a TCP proxy that adds delay and rate limits, changeable live.

pub mod bundle;
pub mod chunk;
pub mod codec;
pub mod inbox;
pub mod link;
pub mod messages;
pub mod reject;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topic;

pub use bundle::{BindingError, BundleError, PolicyBundle, PolicyManifest, in_canary};
pub use chunk::{FrameError, Reassembler, ReassemblyLimits, ReassemblyStats, split};
pub use codec::{CborMessage, DecodeError, EncodeError, JsonMessage, MESSAGE_VERSION};
pub use inbox::{Inbox, InboxError};
pub use messages::*;
pub use reject::{RejectCounts, RejectKind};
pub use topic::{DeviceId, GroupName, ShareGroup, Topic, TopicError};

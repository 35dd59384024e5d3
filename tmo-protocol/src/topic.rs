//! Topic names of protocol v1: the only place that builds or parses `tmo/v1/...` strings.
//!
//! Everything a device publishes or receives lives under `tmo/v1/dev/<device>/...`, so a
//! broker ACL can be one pattern per device (Mosquitto: `pattern readwrite tmo/v1/dev/%c/#`
//! when the client id is the device id); group-wide topics live under `tmo/v1/group/<group>/...`.
//!
//! | Topic | Direction | Retained | Payload |
//! |---|---|---|---|
//! | `tmo/v1/dev/<d>/cloud/req` | device → bridges (`$share/<g>/tmo/v1/dev/+/cloud/req`) | no | one whole frame of CBOR [`crate::CloudRequest`] (chunks refused) |
//! | `tmo/v1/dev/<d>/cloud/stream` | bridge → device | no | framed CBOR [`crate::CloudChunk`]: the pieces of a streamed answer, numbered from 0 |
//! | `tmo/v1/dev/<d>/cloud/reply` | bridge → device | no | framed CBOR [`crate::CloudReply`] (a streamed answer's reply holds it whole) |
//! | `tmo/v1/dev/<d>/cloud/cancel` | device → every bridge (`tmo/v1/dev/+/cloud/cancel`, not shared) | no | framed CBOR [`crate::CloudCancel`] |
//! | `tmo/v1/dev/<d>/score` | bridge (judge) → device | no | JSON [`crate::JudgeScore`] |
//! | `tmo/v1/dev/<d>/availability` | device (and its last will) | yes | `online` / `offline` |
//! | `tmo/v1/dev/<d>/status` | device → fleet | yes | JSON [`crate::DeviceStatus`] |
//! | `tmo/v1/dev/<d>/outcomes` | device → collectors (`$share/<g>/tmo/v1/dev/+/outcomes`) | no | one whole frame of CBOR [`crate::OutcomeBatch`] (chunks refused) |
//! | `tmo/v1/dev/<d>/outcomes/ack` | collector → device | no | framed CBOR [`crate::OutcomeAck`] |
//! | `tmo/v1/group/<g>/policy` | fleet → devices | yes | framed CBOR [`crate::PolicyBundle`] |

use std::fmt;

use serde::{Deserialize, Serialize};

/// Root of every topic of this protocol version.
pub const ROOT: &str = "tmo/v1";

/// Longest device id or group name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// Why a name or a topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The name is empty.
    #[error("{kind} is empty")]
    Empty {
        /// "device id", "group name" or "share group".
        kind: &'static str,
    },
    /// The name is longer than [`MAX_NAME_BYTES`].
    #[error("{kind} is {len} bytes, longer than {MAX_NAME_BYTES}")]
    TooLong {
        /// "device id", "group name" or "share group".
        kind: &'static str,
        /// Length in bytes.
        len: usize,
    },
    /// The name holds a character MQTT gives a meaning to (`+`, `#`, `/`), a control character,
    /// or starts with `$` (reserved for broker topics).
    #[error("{kind} {name:?} contains {found:?}, which is not allowed in a topic level")]
    ForbiddenCharacter {
        /// "device id", "group name" or "share group".
        kind: &'static str,
        /// The refused name.
        name: String,
        /// The first forbidden character.
        found: char,
    },
    /// The topic is not one of protocol v1's topics.
    #[error("topic {0:?} is not a tmo/v1 topic")]
    Unknown(String),
}

fn validate_name(kind: &'static str, name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty { kind });
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(TopicError::TooLong { kind, len: name.len() });
    }
    let forbidden = name
        .chars()
        .find(|c| matches!(c, '+' | '#' | '/') || c.is_control())
        .or_else(|| name.starts_with('$').then_some('$'));
    match forbidden {
        Some(found) => Err(TopicError::ForbiddenCharacter { kind, name: name.to_owned(), found }),
        None => Ok(()),
    }
}

macro_rules! topic_name {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Validates `name`: not empty, at most 64 bytes, no `+`, `#`, `/`, control
            /// characters, and no leading `$`.
            pub fn new(name: impl Into<String>) -> Result<Self, TopicError> {
                let name = name.into();
                validate_name($kind, &name)?;
                Ok(Self(name))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = TopicError;
            fn try_from(name: String) -> Result<Self, TopicError> {
                Self::new(name)
            }
        }

        impl From<$ty> for String {
            fn from(name: $ty) -> String {
                name.0
            }
        }

        impl std::str::FromStr for $ty {
            type Err = TopicError;
            fn from_str(name: &str) -> Result<Self, TopicError> {
                Self::new(name)
            }
        }
    };
}

topic_name!(
    /// A device id, one topic level (usually also the MQTT client id).
    DeviceId,
    "device id"
);
topic_name!(
    /// A group of devices that share a policy, one topic level.
    GroupName,
    "group name"
);
topic_name!(
    /// The name of a shared subscription group (`$share/<name>/...`): the processes that
    /// subscribe with the same name split the messages between them.
    ShareGroup,
    "share group"
);

/// One topic of protocol v1, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `tmo/v1/dev/<d>/cloud/req`: a device asks the cloud.
    CloudRequest(DeviceId),
    /// `tmo/v1/dev/<d>/cloud/reply`: the bridge answers a device.
    CloudReply(DeviceId),
    /// `tmo/v1/dev/<d>/cloud/stream`: the pieces of a streamed answer, before its reply.
    CloudStream(DeviceId),
    /// `tmo/v1/dev/<d>/cloud/cancel`: the device no longer waits for a request's answer.
    CloudCancel(DeviceId),
    /// `tmo/v1/dev/<d>/score`: a judge's score of a cloud answer.
    Score(DeviceId),
    /// `tmo/v1/dev/<d>/availability`: retained `online`/`offline`.
    Availability(DeviceId),
    /// `tmo/v1/dev/<d>/status`: retained JSON status.
    Status(DeviceId),
    /// `tmo/v1/dev/<d>/outcomes`: outcome batches.
    Outcomes(DeviceId),
    /// `tmo/v1/dev/<d>/outcomes/ack`: acknowledgements of outcome batches.
    OutcomeAck(DeviceId),
    /// `tmo/v1/dev/<d>/probe`: a small QoS 1 publish that nobody subscribes to; the time to its
    /// PUBACK measures the link's round trip while no request is in flight.
    LinkProbe(DeviceId),
    /// `tmo/v1/group/<g>/policy`: retained signed policy bundle (a rollback is a newer bundle
    /// of the earlier policy, replacing the retained one).
    Policy(GroupName),
    /// `tmo/v1/cloud/capabilities`: retained JSON, what the cloud bridges' backend accepts
    /// (published by the bridges at start; devices leave out attachments it cannot take).
    CloudCapabilities,
}

impl Topic {
    /// Parses a concrete topic name (no wildcards).
    pub fn parse(topic: &str) -> Result<Self, TopicError> {
        let unknown = || TopicError::Unknown(topic.to_owned());
        let rest = topic.strip_prefix(ROOT).and_then(|r| r.strip_prefix('/')).ok_or_else(unknown)?;
        let levels: Vec<&str> = rest.split('/').collect();
        match levels.as_slice() {
            ["dev", device, tail @ ..] => {
                let device = DeviceId::new(*device)?;
                match tail {
                    ["cloud", "req"] => Ok(Self::CloudRequest(device)),
                    ["cloud", "reply"] => Ok(Self::CloudReply(device)),
                    ["cloud", "stream"] => Ok(Self::CloudStream(device)),
                    ["cloud", "cancel"] => Ok(Self::CloudCancel(device)),
                    ["score"] => Ok(Self::Score(device)),
                    ["availability"] => Ok(Self::Availability(device)),
                    ["status"] => Ok(Self::Status(device)),
                    ["outcomes"] => Ok(Self::Outcomes(device)),
                    ["outcomes", "ack"] => Ok(Self::OutcomeAck(device)),
                    ["probe"] => Ok(Self::LinkProbe(device)),
                    _ => Err(unknown()),
                }
            }
            ["cloud", "capabilities"] => Ok(Self::CloudCapabilities),
            ["group", group, tail @ ..] => {
                let group = GroupName::new(*group)?;
                match tail {
                    ["policy"] => Ok(Self::Policy(group)),
                    _ => Err(unknown()),
                }
            }
            _ => Err(unknown()),
        }
    }

    /// The topic name.
    pub fn name(&self) -> String {
        match self {
            Self::CloudRequest(d) => format!("{ROOT}/dev/{d}/cloud/req"),
            Self::CloudReply(d) => format!("{ROOT}/dev/{d}/cloud/reply"),
            Self::CloudStream(d) => format!("{ROOT}/dev/{d}/cloud/stream"),
            Self::CloudCancel(d) => format!("{ROOT}/dev/{d}/cloud/cancel"),
            Self::Score(d) => format!("{ROOT}/dev/{d}/score"),
            Self::Availability(d) => format!("{ROOT}/dev/{d}/availability"),
            Self::Status(d) => format!("{ROOT}/dev/{d}/status"),
            Self::Outcomes(d) => format!("{ROOT}/dev/{d}/outcomes"),
            Self::OutcomeAck(d) => format!("{ROOT}/dev/{d}/outcomes/ack"),
            Self::LinkProbe(d) => format!("{ROOT}/dev/{d}/probe"),
            Self::Policy(g) => format!("{ROOT}/group/{g}/policy"),
            Self::CloudCapabilities => format!("{ROOT}/cloud/capabilities"),
        }
    }

    /// The device this topic belongs to, if it is a per-device topic.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Self::CloudRequest(d)
            | Self::CloudReply(d)
            | Self::CloudStream(d)
            | Self::CloudCancel(d)
            | Self::Score(d)
            | Self::Availability(d)
            | Self::Status(d)
            | Self::Outcomes(d)
            | Self::OutcomeAck(d)
            | Self::LinkProbe(d) => Some(d),
            Self::Policy(_) | Self::CloudCapabilities => None,
        }
    }

    /// Whether messages on this topic are single packets by design, never chunked: cloud
    /// requests and outcome batches, which a shared subscription spreads over several bridges
    /// or collectors (each chunk could reach another one). Chunks on these topics are refused.
    pub fn single_packet(&self) -> bool {
        matches!(self, Self::CloudRequest(_) | Self::Outcomes(_))
    }

    /// Whether messages on this topic are published retained.
    pub fn retained(&self) -> bool {
        matches!(self, Self::Availability(_) | Self::Status(_) | Self::Policy(_) | Self::CloudCapabilities)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Subscription filters (with wildcards) used by the bridge, the collector and the fleet CLI.
pub mod filter {
    use super::{ROOT, ShareGroup};

    /// `$share/<share>/tmo/v1/dev/+/cloud/req`: cloud bridges split the requests of all devices.
    pub fn cloud_requests_shared(share: &ShareGroup) -> String {
        format!("$share/{share}/{ROOT}/dev/+/cloud/req")
    }

    /// `tmo/v1/dev/+/cloud/cancel`: every bridge hears every cancel (not shared: the bridge
    /// serving the request may be any of them; the others ignore it).
    pub fn all_cloud_cancels() -> String {
        format!("{ROOT}/dev/+/cloud/cancel")
    }

    /// `$share/<share>/tmo/v1/dev/+/outcomes`: collectors split the outcome batches.
    pub fn outcomes_shared(share: &ShareGroup) -> String {
        format!("$share/{share}/{ROOT}/dev/+/outcomes")
    }

    /// `tmo/v1/dev/+/status`: every device's retained status.
    pub fn all_status() -> String {
        format!("{ROOT}/dev/+/status")
    }

    /// `tmo/v1/dev/+/availability`: every device's retained availability.
    pub fn all_availability() -> String {
        format!("{ROOT}/dev/+/availability")
    }
}

/// The payload of availability messages while a device is connected.
pub const ONLINE: &[u8] = b"online";
/// The payload of availability messages (and of the last will) when a device is gone.
pub const OFFLINE: &[u8] = b"offline";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_topic_round_trips() {
        let d = DeviceId::new("kitchen-7").unwrap();
        let g = GroupName::new("pilot").unwrap();
        let topics = [
            Topic::CloudRequest(d.clone()),
            Topic::CloudReply(d.clone()),
            Topic::CloudStream(d.clone()),
            Topic::CloudCancel(d.clone()),
            Topic::Score(d.clone()),
            Topic::Availability(d.clone()),
            Topic::Status(d.clone()),
            Topic::Outcomes(d.clone()),
            Topic::OutcomeAck(d.clone()),
            Topic::LinkProbe(d.clone()),
            Topic::Policy(g),
        ];
        for topic in topics {
            assert_eq!(Topic::parse(&topic.name()).unwrap(), topic, "{topic}");
        }
        assert_eq!(Topic::CloudRequest(d).name(), "tmo/v1/dev/kitchen-7/cloud/req");
    }

    #[test]
    fn names_with_mqtt_meaning_are_refused() {
        for bad in ["", "a+b", "a#", "a/b", "$SYS", "tab\there", &"x".repeat(65)] {
            assert!(DeviceId::new(bad).is_err(), "{bad:?} accepted");
            assert!(GroupName::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(DeviceId::new("x".repeat(64)).is_ok());
        assert!(DeviceId::new("cuisine-été").is_ok());
        assert!(matches!(DeviceId::new("a/b"), Err(TopicError::ForbiddenCharacter { found: '/', .. })));
    }

    #[test]
    fn foreign_or_wildcard_topics_are_refused() {
        for bad in [
            "tmo/v2/dev/a/status",
            "tmo/v1/dev/a/status/extra",
            "tmo/v1/dev/+/status",
            "tmo/v1/dev//status",
            "tmo/v1/group/g",
            "other",
            "tmo/v1",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn shared_filters_name_the_share_group() {
        let share = ShareGroup::new("bridges").unwrap();
        assert_eq!(filter::cloud_requests_shared(&share), "$share/bridges/tmo/v1/dev/+/cloud/req");
        assert_eq!(filter::outcomes_shared(&share), "$share/bridges/tmo/v1/dev/+/outcomes");
    }

    #[test]
    fn names_deserialize_with_validation() {
        let ok: DeviceId = serde_json::from_str("\"dev-1\"").unwrap();
        assert_eq!(ok.as_str(), "dev-1");
        assert!(serde_json::from_str::<DeviceId>("\"a/b\"").is_err());
    }
}

//! Payload encodings: CBOR bodies (binary-carrying messages) and JSON (human-facing ones).
//!
//! A CBOR body is a CBOR array of three items: `[version, message kind, message]`, i.e. the
//! bytes `0x83 0x01 <kind>` followed by the message's CBOR map. The first bytes tell a message
//! of another protocol version or of another kind apart before the rest is parsed. Binary
//! fields (frames, audio, ONNX) are CBOR byte strings, not arrays of integers.
//!
//! A JSON message is an object with a `"v": 1` member; other versions are refused as
//! [`DecodeError::WrongVersion`].

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::reject::RejectKind;

/// Version of the message schemas (CBOR header and JSON `v`).
pub const MESSAGE_VERSION: u8 = 1;

const CBOR_ARRAY_OF_3: u8 = 0x83;

/// The kinds of CBOR message, as carried in the body header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageKind {
    /// [`crate::CloudRequest`].
    CloudRequest = 1,
    /// [`crate::CloudReply`].
    CloudReply = 2,
    /// [`crate::OutcomeBatch`].
    OutcomeBatch = 3,
    /// [`crate::OutcomeAck`].
    OutcomeAck = 4,
    /// [`crate::PolicyBundle`].
    PolicyBundle = 5,
    /// [`crate::CloudChunk`].
    CloudChunk = 6,
    /// [`crate::CloudCancel`].
    CloudCancel = 7,
}

impl MessageKind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::CloudRequest,
            2 => Self::CloudReply,
            3 => Self::OutcomeBatch,
            4 => Self::OutcomeAck,
            5 => Self::PolicyBundle,
            6 => Self::CloudChunk,
            7 => Self::CloudCancel,
            _ => return None,
        })
    }

    /// The message's name, for errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::CloudRequest => "cloud request",
            Self::CloudReply => "cloud reply",
            Self::OutcomeBatch => "outcome batch",
            Self::OutcomeAck => "outcome ack",
            Self::PolicyBundle => "policy bundle",
            Self::CloudChunk => "cloud answer chunk",
            Self::CloudCancel => "cloud cancel",
        }
    }
}

/// A message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// CBOR serialisation failed.
    #[error("encoding {what} as CBOR: {reason}")]
    Cbor {
        /// The message.
        what: &'static str,
        /// The serialiser's message.
        reason: String,
    },
    /// JSON serialisation failed.
    #[error("encoding {what} as JSON: {source}")]
    Json {
        /// The message.
        what: &'static str,
        /// The serialiser's error.
        source: serde_json::Error,
    },
}

/// A received message was refused, with the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Not valid CBOR/JSON for this message.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// The expected message.
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// Another schema version.
    #[error("{what} has version {found}, expected {MESSAGE_VERSION}")]
    WrongVersion {
        /// The expected message.
        what: &'static str,
        /// The version found.
        found: u64,
    },
    /// Another message kind (sent to the wrong topic).
    #[error("expected a {expected}, got message kind {found}")]
    WrongKind {
        /// The expected message.
        expected: &'static str,
        /// The kind byte found.
        found: u8,
    },
    /// Larger than allowed.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// The message.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Parsed, but the values are not acceptable.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The message.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl DecodeError {
    /// The counter this refusal goes to.
    pub fn kind(&self) -> RejectKind {
        match self {
            DecodeError::Malformed { .. } | DecodeError::WrongKind { .. } => RejectKind::Malformed,
            DecodeError::WrongVersion { .. } => RejectKind::WrongVersion,
            DecodeError::Oversized { .. } => RejectKind::Oversized,
            DecodeError::Invalid { .. } => RejectKind::Invalid,
        }
    }
}

/// A message sent as a CBOR body (see the module documentation).
pub trait CborMessage: Serialize + DeserializeOwned {
    /// Its kind byte.
    const KIND: MessageKind;

    /// Checks values that serde cannot (called by [`CborMessage::from_cbor`]).
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// Encodes the body (header and CBOR map).
    fn to_cbor(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = vec![CBOR_ARRAY_OF_3, MESSAGE_VERSION, Self::KIND as u8];
        ciborium::into_writer(self, &mut out)
            .map_err(|e| EncodeError::Cbor { what: Self::KIND.name(), reason: e.to_string() })?;
        Ok(out)
    }

    /// Decodes and validates a body of at most `max_bytes`.
    fn from_cbor(body: &[u8], max_bytes: usize) -> Result<Self, DecodeError> {
        let what = Self::KIND.name();
        if body.len() > max_bytes {
            return Err(DecodeError::Oversized { what, len: body.len(), max: max_bytes });
        }
        let [array, version, kind, rest @ ..] = body else {
            return Err(DecodeError::Malformed {
                what,
                reason: format!("{} bytes is too short for a message header", body.len()),
            });
        };
        if *array != CBOR_ARRAY_OF_3 {
            return Err(DecodeError::Malformed {
                what,
                reason: format!("expected a 3-item CBOR array, first byte {array:#04x}"),
            });
        }
        if *version != MESSAGE_VERSION {
            // A small unsigned integer is encoded as itself below 24.
            return Err(DecodeError::WrongVersion { what, found: u64::from(*version) });
        }
        if MessageKind::from_byte(*kind) != Some(Self::KIND) {
            return Err(DecodeError::WrongKind { expected: what, found: *kind });
        }
        let message: Self = ciborium::from_reader(rest)
            .map_err(|e| DecodeError::Malformed { what, reason: e.to_string() })?;
        message.validate().map_err(|reason| DecodeError::Invalid { what, reason })?;
        Ok(message)
    }
}

/// A message sent as a JSON object with a `"v"` member.
pub trait JsonMessage: Serialize + DeserializeOwned {
    /// The message's name, for errors.
    const NAME: &'static str;

    /// Checks values that serde cannot.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// Encodes as compact JSON.
    fn to_json(&self) -> Result<Vec<u8>, EncodeError> {
        serde_json::to_vec(self).map_err(|source| EncodeError::Json { what: Self::NAME, source })
    }

    /// Decodes and validates at most `max_bytes` of JSON.
    fn from_json(bytes: &[u8], max_bytes: usize) -> Result<Self, DecodeError> {
        let what = Self::NAME;
        if bytes.len() > max_bytes {
            return Err(DecodeError::Oversized { what, len: bytes.len(), max: max_bytes });
        }
        #[derive(serde::Deserialize)]
        struct VersionProbe {
            v: u64,
        }
        let probe: VersionProbe = serde_json::from_slice(bytes)
            .map_err(|e| DecodeError::Malformed { what, reason: e.to_string() })?;
        if probe.v != u64::from(MESSAGE_VERSION) {
            return Err(DecodeError::WrongVersion { what, found: probe.v });
        }
        let message: Self = serde_json::from_slice(bytes)
            .map_err(|e| DecodeError::Malformed { what, reason: e.to_string() })?;
        message.validate().map_err(|reason| DecodeError::Invalid { what, reason })?;
        Ok(message)
    }
}

/// Serde helper: the constant `v` member of JSON messages.
pub(crate) fn message_version() -> u8 {
    MESSAGE_VERSION
}

//! [`Inbox`]: frames in, typed messages out, every refusal counted and logged.

use std::time::Instant;

use tracing::warn;

use crate::chunk::{FrameError, Reassembler, ReassemblyLimits, ReassemblyStats};
use crate::codec::{CborMessage, DecodeError};
use crate::reject::RejectCounts;

/// Why an incoming payload gave no message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InboxError {
    /// The frame was refused (or completed a message with a bad checksum).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The reassembled body is not a valid message of the expected type.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Reassembles the frames received on one or more topics and decodes complete bodies as
/// CBOR messages. Frame refusals are counted by the reassembler, decode refusals here;
/// [`Inbox::rejected`] sums both.
#[derive(Debug)]
pub struct Inbox {
    reassembler: Reassembler,
    decode_rejected: RejectCounts,
}

impl Inbox {
    /// An inbox whose messages may be up to `limits.max_message_bytes`.
    pub fn new(limits: ReassemblyLimits) -> Self {
        Self { reassembler: Reassembler::new(limits), decode_rejected: RejectCounts::default() }
    }

    /// Takes one payload received on `topic`; returns the message once complete.
    pub fn try_receive<M: CborMessage>(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
    ) -> Result<Option<M>, InboxError> {
        self.try_receive_with(topic, payload, now, M::from_cbor)
    }

    /// Like [`Inbox::try_receive`], with the complete body decoded by `decode` (given the body
    /// and the largest message size): for a caller with its own forms of a message, such as a
    /// collector that reads rows typed and falls back to a lenient form for per-row reasons.
    pub fn try_receive_with<T>(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        decode: impl FnOnce(&[u8], usize) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, InboxError> {
        let Some(body) = self.reassembler.accept(topic, payload, now)? else {
            return Ok(None);
        };
        match decode(&body, self.reassembler.limits().max_message_bytes) {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                self.decode_rejected.record(e.kind());
                Err(e.into())
            }
        }
    }

    /// Like [`Inbox::try_receive`], logging refusals (duplicates at debug level) instead of
    /// returning them.
    pub fn receive<M: CborMessage>(&mut self, topic: &str, payload: &[u8], now: Instant) -> Option<M> {
        self.receive_with(topic, payload, now, M::from_cbor)
    }

    /// [`Inbox::try_receive_with`], logging refusals as [`Inbox::receive`] does.
    pub fn receive_with<T>(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        decode: impl FnOnce(&[u8], usize) -> Result<T, DecodeError>,
    ) -> Option<T> {
        match self.try_receive_with(topic, payload, now, decode) {
            Ok(m) => m,
            Err(InboxError::Frame(FrameError::Duplicate { message_id, index })) => {
                tracing::debug!(topic, message_id, index, "duplicate chunk ignored");
                None
            }
            Err(error) => {
                warn!(topic, %error, reason = %match &error {
                    InboxError::Frame(e) => e.kind(),
                    InboxError::Decode(e) => e.kind(),
                }, "payload refused");
                None
            }
        }
    }

    /// Drops partial messages past the timeout; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.reassembler.expire(now)
    }

    /// All refusals so far, frames and decoding.
    pub fn rejected(&self) -> RejectCounts {
        let mut all = self.reassembler.stats().rejected;
        for (kind, n) in self.decode_rejected.iter() {
            all.record_n(kind, n);
        }
        all
    }

    /// The reassembler's counters and occupancy.
    pub fn reassembly(&self) -> ReassemblyStats {
        self.reassembler.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{OutcomeAck, OutcomeKey};
    use crate::reject::RejectKind;

    #[test]
    fn inbox_decodes_and_counts_both_layers() {
        let mut inbox = Inbox::new(ReassemblyLimits::default());
        let now = Instant::now();
        let ack = OutcomeAck {
            batch_id: 4,
            accepted: vec![OutcomeKey {
                dialogue_id: "a-dialogue-id-long-enough-to-need-chunks".into(),
                turn: 1,
            }],
            rejected: vec![],
        };
        let frames = crate::split(&ack.to_cbor().unwrap(), 60, 5).unwrap();
        assert!(frames.len() > 1);
        let mut got = None;
        for f in &frames {
            got = inbox.receive::<OutcomeAck>("t", f, now);
        }
        assert_eq!(got, Some(ack));
        assert_eq!(inbox.receive::<OutcomeAck>("t", b"junk", now), None);
        let not_cbor = crate::split(b"\x83\x01\x04\xff\xff", 100, 6).unwrap();
        assert!(matches!(
            inbox.try_receive::<OutcomeAck>("t", &not_cbor[0], now),
            Err(InboxError::Decode(_))
        ));
        let r = inbox.rejected();
        assert_eq!(r.get(RejectKind::Malformed), 2);
        assert_eq!(r.total(), 2);
    }
}

//! Counted reasons why a received payload was refused.

use std::fmt;

/// The kind of a refusal, for counters and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectKind {
    /// Not a frame or not valid CBOR/JSON for the expected type.
    Malformed,
    /// A frame or message of another protocol version.
    WrongVersion,
    /// Larger than the configured limit.
    Oversized,
    /// The reassembled bytes do not match the sha256 announced in the chunk header.
    BadChecksum,
    /// A new chunked message while the limit of partial messages is reached.
    TooManyPartials,
    /// A new chunked message whose size would exceed the bytes allowed for partial messages.
    PartialBytesExceeded,
    /// A chunk whose header contradicts earlier chunks of the same message, or out of range.
    Inconsistent,
    /// A chunk received twice (QoS 1 redelivery); ignored.
    Duplicate,
    /// A partial message not completed within the timeout, dropped.
    Expired,
    /// Well-formed but semantically invalid (bad device id, wrong field values).
    Invalid,
    /// A chunk on a topic whose messages are single packets by design.
    ChunkNotAllowed,
}

impl RejectKind {
    /// Every kind, in counter order.
    pub const ALL: [RejectKind; 11] = [
        RejectKind::Malformed,
        RejectKind::WrongVersion,
        RejectKind::Oversized,
        RejectKind::BadChecksum,
        RejectKind::TooManyPartials,
        RejectKind::PartialBytesExceeded,
        RejectKind::Inconsistent,
        RejectKind::Duplicate,
        RejectKind::Expired,
        RejectKind::Invalid,
        RejectKind::ChunkNotAllowed,
    ];

    /// A short snake_case name, for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::Malformed => "malformed",
            RejectKind::WrongVersion => "wrong_version",
            RejectKind::Oversized => "oversized",
            RejectKind::BadChecksum => "bad_checksum",
            RejectKind::TooManyPartials => "too_many_partials",
            RejectKind::PartialBytesExceeded => "partial_bytes_exceeded",
            RejectKind::Inconsistent => "inconsistent",
            RejectKind::Duplicate => "duplicate",
            RejectKind::Expired => "expired",
            RejectKind::Invalid => "invalid",
            RejectKind::ChunkNotAllowed => "chunk_not_allowed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RejectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One counter per [`RejectKind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RejectCounts {
    counts: [u64; RejectKind::ALL.len()],
}

impl RejectCounts {
    /// Adds one refusal of `kind`.
    pub fn record(&mut self, kind: RejectKind) {
        self.counts[kind.index()] += 1;
    }

    /// Adds `n` refusals of `kind`.
    pub fn record_n(&mut self, kind: RejectKind, n: u64) {
        self.counts[kind.index()] += n;
    }

    /// The number of refusals of `kind`.
    pub fn get(&self, kind: RejectKind) -> u64 {
        self.counts[kind.index()]
    }

    /// All refusals.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(kind, count)` for every kind, zeros included.
    pub fn iter(&self) -> impl Iterator<Item = (RejectKind, u64)> + '_ {
        RejectKind::ALL.iter().map(|k| (*k, self.get(*k)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_per_kind() {
        let mut c = RejectCounts::default();
        c.record(RejectKind::Malformed);
        c.record(RejectKind::Malformed);
        c.record_n(RejectKind::Expired, 3);
        assert_eq!(c.get(RejectKind::Malformed), 2);
        assert_eq!(c.get(RejectKind::Expired), 3);
        assert_eq!(c.get(RejectKind::Oversized), 0);
        assert_eq!(c.total(), 5);
        assert_eq!(c.iter().count(), RejectKind::ALL.len());
        for (i, k) in RejectKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }
}

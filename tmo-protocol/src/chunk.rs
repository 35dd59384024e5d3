//! Frames: how a binary payload travels in one or several MQTT publishes.
//!
//! Every binary (CBOR) payload is sent as frames. A frame starts with `b"TM"`, the frame
//! format version (1) and a frame type:
//!
//! - `W` (whole): `TM 01 'W' | body`, 4 bytes of header.
//! - `C` (chunk): `TM 01 'C' | message id u64 | index u32 | count u32 | total length u32 |
//!   sha256 of the whole body (32 bytes) | chunk data`, 56 bytes of header, integers big-endian.
//!
//! [`split`] turns a body into frames no larger than a maximum frame size; a [`Reassembler`]
//! puts chunks back together with limits on sizes, on concurrent partial messages and on time,
//! and verifies the checksum. It never panics, never blocks and holds bounded memory: a partial
//! message is charged its announced length plus the slot table its declared chunk count
//! allocates. Chunks on topics whose messages are single packets by design (cloud requests and
//! outcome batches, which a shared subscription spreads over several processes:
//! [`Topic::single_packet`]) are refused before anything is stored.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::reject::{RejectCounts, RejectKind};
use crate::topic::Topic;

/// Frame format version carried in every frame header.
pub const FRAME_VERSION: u8 = 1;
const MAGIC: &[u8; 2] = b"TM";
const TYPE_WHOLE: u8 = b'W';
const TYPE_CHUNK: u8 = b'C';
/// Header bytes of a whole frame.
pub const WHOLE_HEADER_BYTES: usize = 4;
/// Header bytes of a chunk frame.
pub const CHUNK_HEADER_BYTES: usize = 4 + 8 + 4 + 4 + 4 + 32;
/// Bytes a partial message allocates per declared chunk (its slot), charged on admission.
pub const CHUNK_SLOT_BYTES: usize = std::mem::size_of::<Option<Vec<u8>>>();

/// Why a body could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// The maximum frame size leaves no room for chunk data.
    #[error(
        "maximum frame size {max_frame_bytes} leaves no room after the {CHUNK_HEADER_BYTES}-byte chunk header"
    )]
    FrameTooSmall {
        /// The configured maximum.
        max_frame_bytes: usize,
    },
    /// The body is larger than a chunked message may be (4 GiB).
    #[error("body of {len} bytes cannot be chunked (limit {max})")]
    BodyTooLarge {
        /// Body length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Splits `body` into frames of at most `max_frame_bytes` bytes: one whole frame if it fits,
/// chunks with the id `message_id` otherwise.
pub fn split(body: &[u8], max_frame_bytes: usize, message_id: u64) -> Result<Vec<Vec<u8>>, SplitError> {
    if body.len() + WHOLE_HEADER_BYTES <= max_frame_bytes {
        let mut frame = Vec::with_capacity(body.len() + WHOLE_HEADER_BYTES);
        frame.extend_from_slice(MAGIC);
        frame.push(FRAME_VERSION);
        frame.push(TYPE_WHOLE);
        frame.extend_from_slice(body);
        return Ok(vec![frame]);
    }
    let data_per_chunk = max_frame_bytes
        .checked_sub(CHUNK_HEADER_BYTES)
        .filter(|n| *n > 0)
        .ok_or(SplitError::FrameTooSmall { max_frame_bytes })?;
    let max = u32::MAX as usize;
    let total_len =
        u32::try_from(body.len()).map_err(|_| SplitError::BodyTooLarge { len: body.len(), max })?;
    let count = body.len().div_ceil(data_per_chunk);
    let count = u32::try_from(count).map_err(|_| SplitError::BodyTooLarge { len: body.len(), max })?;
    let digest: [u8; 32] = Sha256::digest(body).into();
    Ok(body
        .chunks(data_per_chunk)
        .zip(0u32..)
        .map(|(data, index)| {
            let mut frame = Vec::with_capacity(CHUNK_HEADER_BYTES + data.len());
            frame.extend_from_slice(MAGIC);
            frame.push(FRAME_VERSION);
            frame.push(TYPE_CHUNK);
            frame.extend_from_slice(&message_id.to_be_bytes());
            frame.extend_from_slice(&index.to_be_bytes());
            frame.extend_from_slice(&count.to_be_bytes());
            frame.extend_from_slice(&total_len.to_be_bytes());
            frame.extend_from_slice(&digest);
            frame.extend_from_slice(data);
            frame
        })
        .collect())
}

/// A fresh message id: time, process id and a counter, so that ids differ across restarts
/// and across processes publishing on the same topic.
pub fn new_message_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = nanos ^ (u64::from(std::process::id()) << 40);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // splitmix64 finaliser to spread the bits.
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A refused frame, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a frame of this protocol.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A frame of another format version.
    #[error("frame version {found}, expected {FRAME_VERSION}")]
    WrongVersion {
        /// The version found.
        found: u8,
    },
    /// The message is larger than the limit.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// Announced or actual length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The reassembled body does not match its sha256.
    #[error("checksum mismatch on message {message_id:#x}")]
    BadChecksum {
        /// The message id.
        message_id: u64,
    },
    /// Too many partial messages at once.
    #[error("{limit} partial messages already in progress")]
    TooManyPartials {
        /// The limit.
        limit: usize,
    },
    /// Partial messages would hold more than the byte limit.
    #[error("partial messages would hold {would_hold} bytes, limit {limit}")]
    PartialBytesExceeded {
        /// Bytes reserved if accepted.
        would_hold: usize,
        /// The limit.
        limit: usize,
    },
    /// A chunk contradicting earlier chunks or its own header.
    #[error("inconsistent chunk of message {message_id:#x}: {reason}")]
    Inconsistent {
        /// The message id.
        message_id: u64,
        /// What does not match.
        reason: String,
    },
    /// A chunk on a topic whose messages are single packets by design.
    #[error("chunked frame on {topic}, where messages are single packets")]
    ChunkNotAllowed {
        /// The topic the chunk came on.
        topic: String,
    },
    /// A chunk already received.
    #[error("duplicate chunk {index} of message {message_id:#x}")]
    Duplicate {
        /// The message id.
        message_id: u64,
        /// The chunk index.
        index: u32,
    },
}

impl FrameError {
    /// The counter this refusal goes to.
    pub fn kind(&self) -> RejectKind {
        match self {
            FrameError::Malformed(_) => RejectKind::Malformed,
            FrameError::WrongVersion { .. } => RejectKind::WrongVersion,
            FrameError::Oversized { .. } => RejectKind::Oversized,
            FrameError::BadChecksum { .. } => RejectKind::BadChecksum,
            FrameError::TooManyPartials { .. } => RejectKind::TooManyPartials,
            FrameError::PartialBytesExceeded { .. } => RejectKind::PartialBytesExceeded,
            FrameError::Inconsistent { .. } => RejectKind::Inconsistent,
            FrameError::Duplicate { .. } => RejectKind::Duplicate,
            FrameError::ChunkNotAllowed { .. } => RejectKind::ChunkNotAllowed,
        }
    }
}

/// Limits of a [`Reassembler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Largest body accepted, whole or chunked.
    pub max_message_bytes: usize,
    /// Most chunked messages in progress at once.
    pub max_partial_messages: usize,
    /// Most bytes reserved by chunked messages in progress: their announced lengths plus
    /// [`CHUNK_SLOT_BYTES`] per declared chunk.
    pub max_partial_bytes: usize,
    /// A chunked message not complete after this long is dropped.
    pub timeout: Duration,
}

impl Default for ReassemblyLimits {
    /// 16 MiB messages, 32 partial messages holding at most 64 MiB, 30 s timeout.
    fn default() -> Self {
        Self {
            max_message_bytes: 16 << 20,
            max_partial_messages: 32,
            max_partial_bytes: 64 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

struct ChunkHeader<'a> {
    message_id: u64,
    index: u32,
    count: u32,
    total_len: u32,
    digest: [u8; 32],
    data: &'a [u8],
}

enum Frame<'a> {
    Whole(&'a [u8]),
    Chunk(ChunkHeader<'a>),
}

fn be_u32(bytes: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[..4]);
    u32::from_be_bytes(b)
}

fn parse_frame(frame: &[u8]) -> Result<Frame<'_>, FrameError> {
    if frame.len() < WHOLE_HEADER_BYTES || &frame[..2] != MAGIC {
        return Err(FrameError::Malformed("missing TM frame header".into()));
    }
    if frame[2] != FRAME_VERSION {
        return Err(FrameError::WrongVersion { found: frame[2] });
    }
    match frame[3] {
        TYPE_WHOLE => Ok(Frame::Whole(&frame[WHOLE_HEADER_BYTES..])),
        TYPE_CHUNK => {
            if frame.len() < CHUNK_HEADER_BYTES {
                return Err(FrameError::Malformed(format!(
                    "chunk frame of {} bytes is shorter than its header",
                    frame.len()
                )));
            }
            let mut id = [0u8; 8];
            id.copy_from_slice(&frame[4..12]);
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&frame[24..56]);
            Ok(Frame::Chunk(ChunkHeader {
                message_id: u64::from_be_bytes(id),
                index: be_u32(&frame[12..16]),
                count: be_u32(&frame[16..20]),
                total_len: be_u32(&frame[20..24]),
                digest,
                data: &frame[CHUNK_HEADER_BYTES..],
            }))
        }
        other => Err(FrameError::Malformed(format!("unknown frame type {other:#04x}"))),
    }
}

struct Partial {
    started: Instant,
    count: u32,
    total_len: usize,
    /// Bytes charged against the partial limit: `total_len` + the slot table.
    reserved: usize,
    digest: [u8; 32],
    chunks: Vec<Option<Vec<u8>>>,
    received_chunks: u32,
    received_bytes: usize,
}

/// Counters of a [`Reassembler`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReassemblyStats {
    /// Bodies delivered (whole frames and completed chunked messages).
    pub delivered: u64,
    /// Chunked messages completed.
    pub reassembled: u64,
    /// Refusals by reason (expired partial messages under [`RejectKind::Expired`]).
    pub rejected: RejectCounts,
    /// Chunked messages in progress now.
    pub partial_messages: usize,
    /// Bytes reserved by chunked messages in progress now (bodies and slot tables).
    pub partial_bytes: usize,
}

/// Puts chunked messages back together. Partial messages are keyed by (source, message id),
/// the source being the topic the chunks came on, so that sources cannot collide.
///
/// Admission is by what a message will hold: a first chunk reserves the message's total length
/// and a slot per declared chunk against [`ReassemblyLimits::max_partial_bytes`], so memory
/// stays bounded however chunks arrive (a chunk declaring a million one-byte chunks is charged
/// for the million slots its table takes). A message over a limit is refused as a whole (its
/// later chunks are refused too). A chunk whose source is a topic of single-packet messages
/// ([`Topic::single_packet`]) is refused with [`FrameError::ChunkNotAllowed`].
pub struct Reassembler {
    limits: ReassemblyLimits,
    partials: HashMap<(String, u64), Partial>,
    reserved_bytes: usize,
    stats: ReassemblyStats,
}

impl std::fmt::Debug for Reassembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reassembler").field("limits", &self.limits).field("stats", &self.stats()).finish()
    }
}

impl Reassembler {
    /// An empty reassembler with these limits.
    pub fn new(limits: ReassemblyLimits) -> Self {
        Self { limits, partials: HashMap::new(), reserved_bytes: 0, stats: ReassemblyStats::default() }
    }

    /// The limits.
    pub fn limits(&self) -> &ReassemblyLimits {
        &self.limits
    }

    /// Counters and current occupancy.
    pub fn stats(&self) -> ReassemblyStats {
        ReassemblyStats {
            partial_messages: self.partials.len(),
            partial_bytes: self.reserved_bytes,
            ..self.stats
        }
    }

    /// Takes one frame received on `source` at `now`. Returns the body when a message is
    /// complete (a whole frame, or the last missing chunk), `None` when a chunk was stored.
    /// Every refusal is counted in [`ReassemblyStats::rejected`]. Partial messages older than
    /// the timeout are dropped first.
    pub fn accept(
        &mut self,
        source: &str,
        frame: &[u8],
        now: Instant,
    ) -> Result<Option<Vec<u8>>, FrameError> {
        self.expire(now);
        let result = self.accept_inner(source, frame, now);
        match &result {
            Ok(Some(_)) => self.stats.delivered += 1,
            Ok(None) => {}
            Err(e) => self.stats.rejected.record(e.kind()),
        }
        result
    }

    /// Drops partial messages older than the timeout; returns how many were dropped.
    pub fn expire(&mut self, now: Instant) -> usize {
        let timeout = self.limits.timeout;
        let before = self.partials.len();
        let mut freed = 0;
        self.partials.retain(|_, p| {
            let keep = now.saturating_duration_since(p.started) < timeout;
            if !keep {
                freed += p.reserved;
            }
            keep
        });
        self.reserved_bytes -= freed;
        let dropped = before - self.partials.len();
        self.stats.rejected.record_n(RejectKind::Expired, dropped as u64);
        dropped
    }

    fn accept_inner(
        &mut self,
        source: &str,
        frame: &[u8],
        now: Instant,
    ) -> Result<Option<Vec<u8>>, FrameError> {
        let max = self.limits.max_message_bytes;
        let chunk = match parse_frame(frame)? {
            Frame::Whole(body) => {
                if body.len() > max {
                    return Err(FrameError::Oversized { len: body.len(), max });
                }
                return Ok(Some(body.to_vec()));
            }
            Frame::Chunk(chunk) => chunk,
        };
        if Topic::parse(source).is_ok_and(|t| t.single_packet()) {
            return Err(FrameError::ChunkNotAllowed { topic: source.to_owned() });
        }
        let message_id = chunk.message_id;
        let inconsistent = |reason: String| FrameError::Inconsistent { message_id, reason };
        let total_len = chunk.total_len as usize;
        if total_len > max {
            return Err(FrameError::Oversized { len: total_len, max });
        }
        if chunk.count == 0 || chunk.index >= chunk.count {
            return Err(inconsistent(format!("index {} of count {}", chunk.index, chunk.count)));
        }
        // Every chunk carries at least one byte, so count cannot exceed the total length.
        if chunk.count as usize > total_len.max(1) || chunk.data.is_empty() {
            return Err(inconsistent(format!(
                "{} chunks for {} bytes (chunk of {} bytes)",
                chunk.count,
                total_len,
                chunk.data.len()
            )));
        }
        let key = (source.to_owned(), message_id);
        if !self.partials.contains_key(&key) {
            if self.partials.len() >= self.limits.max_partial_messages {
                return Err(FrameError::TooManyPartials { limit: self.limits.max_partial_messages });
            }
            // count <= total_len <= max_message_bytes (checked above): no overflow.
            let reserved = total_len + chunk.count as usize * CHUNK_SLOT_BYTES;
            let would_hold = self.reserved_bytes.saturating_add(reserved);
            if would_hold > self.limits.max_partial_bytes {
                return Err(FrameError::PartialBytesExceeded {
                    would_hold,
                    limit: self.limits.max_partial_bytes,
                });
            }
            self.reserved_bytes += reserved;
            self.partials.insert(
                key.clone(),
                Partial {
                    started: now,
                    count: chunk.count,
                    total_len,
                    reserved,
                    digest: chunk.digest,
                    chunks: vec![None; chunk.count as usize],
                    received_chunks: 0,
                    received_bytes: 0,
                },
            );
        }
        let Some(partial) = self.partials.get_mut(&key) else {
            return Err(inconsistent("partial message vanished".into()));
        };
        if partial.count != chunk.count || partial.total_len != total_len || partial.digest != chunk.digest {
            let reason = format!(
                "header says {} chunks / {} bytes, earlier chunks said {} / {} (or another checksum)",
                chunk.count, total_len, partial.count, partial.total_len
            );
            self.drop_partial(&key);
            return Err(inconsistent(reason));
        }
        let slot = chunk.index as usize;
        if partial.chunks[slot].is_some() {
            return Err(FrameError::Duplicate { message_id, index: chunk.index });
        }
        if partial.received_bytes + chunk.data.len() > partial.total_len {
            let reason = format!("chunks add up to more than the announced {} bytes", partial.total_len);
            self.drop_partial(&key);
            return Err(inconsistent(reason));
        }
        partial.received_bytes += chunk.data.len();
        partial.received_chunks += 1;
        partial.chunks[slot] = Some(chunk.data.to_vec());
        if partial.received_chunks < partial.count {
            return Ok(None);
        }
        let Some(partial) = self.partials.remove(&key) else {
            return Err(inconsistent("partial message vanished".into()));
        };
        self.reserved_bytes -= partial.reserved;
        if partial.received_bytes != partial.total_len {
            return Err(inconsistent(format!(
                "chunks add up to {} bytes, announced {}",
                partial.received_bytes, partial.total_len
            )));
        }
        let mut body = Vec::with_capacity(partial.total_len);
        for data in partial.chunks.into_iter().flatten() {
            body.extend_from_slice(&data);
        }
        let digest: [u8; 32] = Sha256::digest(&body).into();
        if digest != partial.digest {
            return Err(FrameError::BadChecksum { message_id });
        }
        self.stats.reassembled += 1;
        Ok(Some(body))
    }

    fn drop_partial(&mut self, key: &(String, u64)) {
        if let Some(p) = self.partials.remove(key) {
            self.reserved_bytes -= p.reserved;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn limits() -> ReassemblyLimits {
        ReassemblyLimits {
            max_message_bytes: 1 << 20,
            max_partial_messages: 2,
            max_partial_bytes: 600_000,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn small_body_is_one_whole_frame() {
        let b = body(100);
        let frames = split(&b, 1000, 7).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].len(), 104);
        let mut r = Reassembler::new(limits());
        assert_eq!(r.accept("t", &frames[0], Instant::now()).unwrap(), Some(b));
    }

    #[test]
    fn chunks_reassemble_in_any_order_and_respect_the_frame_size() {
        let b = body(300_000);
        let mut frames = split(&b, 16_384, 42).unwrap();
        assert_eq!(frames.len(), 300_000usize.div_ceil(16_384 - CHUNK_HEADER_BYTES));
        assert!(frames.iter().all(|f| f.len() <= 16_384));
        frames.reverse();
        let mut r = Reassembler::new(limits());
        let now = Instant::now();
        let last = frames.pop().unwrap();
        for f in &frames {
            assert_eq!(r.accept("t", f, now).unwrap(), None);
        }
        assert_eq!(r.stats().partial_messages, 1);
        assert_eq!(r.accept("t", &last, now).unwrap(), Some(b));
        let s = r.stats();
        assert_eq!((s.delivered, s.reassembled, s.partial_messages, s.partial_bytes), (1, 1, 0, 0));
    }

    #[test]
    fn flipped_byte_is_a_bad_checksum() {
        let b = body(50_000);
        let mut frames = split(&b, 10_000, 1).unwrap();
        let n = frames[2].len();
        frames[2][n - 1] ^= 0x01;
        let mut r = Reassembler::new(limits());
        let now = Instant::now();
        let mut result = Ok(None);
        for f in &frames {
            result = r.accept("t", f, now);
        }
        assert_eq!(result, Err(FrameError::BadChecksum { message_id: 1 }));
        assert_eq!(r.stats().rejected.get(RejectKind::BadChecksum), 1);
        assert_eq!(r.stats().partial_bytes, 0);
    }

    #[test]
    fn garbage_and_other_versions_are_refused() {
        let mut r = Reassembler::new(limits());
        let now = Instant::now();
        assert!(matches!(r.accept("t", b"", now), Err(FrameError::Malformed(_))));
        assert!(matches!(r.accept("t", b"{\"json\":1}", now), Err(FrameError::Malformed(_))));
        assert!(matches!(r.accept("t", b"TM\x02W", now), Err(FrameError::WrongVersion { found: 2 })));
        assert!(matches!(r.accept("t", b"TM\x01X", now), Err(FrameError::Malformed(_))));
        assert!(matches!(r.accept("t", b"TM\x01Cshort", now), Err(FrameError::Malformed(_))));
        let s = r.stats().rejected;
        assert_eq!((s.get(RejectKind::Malformed), s.get(RejectKind::WrongVersion)), (4, 1));
    }

    #[test]
    fn oversized_messages_are_refused_before_storing() {
        let mut r = Reassembler::new(limits());
        let now = Instant::now();
        let whole = split(&body(2 << 20), 4 << 20, 1).unwrap();
        assert!(matches!(r.accept("t", &whole[0], now), Err(FrameError::Oversized { .. })));
        let chunks = split(&body(2 << 20), 100_000, 2).unwrap();
        assert!(matches!(r.accept("t", &chunks[0], now), Err(FrameError::Oversized { .. })));
        assert_eq!(r.stats().partial_messages, 0);
        assert_eq!(r.stats().rejected.get(RejectKind::Oversized), 2);
    }

    #[test]
    fn partial_limits_and_timeout_bound_memory() {
        let mut r = Reassembler::new(limits());
        let t0 = Instant::now();
        let a = split(&body(250_000), 10_000, 1).unwrap();
        let b = split(&body(250_000), 10_000, 2).unwrap();
        let c = split(&body(250_000), 10_000, 3).unwrap();
        let d = split(&body(100_000), 10_000, 4).unwrap();
        r.accept("t", &a[0], t0).unwrap();
        r.accept("t", &b[0], t0).unwrap();
        // Third concurrent message: over the count limit.
        assert!(matches!(r.accept("t", &c[0], t0), Err(FrameError::TooManyPartials { limit: 2 })));
        // After the timeout the two partials are dropped and counted.
        let later = t0 + Duration::from_secs(6);
        assert_eq!(r.expire(later), 2);
        assert_eq!(r.stats().rejected.get(RejectKind::Expired), 2);
        assert_eq!(r.stats().partial_bytes, 0);
        // Bytes limit: 250 000 + 250 000 + 100 000 > 600 000 is fine, a second 250 000 is not.
        r.accept("t", &a[0], later).unwrap();
        r.accept("u", &d[0], later).unwrap();
        let mut big_limits = limits();
        big_limits.max_partial_messages = 10;
        let mut r2 = Reassembler::new(big_limits);
        r2.accept("t", &a[0], later).unwrap();
        r2.accept("t", &b[0], later).unwrap();
        assert!(matches!(r2.accept("t", &c[0], later), Err(FrameError::PartialBytesExceeded { .. })));
        // The same message id on another source is another message.
        let mut r3 = Reassembler::new(big_limits);
        r3.accept("dev-a", &a[0], later).unwrap();
        r3.accept("dev-b", &a[0], later).unwrap();
        assert_eq!(r3.stats().partial_messages, 2);
    }

    #[test]
    fn duplicates_and_contradictions_are_refused() {
        let mut r = Reassembler::new(limits());
        let now = Instant::now();
        let frames = split(&body(30_000), 10_000, 9).unwrap();
        r.accept("t", &frames[0], now).unwrap();
        assert!(matches!(r.accept("t", &frames[0], now), Err(FrameError::Duplicate { index: 0, .. })));
        // A chunk of the same id that announces another length drops the partial message.
        let other = split(&body(40_000), 10_000, 9).unwrap();
        assert!(matches!(r.accept("t", &other[1], now), Err(FrameError::Inconsistent { .. })));
        assert_eq!(r.stats().partial_messages, 0);
        // Index out of range.
        let mut bad = frames[1].clone();
        bad[12..16].copy_from_slice(&99u32.to_be_bytes());
        assert!(matches!(r.accept("t", &bad, now), Err(FrameError::Inconsistent { .. })));
        // The message still completes when sent again properly.
        let mut out = None;
        for f in &frames {
            out = r.accept("t", f, now).unwrap();
        }
        assert_eq!(out, Some(body(30_000)));
    }

    /// A chunk frame declaring `count` chunks of a `total_len`-byte message, one byte of data.
    fn crafted_first_chunk(message_id: u64, count: u32, total_len: u32) -> Vec<u8> {
        let mut frame = b"TM\x01C".to_vec();
        frame.extend_from_slice(&message_id.to_be_bytes());
        frame.extend_from_slice(&0u32.to_be_bytes());
        frame.extend_from_slice(&count.to_be_bytes());
        frame.extend_from_slice(&total_len.to_be_bytes());
        frame.extend_from_slice(&[0u8; 32]);
        frame.push(0);
        frame
    }

    #[test]
    fn first_chunks_are_charged_for_the_slots_they_allocate() {
        // The collector's and the bridge's shape: partial bytes 4 x the message limit.
        let max = 1 << 20;
        let mut r = Reassembler::new(ReassemblyLimits {
            max_message_bytes: max,
            max_partial_messages: 32,
            max_partial_bytes: 4 * max,
            timeout: Duration::from_secs(30),
        });
        let now = Instant::now();
        // Four 57-byte publishes, each declaring one chunk per byte of a 1 MiB message: a slot
        // each (24 MiB of slots per message), far beyond the 4 MiB the limit allows.
        let slot = std::mem::size_of::<Option<Vec<u8>>>();
        for id in 0..4u64 {
            let frame = crafted_first_chunk(id, max as u32, max as u32);
            let accepted = r.accept("t", &frame, now);
            let held = r.stats().partial_bytes;
            let allocated =
                r.partials.values().map(|p| p.chunks.capacity() * slot + p.total_len).sum::<usize>();
            assert!(held >= allocated, "charged {held} bytes for {allocated} allocated");
            assert!(held <= 4 * max, "holding {held}");
            assert!(
                matches!(accepted, Err(FrameError::PartialBytesExceeded { .. })),
                "message {id}: {accepted:?}"
            );
        }
        assert_eq!(r.stats().partial_messages, 0);
        // An honest chunked message of the same size still goes through.
        let b = body(max);
        let mut out = None;
        for f in split(&b, 16_384, 99).unwrap() {
            out = r.accept("t", &f, now).unwrap();
        }
        assert_eq!(out, Some(b));
        assert_eq!(r.stats().partial_bytes, 0);
    }

    #[test]
    fn chunks_on_single_packet_topics_are_refused_before_storing() {
        let mut r = Reassembler::new(limits());
        let now = Instant::now();
        let frames = split(&body(30_000), 10_000, 5).unwrap();
        for topic in ["tmo/v1/dev/a/cloud/req", "tmo/v1/dev/a/outcomes"] {
            let refused = r.accept(topic, &frames[0], now);
            assert!(matches!(refused, Err(FrameError::ChunkNotAllowed { .. })), "{topic}: {refused:?}");
        }
        assert_eq!(r.stats().partial_messages, 0);
        assert_eq!(r.stats().rejected.get(RejectKind::ChunkNotAllowed), 2);
        // Whole frames there, and chunks on other topics (replies, bundles), still pass.
        let whole = split(&body(100), 10_000, 6).unwrap();
        assert_eq!(r.accept("tmo/v1/dev/a/cloud/req", &whole[0], now).unwrap(), Some(body(100)));
        let mut out = None;
        for f in &frames {
            out = r.accept("tmo/v1/dev/a/cloud/reply", f, now).unwrap();
        }
        assert_eq!(out, Some(body(30_000)));
    }

    #[test]
    fn frame_size_must_leave_room_for_data() {
        assert_eq!(
            split(&body(1000), CHUNK_HEADER_BYTES, 1),
            Err(SplitError::FrameTooSmall { max_frame_bytes: CHUNK_HEADER_BYTES })
        );
        assert_eq!(split(&body(1000), CHUNK_HEADER_BYTES + 1, 1).unwrap().len(), 1000);
    }

    #[test]
    fn message_ids_differ() {
        let ids: std::collections::HashSet<u64> = (0..1000).map(|_| new_message_id()).collect();
        assert_eq!(ids.len(), 1000);
    }
}

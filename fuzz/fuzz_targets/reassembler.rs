//! `Reassembler::accept` (and the `Inbox` over it) with small limits, two ways:
//!
//! - first byte 0: a body split into frames by `split`, fed in a rotated order, must come back
//!   whole, exactly once, on the last frame;
//! - otherwise: a sequence of operations `[source, time step, length, frame bytes...]` on
//!   several sources (one a topic where chunks are refused); the limits on partial messages
//!   and bytes must hold after every frame.

#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tmo_protocol::chunk::{CHUNK_HEADER_BYTES, CHUNK_SLOT_BYTES};
use tmo_protocol::{CloudReply, Inbox, Reassembler, ReassemblyLimits, split};

const LIMITS: ReassemblyLimits = ReassemblyLimits {
    max_message_bytes: 4096,
    max_partial_messages: 4,
    max_partial_bytes: 4096 + 64 * CHUNK_SLOT_BYTES,
    timeout: Duration::from_secs(5),
};

const SOURCES: [&str; 4] = [
    "tmo/v1/dev/kitchen-a/cloud/reply",
    "tmo/v1/group/kitchens/policy",
    "tmo/v1/dev/kitchen-a/outcomes",
    "not/a/tmo/topic",
];

fn round_trip(data: &[u8]) {
    let [a, b, rotate, body @ ..] = data else { return };
    if body.len() > LIMITS.max_message_bytes {
        return;
    }
    let max_frame = CHUNK_HEADER_BYTES + 1 + usize::from(u16::from_be_bytes([*a, *b]) % 512);
    let Ok(mut frames) = split(body, max_frame, 0x5eed) else { return };
    let n = frames.len();
    if n > 1 && body.len() + n * CHUNK_SLOT_BYTES > LIMITS.max_partial_bytes {
        // Refused by design: more than the partial-byte limit (its slot table included).
        return;
    }
    frames.rotate_left(usize::from(*rotate) % n);
    let mut reassembler = Reassembler::new(LIMITS);
    let now = Instant::now();
    for (i, frame) in frames.iter().enumerate() {
        let got = reassembler.accept(SOURCES[0], frame, now);
        if i + 1 < n {
            assert_eq!(got, Ok(None), "frame {i} of {n}");
        } else {
            assert_eq!(got.as_ref().map(|b| b.as_deref()), Ok(Some(body)), "the last of {n} frames");
        }
    }
    let stats = reassembler.stats();
    assert_eq!((stats.partial_messages, stats.partial_bytes), (0, 0));
    assert_eq!(stats.delivered, 1);
}

fn operations(mut data: &[u8]) {
    let start = Instant::now();
    let mut now = start;
    let mut latest = start;
    let mut reassembler = Reassembler::new(LIMITS);
    let mut inbox = Inbox::new(LIMITS);
    while let [source, step, len, rest @ ..] = data {
        let len = usize::from(*len).min(rest.len());
        let (frame, tail) = rest.split_at(len);
        data = tail;
        // Steps of 0 to 7.65 s, now and then backwards (a clock that is not monotonic).
        if *step == 0xff {
            now = start;
        } else {
            now += Duration::from_millis(u64::from(*step) * 30);
        }
        latest = latest.max(now);
        let source = SOURCES[usize::from(*source) % SOURCES.len()];
        if let Ok(Some(body)) = reassembler.accept(source, frame, now) {
            assert!(body.len() <= LIMITS.max_message_bytes);
        }
        let _ = inbox.try_receive::<CloudReply>(source, frame, now);
        for stats in [reassembler.stats(), inbox.reassembly()] {
            assert!(stats.partial_messages <= LIMITS.max_partial_messages, "{stats:?}");
            assert!(stats.partial_bytes <= LIMITS.max_partial_bytes, "{stats:?}");
        }
    }
    // After the timeout past the latest instant seen, nothing is held.
    reassembler.expire(latest + LIMITS.timeout);
    assert_eq!(reassembler.stats().partial_bytes, 0);
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, rest)) => round_trip(rest),
        Some((_, rest)) => operations(rest),
        None => {}
    }
});

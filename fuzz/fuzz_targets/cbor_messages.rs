//! The CBOR message decoders of tmo-protocol (`CborMessage::from_cbor`): cloud requests,
//! replies, answer pieces and cancels, outcome batches and acks, policy bundles, as a device, bridge or collector receives
//! them. The kind byte of the body header picks the type; a decoded message must encode again,
//! and its encoding must decode to a message that encodes the same (the bridge and collector
//! re-encode what they pass on).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tmo_protocol::messages::ReplyRoute;
use tmo_protocol::{
    CborMessage, CloudCancel, CloudChunk, CloudReply, CloudRequest, MAX_CHUNK_TEXT_BYTES, OutcomeAck,
    OutcomeBatch, PolicyBundle, ReplyResult,
};

const MAX_BYTES: usize = 1 << 20;

fn round_trip<M: CborMessage>(body: &[u8]) -> Option<M> {
    let message = M::from_cbor(body, MAX_BYTES).ok()?;
    let encoded = message.to_cbor().expect("a decoded message encodes");
    let again = M::from_cbor(&encoded, usize::MAX).expect("a re-encoded message decodes");
    // Floats (NaN) make PartialEq useless here: compare the encodings.
    assert_eq!(again.to_cbor().expect("encodes"), encoded, "re-encoding is not stable");
    Some(message)
}

fuzz_target!(|body: &[u8]| {
    match body.get(2) {
        Some(1) => {
            if let Some(request) = round_trip::<CloudRequest>(body) {
                let topic = request.topic().name();
                let route = ReplyRoute::for_request(&request, &topic, None, Some(b"12345678"))
                    .expect("a request on its own topic has a reply route");
                assert!(route.topic.ends_with("/cloud/reply"));
                let _ = request.expired(u64::MAX / 2);
            }
        }
        Some(2) => {
            if let Some(reply) = round_trip::<CloudReply>(body)
                && let ReplyResult::Answer(answer) = &reply.result
            {
                let _ = answer.check();
            }
        }
        Some(3) => {
            round_trip::<OutcomeBatch>(body);
        }
        Some(4) => {
            round_trip::<OutcomeAck>(body);
        }
        Some(5) => {
            if let Some(bundle) = round_trip::<PolicyBundle>(body) {
                // No key is trusted: refused, whatever the bytes.
                assert!(bundle.verify(&[]).is_err());
            }
        }
        Some(6) => {
            if let Some(chunk) = round_trip::<CloudChunk>(body) {
                assert!(chunk.text.len() <= MAX_CHUNK_TEXT_BYTES);
            }
        }
        Some(7) => {
            round_trip::<CloudCancel>(body);
        }
        _ => {
            // Headers of no known kind: every decoder refuses them.
            assert!(CloudRequest::from_cbor(body, MAX_BYTES).is_err());
            assert!(PolicyBundle::from_cbor(body, MAX_BYTES).is_err());
        }
    }
});

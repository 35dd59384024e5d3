//! The JSON message decoders of tmo-protocol (`JsonMessage::from_json`): a device's retained
//! status (read by the fleet tools), a judge's score and the cloud's capabilities (read by a
//! device). A decoded message
//! must encode again to JSON that decodes (the fleet re-publishes statuses it read).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tmo_protocol::{CloudCapabilities, DeviceStatus, JsonMessage, JudgeScore};

const MAX_BYTES: usize = 1 << 16;

fn round_trip<M: JsonMessage>(bytes: &[u8]) {
    if let Ok(message) = M::from_json(bytes, MAX_BYTES) {
        let encoded = message.to_json().expect("a decoded message encodes");
        if let Err(e) = M::from_json(&encoded, usize::MAX) {
            panic!("re-encoded {} does not decode: {e}\n{}", M::NAME, String::from_utf8_lossy(&encoded));
        }
    }
}

fuzz_target!(|bytes: &[u8]| {
    round_trip::<DeviceStatus>(bytes);
    round_trip::<JudgeScore>(bytes);
    round_trip::<CloudCapabilities>(bytes);
});

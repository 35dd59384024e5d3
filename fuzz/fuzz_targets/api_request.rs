//! The request bodies of tmod's local API as the daemon parses them (daemon/src/api.rs:
//! `serde_json::from_slice` into tmod-api's `AskRequest` and `FeedbackRequest`, then the
//! checks of `Service::decide` and `Service::feedback`), and the answer bodies the app parses.
//! Depends on tmod-api only: the daemon crate would bring tract and candle into the build.
//! A parsed request must encode to JSON that parses to the same request.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tmod_api::{AskRequest, AskResponse, DialogueCreated, ErrorBody, FeedbackRequest};

fuzz_target!(|body: &[u8]| {
    if let Ok(ask) = serde_json::from_slice::<AskRequest>(body) {
        // The daemon's first check (Service::decide): a question that is only spaces is refused.
        let _refused = ask.text.trim().is_empty();
        let json = serde_json::to_vec(&ask).expect("encodes");
        let again: AskRequest = serde_json::from_slice(&json).expect("a re-encoded ask request parses");
        assert_eq!(again, ask);
    }
    if let Ok(feedback) = serde_json::from_slice::<FeedbackRequest>(body) {
        // JSON has no NaN or infinity: a parsed score is finite (Service::feedback relies on
        // the range check alone).
        assert!(feedback.score.is_finite());
        let json = serde_json::to_vec(&feedback).expect("encodes");
        let again: FeedbackRequest = serde_json::from_slice(&json).expect("re-encoded feedback parses");
        assert_eq!((&again.dialogue_id, again.turn), (&feedback.dialogue_id, feedback.turn));
        let tolerance = feedback.score.abs() * 4.0 * f64::EPSILON;
        assert!((again.score - feedback.score).abs() <= tolerance, "{} {}", again.score, feedback.score);
    }
    let _ = serde_json::from_slice::<AskResponse>(body);
    let _ = serde_json::from_slice::<DialogueCreated>(body);
    let _ = serde_json::from_slice::<ErrorBody>(body);
});

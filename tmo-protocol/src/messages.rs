//! The payload types of protocol v1.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::{CborMessage, JsonMessage, MessageKind, message_version};
use crate::topic::{DeviceId, GroupName, Topic};

/// Identifies a cloud request; echoed in the reply (and, on MQTT v5, also the correlation data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u64);

impl RequestId {
    /// A fresh id (time, process and counter mixed), unique for practical purposes.
    pub fn generate() -> Self {
        Self(crate::chunk::new_message_id())
    }

    /// The 8 bytes sent as MQTT v5 correlation data.
    pub fn to_correlation_data(self) -> Bytes {
        Bytes::copy_from_slice(&self.0.to_be_bytes())
    }

    /// Reads correlation data written by [`RequestId::to_correlation_data`].
    pub fn from_correlation_data(data: &[u8]) -> Option<Self> {
        let bytes: [u8; 8] = data.try_into().ok()?;
        Some(Self(u64::from_be_bytes(bytes)))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The media type of an attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MediaType {
    /// A JPEG camera frame.
    #[serde(rename = "image/jpeg")]
    ImageJpeg,
    /// A WAV audio clip.
    #[serde(rename = "audio/wav")]
    AudioWav,
}

impl MediaType {
    /// The MIME type, e.g. for data URLs.
    pub fn mime(self) -> &'static str {
        match self {
            MediaType::ImageJpeg => "image/jpeg",
            MediaType::AudioWav => "audio/wav",
        }
    }
}

/// A modality sent with a cloud request.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Index of the modality in the board profile's order (m0, m1, ...).
    pub modality: u8,
    /// The modality's name in the profile (e.g. `camera-top`, `audio`).
    pub name: String,
    /// What the bytes are.
    pub media_type: MediaType,
    /// The encoded frame or clip, a CBOR byte string.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("modality", &self.modality)
            .field("name", &self.name)
            .field("media_type", &self.media_type)
            .field("data_bytes", &self.data.len())
            .finish()
    }
}

/// One earlier turn of the dialogue, as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryTurn {
    /// What the user asked.
    pub question: String,
    /// What was answered (locally or by the cloud).
    pub answer: String,
}

/// Most attachments a request may carry.
pub const MAX_ATTACHMENTS: usize = 16;

/// A device asks the cloud (topic [`Topic::CloudRequest`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudRequest {
    /// Echoed in the reply.
    pub request_id: RequestId,
    /// The asking device; must match the topic's device.
    pub device_id: DeviceId,
    /// The dialogue.
    pub dialogue_id: String,
    /// Turn index in the dialogue, from 0.
    pub turn: u32,
    /// Task category name (`Assistive System`, `Message Editing`, `Query`, `Recommendation`).
    pub task: String,
    /// The question.
    pub question: String,
    /// Earlier turns as text, oldest first (may be empty).
    #[serde(default)]
    pub history: Vec<HistoryTurn>,
    /// The modalities the policy chose, with their bytes.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// After this instant (unix ms) the device no longer waits; the bridge may drop the request.
    pub deadline_unix_ms: u64,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Send the answer's pieces as they come ([`CloudChunk`] on [`Topic::CloudStream`]) before
    /// the reply. A bridge that does not stream ignores it and replies once.
    #[serde(default)]
    pub stream: bool,
}

impl CborMessage for CloudRequest {
    const KIND: MessageKind = MessageKind::CloudRequest;

    fn validate(&self) -> Result<(), String> {
        if self.attachments.len() > MAX_ATTACHMENTS {
            return Err(format!("{} attachments, at most {MAX_ATTACHMENTS}", self.attachments.len()));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens is 0".into());
        }
        if self.question.is_empty() {
            return Err("empty question".into());
        }
        Ok(())
    }
}

impl CloudRequest {
    /// Whether the deadline has passed at `now_unix_ms`.
    pub fn expired(&self, now_unix_ms: u64) -> bool {
        now_unix_ms >= self.deadline_unix_ms
    }

    /// The request's topic.
    pub fn topic(&self) -> Topic {
        Topic::CloudRequest(self.device_id.clone())
    }
}

/// Where a bridge publishes the reply to a request.
///
/// On MQTT v5 the request carries a response topic and correlation data; on v3.1.1 the
/// reply goes to the device's reply topic and the device matches it by the request id in
/// the payload. Both routes end on [`Topic::CloudReply`] of the asking device: a response
/// topic naming anything else is refused, so that a device cannot make a bridge publish on
/// another device's or a group's topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRoute {
    /// The topic to publish the reply on.
    pub topic: String,
    /// MQTT v5 correlation data to echo, if the request had any.
    pub correlation_data: Option<Bytes>,
}

impl ReplyRoute {
    /// The route for `request` received on `request_topic` with the given v5 properties.
    pub fn for_request(
        request: &CloudRequest,
        request_topic: &str,
        response_topic: Option<&str>,
        correlation_data: Option<&[u8]>,
    ) -> Result<Self, crate::codec::DecodeError> {
        let invalid = |reason: String| crate::codec::DecodeError::Invalid { what: "cloud request", reason };
        match Topic::parse(request_topic) {
            Ok(Topic::CloudRequest(device)) if device == request.device_id => {}
            _ => {
                return Err(invalid(format!(
                    "request of device {} arrived on topic {request_topic:?}",
                    request.device_id
                )));
            }
        }
        let expected = Topic::CloudReply(request.device_id.clone()).name();
        if let Some(topic) = response_topic
            && topic != expected
        {
            return Err(invalid(format!(
                "response topic {topic:?} is not the device's reply topic {expected:?}"
            )));
        }
        Ok(Self { topic: expected, correlation_data: correlation_data.map(Bytes::copy_from_slice) })
    }
}

/// Why the cloud could not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudErrorKind {
    /// The deadline passed before the backend answered (or the request arrived late).
    DeadlineExceeded,
    /// The backend rate-limited the bridge (HTTP 429) and retries ran out.
    RateLimited,
    /// The backend failed (HTTP 5xx, malformed body) and retries ran out.
    Backend,
    /// The bridge's concurrency limit was reached.
    Overloaded,
    /// The request was refused (bad attachments, unsupported modality).
    BadRequest,
}

/// What the cloud's backend takes (topic [`crate::Topic::CloudCapabilities`], retained JSON):
/// a device attaches only media the backend accepts, so it never pays to send views a
/// text-only model refuses. Members this version does not know are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudCapabilities {
    /// Message version (1).
    pub v: u8,
    /// The backend's model.
    pub model: String,
    /// The attachment media the backend takes.
    pub accepts: Vec<MediaType>,
    /// Most tokens of an answer (a request asking more is cut to it).
    pub max_tokens: u32,
    /// When the bridge published this (unix ms).
    pub updated_unix_ms: u64,
    /// Members not known to this version.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl JsonMessage for CloudCapabilities {
    const NAME: &'static str = "cloud capabilities";
}

/// A cloud failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudError {
    /// The kind.
    pub kind: CloudErrorKind,
    /// Human-readable detail.
    pub message: String,
}

/// A cloud answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudAnswer {
    /// The answer text.
    pub answer: String,
    /// The model that answered.
    pub model: String,
    /// Prompt tokens billed.
    pub prompt_tokens: u32,
    /// Completion tokens billed.
    pub completion_tokens: u32,
    /// Cost from the bridge's price table, USD.
    pub cost_usd: f64,
}

/// Largest price a device takes for one cloud answer, USD: a reply over it is refused.
pub const MAX_ANSWER_COST_USD: f64 = 100.0;
/// Most prompt or completion tokens a device takes for one cloud answer.
pub const MAX_ANSWER_TOKENS: u32 = 10_000_000;

impl CloudAnswer {
    /// Checks what the device will charge to a dialogue's budget and log: the cost finite, not
    /// negative and at most [`MAX_ANSWER_COST_USD`], token counts at most [`MAX_ANSWER_TOKENS`].
    /// Not part of decoding, so that the device can refuse the reply of the request it is
    /// waiting for at once (and answer locally) instead of waiting for its deadline.
    pub fn check(&self) -> Result<(), String> {
        if !(self.cost_usd.is_finite() && (0.0..=MAX_ANSWER_COST_USD).contains(&self.cost_usd)) {
            return Err(format!(
                "the reply's cost {} USD is not a price (finite, 0 to {MAX_ANSWER_COST_USD})",
                self.cost_usd
            ));
        }
        for (what, n) in [("prompt", self.prompt_tokens), ("completion", self.completion_tokens)] {
            if n > MAX_ANSWER_TOKENS {
                return Err(format!("the reply claims {n} {what} tokens, more than {MAX_ANSWER_TOKENS}"));
            }
        }
        Ok(())
    }
}

/// An answer or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyResult {
    /// The backend answered.
    Answer(CloudAnswer),
    /// It did not.
    Error(CloudError),
}

/// The bridge's reply (topic [`Topic::CloudReply`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudReply {
    /// The request answered.
    pub request_id: RequestId,
    /// Time in the backend, ms.
    pub backend_latency_ms: u32,
    /// Time from the bridge receiving the request to publishing the reply, ms.
    pub bridge_latency_ms: u32,
    /// Answer or error.
    pub result: ReplyResult,
}

impl CborMessage for CloudReply {
    const KIND: MessageKind = MessageKind::CloudReply;
}

/// Largest text of one [`CloudChunk`], bytes.
pub const MAX_CHUNK_TEXT_BYTES: usize = 64 * 1024;

/// A piece of a streamed answer (topic [`Topic::CloudStream`]), published as the backend
/// generates it (batched over a few tens of milliseconds). The pieces of a request are numbered
/// from 0; the device shows them in that order, once each, and the reply that follows holds
/// the whole answer, so a piece lost on the way costs only its early display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudChunk {
    /// The request answered.
    pub request_id: RequestId,
    /// The piece's place in the answer, from 0.
    pub seq: u32,
    /// The text, to be appended to the pieces before it.
    pub text: String,
}

impl CborMessage for CloudChunk {
    const KIND: MessageKind = MessageKind::CloudChunk;

    fn validate(&self) -> Result<(), String> {
        if self.text.len() > MAX_CHUNK_TEXT_BYTES {
            return Err(format!("{} bytes of text, at most {MAX_CHUNK_TEXT_BYTES}", self.text.len()));
        }
        Ok(())
    }
}

/// The device no longer waits for a request (topic [`Topic::CloudCancel`]): its client went
/// away, or its deadline passed. The bridge serving it stops the backend call and replies
/// nothing; the others ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudCancel {
    /// The request given up.
    pub request_id: RequestId,
}

impl CborMessage for CloudCancel {
    const KIND: MessageKind = MessageKind::CloudCancel;
}

/// A judge's score for a cloud answer (topic [`Topic::Score`], JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeScore {
    /// Message version (1).
    #[serde(default = "message_version")]
    pub v: u8,
    /// The scored request.
    pub request_id: RequestId,
    /// Its dialogue.
    pub dialogue_id: String,
    /// Its turn.
    pub turn: u32,
    /// Score in [0, 1].
    pub score: f64,
    /// The judging model.
    pub judge_model: String,
}

impl JsonMessage for JudgeScore {
    const NAME: &'static str = "judge score";

    fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.score) {
            return Err(format!("score {} outside [0, 1]", self.score));
        }
        Ok(())
    }
}

/// Counters a device reports in its status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusCounters {
    /// Requests served since start.
    pub requests: u64,
    /// Answered locally.
    pub local_answers: u64,
    /// Answered by the cloud.
    pub cloud_answers: u64,
    /// Cloud attempts that fell back to local.
    pub cloud_fallbacks: u64,
    /// Outcome rows written.
    pub outcomes_logged: u64,
    /// Outcome rows acknowledged by a collector.
    pub outcomes_uploaded: u64,
    /// Outcome rows a collector refused for good, kept aside on the device.
    pub outcomes_upload_refused: u64,
    /// Mean reward of recent turns, if known.
    pub mean_reward: Option<f64>,
    /// Energy measured since start, joules, if the board has a meter.
    pub energy_joules: Option<f64>,
    /// When the last outcome was written (unix ms).
    pub last_outcome_unix_ms: Option<u64>,
}

/// How one policy version served on a device since the daemon started (or since it began
/// serving): its decisions, their failures, its cloud turns and their fallbacks, and the scores
/// its answers received (judge, user feedback, refusal heuristic).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyStats {
    /// The policy version.
    pub version: String,
    /// Whether the device has committed to it: its health check (probe run, first decisions)
    /// passed. A policy on trial that fails goes back to the previous one.
    pub committed: bool,
    /// Decisions made with it.
    pub decisions: u64,
    /// Decisions it failed (the device then went back to its previous policy).
    pub decision_failures: u64,
    /// Turns it sent to the cloud.
    pub cloud_attempts: u64,
    /// Of those, the ones answered locally after all (the cloud failed or was late).
    pub cloud_fallbacks: u64,
    /// Scores received for its answers.
    pub scored: u64,
    /// Their sum (mean = `score_sum / scored`).
    pub score_sum: f64,
}

impl PolicyStats {
    /// The mean score, if any answer was scored.
    pub fn mean_score(&self) -> Option<f64> {
        (self.scored > 0).then(|| self.score_sum / self.scored as f64)
    }
}

/// The result of the last policy bundle a device received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyUpdateReport {
    /// The bundle's version.
    pub version: String,
    /// Whether it was adopted.
    pub accepted: bool,
    /// Why not (unknown key, hash mismatch, wrong schema, too large, probe failed...).
    pub reason: Option<String>,
    /// When (unix ms).
    pub unix_ms: u64,
}

/// A device's status (topic [`Topic::Status`], retained JSON). Members this version does not
/// know are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// Message version (1).
    pub v: u8,
    /// The device.
    pub device_id: DeviceId,
    /// Whether the daemon is serving.
    pub online: bool,
    /// The daemon's version.
    pub daemon_version: String,
    /// The group the device takes policies from.
    pub group: Option<GroupName>,
    /// The policy serving now.
    pub policy_version: Option<String>,
    /// The policy kept for rollback.
    pub previous_policy_version: Option<String>,
    /// The last policy bundle's result.
    pub last_policy_update: Option<PolicyUpdateReport>,
    /// Counters.
    #[serde(default)]
    pub counters: StatusCounters,
    /// How each policy served since the daemon started, the serving one first (at most a few):
    /// what a staged rollout watches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_stats: Vec<PolicyStats>,
    /// When this status was written (unix ms).
    pub updated_unix_ms: u64,
    /// Members not known to this version.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl JsonMessage for DeviceStatus {
    const NAME: &'static str = "device status";
}

/// Identifies an outcome row across the fleet: batches are idempotent by this key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OutcomeKey {
    /// The dialogue.
    pub dialogue_id: String,
    /// The turn.
    pub turn: u32,
}

/// One outcome row: its key and the row itself: outcome-log's `TurnOutcome`, sent as a JSON
/// value (`R` = `serde_json::Value`, what devices send and the lenient form a collector falls
/// back to) or read straight into a typed row by a collector (`R` = `TurnOutcome`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeRow<R = serde_json::Value> {
    /// The key (with the batch's device).
    pub key: OutcomeKey,
    /// The row.
    pub row: R,
}

/// A batch of outcome rows (topic [`Topic::Outcomes`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeBatch<R = serde_json::Value> {
    /// The device; must match the topic's.
    pub device_id: DeviceId,
    /// Chosen by the device, echoed in the ack.
    pub batch_id: u64,
    /// The rows, oldest first.
    pub rows: Vec<OutcomeRow<R>>,
}

impl<R: Serialize + serde::de::DeserializeOwned> CborMessage for OutcomeBatch<R> {
    const KIND: MessageKind = MessageKind::OutcomeBatch;

    fn validate(&self) -> Result<(), String> {
        let mut keys: Vec<&OutcomeKey> = self.rows.iter().map(|r| &r.key).collect();
        keys.sort();
        if keys.windows(2).any(|w| w[0] == w[1]) {
            return Err("the same (dialogue, turn) twice in one batch".into());
        }
        Ok(())
    }
}

/// A row a collector did not take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedRow {
    /// The row's key.
    pub key: OutcomeKey,
    /// Why.
    pub reason: String,
}

/// A collector acknowledges a batch (topic [`Topic::OutcomeAck`]). Rows listed in `accepted`
/// are stored (or were already: acks are idempotent); the device marks them uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeAck {
    /// The acknowledged batch.
    pub batch_id: u64,
    /// Rows stored.
    pub accepted: Vec<OutcomeKey>,
    /// Rows refused (never retried as they are).
    #[serde(default)]
    pub rejected: Vec<RejectedRow>,
}

impl CborMessage for OutcomeAck {
    const KIND: MessageKind = MessageKind::OutcomeAck;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::DecodeError;
    use crate::reject::RejectKind;

    pub(crate) fn request(attachment_bytes: usize) -> CloudRequest {
        CloudRequest {
            request_id: RequestId(0xfeed),
            device_id: DeviceId::new("dev-1").unwrap(),
            dialogue_id: "d-17".into(),
            turn: 2,
            task: "Query".into(),
            question: "What can I cook with leeks?".into(),
            history: vec![HistoryTurn { question: "Hi".into(), answer: "Hello".into() }],
            attachments: (0..3)
                .map(|i| Attachment {
                    modality: i,
                    name: format!("camera-{i}"),
                    media_type: MediaType::ImageJpeg,
                    data: vec![i; attachment_bytes],
                })
                .collect(),
            deadline_unix_ms: 1_800_000_000_000,
            max_tokens: 256,
            stream: false,
        }
    }

    #[test]
    fn request_round_trips_with_binary_attachments() {
        let r = request(100_000);
        let body = r.to_cbor().unwrap();
        // Byte strings: the body is barely larger than the attachments.
        assert!(body.len() < 300_000 + 1_000, "{}", body.len());
        assert_eq!(&body[..3], &[0x83, 1, 1]);
        assert_eq!(CloudRequest::from_cbor(&body, 1 << 20).unwrap(), r);
    }

    #[test]
    fn request_decode_refusals_are_typed() {
        let body = request(10).to_cbor().unwrap();
        let e = CloudRequest::from_cbor(&body, 10).unwrap_err();
        assert!(matches!(e, DecodeError::Oversized { .. }));
        assert_eq!(e.kind(), RejectKind::Oversized);
        let mut v2 = body.clone();
        v2[1] = 2;
        assert_eq!(CloudRequest::from_cbor(&v2, 1 << 20).unwrap_err().kind(), RejectKind::WrongVersion);
        assert!(matches!(
            CloudReply::from_cbor(&body, 1 << 20),
            Err(DecodeError::WrongKind { found: 1, .. })
        ));
        let truncated = &body[..body.len() / 2];
        assert!(matches!(CloudRequest::from_cbor(truncated, 1 << 20), Err(DecodeError::Malformed { .. })));
        assert!(matches!(CloudRequest::from_cbor(b"\x83", 1 << 20), Err(DecodeError::Malformed { .. })));
        let mut no_tokens = request(10);
        no_tokens.max_tokens = 0;
        let body = no_tokens.to_cbor().unwrap();
        assert_eq!(CloudRequest::from_cbor(&body, 1 << 20).unwrap_err().kind(), RejectKind::Invalid);
    }

    #[test]
    fn bad_device_id_inside_a_body_is_malformed() {
        #[derive(Serialize)]
        struct Evil<'a> {
            device_id: &'a str,
            batch_id: u64,
            rows: Vec<OutcomeRow>,
        }
        let mut body = vec![0x83, 1, MessageKind::OutcomeBatch as u8];
        ciborium::into_writer(&Evil { device_id: "a/#", batch_id: 1, rows: vec![] }, &mut body).unwrap();
        assert!(matches!(<OutcomeBatch>::from_cbor(&body, 1 << 20), Err(DecodeError::Malformed { .. })));
    }

    #[test]
    fn reply_and_outcomes_round_trip() {
        let reply = CloudReply {
            request_id: RequestId(7),
            backend_latency_ms: 812,
            bridge_latency_ms: 815,
            result: ReplyResult::Answer(CloudAnswer {
                answer: "Leek soup.".into(),
                model: "gpt-4o-mini".into(),
                prompt_tokens: 1200,
                completion_tokens: 40,
                cost_usd: 0.000_204,
            }),
        };
        assert_eq!(CloudReply::from_cbor(&reply.to_cbor().unwrap(), 1 << 16).unwrap(), reply);
        let err = CloudReply {
            result: ReplyResult::Error(CloudError {
                kind: CloudErrorKind::DeadlineExceeded,
                message: "late".into(),
            }),
            ..reply
        };
        assert_eq!(CloudReply::from_cbor(&err.to_cbor().unwrap(), 1 << 16).unwrap(), err);

        let batch = OutcomeBatch {
            device_id: DeviceId::new("dev-1").unwrap(),
            batch_id: 3,
            rows: vec![OutcomeRow {
                key: OutcomeKey { dialogue_id: "d".into(), turn: 0 },
                row: serde_json::json!({"action": 8, "propensity": 0.91, "answer": "ok", "score": null}),
            }],
        };
        assert_eq!(<OutcomeBatch>::from_cbor(&batch.to_cbor().unwrap(), 1 << 16).unwrap(), batch);
        let mut dup = batch.clone();
        dup.rows.push(dup.rows[0].clone());
        assert_eq!(
            <OutcomeBatch>::from_cbor(&dup.to_cbor().unwrap(), 1 << 16).unwrap_err().kind(),
            RejectKind::Invalid
        );
        let ack = OutcomeAck { batch_id: 3, accepted: vec![batch.rows[0].key.clone()], rejected: vec![] };
        assert_eq!(OutcomeAck::from_cbor(&ack.to_cbor().unwrap(), 1 << 16).unwrap(), ack);
    }

    #[test]
    fn status_is_json_keeping_unknown_members() {
        let text = br#"{"v":1,"device_id":"dev-1","online":true,"daemon_version":"0.1.0",
            "group":"pilot","policy_version":"p-3","previous_policy_version":null,
            "last_policy_update":{"version":"p-4","accepted":false,"reason":"unknown key","unix_ms":5},
            "counters":{"requests":10,"cloud_answers":4},"updated_unix_ms":99,"board":"rpi5"}"#;
        let s = DeviceStatus::from_json(text, 4096).unwrap();
        assert_eq!(s.counters.requests, 10);
        assert_eq!(s.counters.local_answers, 0);
        assert_eq!(s.extra["board"], "rpi5");
        let again = DeviceStatus::from_json(&s.to_json().unwrap(), 4096).unwrap();
        assert_eq!(again, s);
        let v2 = br#"{"v":2,"whatever":true}"#;
        assert!(matches!(DeviceStatus::from_json(v2, 4096), Err(DecodeError::WrongVersion { found: 2, .. })));
        assert_eq!(DeviceStatus::from_json(b"not json", 4096).unwrap_err().kind(), RejectKind::Malformed);
        assert_eq!(DeviceStatus::from_json(text, 10).unwrap_err().kind(), RejectKind::Oversized);
    }

    #[test]
    fn score_json() {
        let s = JudgeScore {
            v: 1,
            request_id: RequestId(1),
            dialogue_id: "d".into(),
            turn: 0,
            score: 1.5,
            judge_model: "j".into(),
        };
        assert_eq!(
            JudgeScore::from_json(&s.to_json().unwrap(), 1024).unwrap_err().kind(),
            RejectKind::Invalid
        );
    }

    #[test]
    fn reply_route_stays_on_the_devices_reply_topic() {
        let r = request(1);
        let req_topic = r.topic().name();
        let v311 = ReplyRoute::for_request(&r, &req_topic, None, None).unwrap();
        assert_eq!(v311.topic, "tmo/v1/dev/dev-1/cloud/reply");
        assert_eq!(v311.correlation_data, None);
        let corr = r.request_id.to_correlation_data();
        let v5 = ReplyRoute::for_request(&r, &req_topic, Some(&v311.topic), Some(&corr)).unwrap();
        assert_eq!(
            RequestId::from_correlation_data(v5.correlation_data.as_deref().unwrap()),
            Some(r.request_id)
        );
        assert!(ReplyRoute::for_request(&r, &req_topic, Some("tmo/v1/group/all/policy"), None).is_err());
        assert!(ReplyRoute::for_request(&r, "tmo/v1/dev/other/cloud/req", None, None).is_err());
    }
}

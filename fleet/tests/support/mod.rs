//! Shared by the fleet tests and the ingest bench: realistic outcome rows, and a device-side
//! MQTT client that sends outcome batches and reads the collector's acks.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use outcome_log::{CloudAttempt, ScoreSource, TurnOutcome};
use policy_onnx::schema::{Action, ModalitySet, Schema, TaskCategory};
use tmo_protocol::codec::CborMessage;
use tmo_protocol::link::{Link, LinkConfig, LinkSetup, Message, QoS, Subscription};
use tmo_protocol::{
    DeviceId, Inbox, OutcomeAck, OutcomeBatch, OutcomeKey, OutcomeRow, ReassemblyLimits, Topic,
};

/// The latest version of every row of the dataset in `dir`.
pub async fn latest(dir: &Path) -> fleet_data::LatestRecords {
    let store =
        fleet_data::OutcomeStore::open(dir.to_str().expect("a UTF-8 path")).await.expect("dataset opens");
    store.latest_records().await.expect("dataset reads")
}

/// A realistic row: a 27-float observation, a cloud action with two camera views, a
/// 300-character answer, a telemetry snapshot and the cloud attempt (about 1.3 KB of JSON).
pub fn outcome(dialogue: &str, turn: u32, created_at_ms: i64) -> TurnOutcome {
    let schema = Schema::default();
    let action = Action::Cloud { modalities: ModalitySet::from_indices([0, 2]) };
    TurnOutcome {
        dialogue_id: dialogue.to_owned(),
        turn,
        question: format!(
            "What can I cook tonight with the leeks and potatoes on the counter? (turn {turn})"
        ),
        task: TaskCategory::Recommendation,
        observation: schema.observation(&[], TaskCategory::Recommendation, 30.0, 0.05),
        action_index: schema.action_index(action).unwrap_or(0) as u32,
        action,
        propensity: 0.85,
        policy_version: "2026-11-20.1".into(),
        policy_sha256: "ab".repeat(32),
        latency_secs: 6.2,
        energy_joules: Some(12.5),
        cost_usd: 0.000_945,
        prompt_tokens: 1210,
        generated_tokens: 48,
        answer: "Leek and potato soup: sweat the sliced leeks in butter, add diced potatoes and stock, \
                 simmer twenty minutes, blend until smooth and season. Serve with crusty bread and a \
                 little cream; chives on top if you have them. It keeps for three days in the fridge."
            .into(),
        score: Some(1.0),
        score_source: Some(ScoreSource::RefusalHeuristic),
        telemetry: serde_json::json!({"cpu_percent": 41.5, "mem_used_bytes": 1_234_567_890u64,
            "temp_c": 52.0, "power_w": 6.1, "battery_percent": null}),
        route: None,
        cloud_attempt: Some(CloudAttempt {
            outcome: "answered".into(),
            detail: None,
            wait_secs: 5.9,
            deadline_secs: 24.0,
            request_bytes: 182_344,
            model: Some("gpt-4o-mini".into()),
            backend_latency_ms: Some(5_100),
            cost_usd: 0.000_945,
        }),
        created_at_ms,
        text_cut_bytes: 0,
        forced: false,
    }
}

/// A batch of `rows` from `device`, each row as the device sends it (TurnOutcome as JSON).
pub fn batch(device: &str, batch_id: u64, rows: &[TurnOutcome]) -> OutcomeBatch {
    OutcomeBatch {
        device_id: DeviceId::new(device).expect("valid device id"),
        batch_id,
        rows: rows
            .iter()
            .map(|o| OutcomeRow {
                key: OutcomeKey { dialogue_id: o.dialogue_id.clone(), turn: o.turn },
                row: serde_json::to_value(o).expect("outcome as JSON"),
            })
            .collect(),
    }
}

/// A device's MQTT client for outcome upload: publishes batches, receives its acks.
pub struct DeviceClient {
    pub device: DeviceId,
    pub link: Link,
    inbox: Inbox,
}

impl DeviceClient {
    /// Connects as `device`, subscribed to its ack topic.
    pub async fn connect(port: u16, device: &str) -> DeviceClient {
        let device = DeviceId::new(device).expect("valid device id");
        let mut config = LinkConfig::new("127.0.0.1", port, device.as_str());
        config.incoming_capacity = 4096;
        config.max_packet_bytes = 1 << 20;
        let ack_topic = Topic::OutcomeAck(device.clone()).name();
        let link = Link::start(
            &config,
            LinkSetup {
                availability_topic: None,
                subscriptions: vec![Subscription::new(ack_topic, QoS::AtLeastOnce)],
            },
        )
        .expect("link starts");
        assert!(link.wait_connected(Duration::from_secs(10)).await, "device {device} did not connect");
        DeviceClient { device, link, inbox: Inbox::new(ReassemblyLimits::default()) }
    }

    /// Publishes `batch` on this device's outcomes topic as one frame, QoS 1, and waits for
    /// the broker's PUBACK.
    pub async fn send(&self, batch: &OutcomeBatch) {
        self.send_to(&Topic::Outcomes(self.device.clone()).name(), batch).await;
    }

    /// Publishes `batch` on `topic` (one frame, QoS 1), waiting for the PUBACK.
    pub async fn send_to(&self, topic: &str, batch: &OutcomeBatch) {
        self.send_body_to(topic, &batch.to_cbor().expect("batch encodes")).await;
    }

    /// Publishes an encoded batch on this device's outcomes topic, waiting for the PUBACK.
    pub async fn send_body(&self, body: &[u8]) {
        self.send_body_to(&Topic::Outcomes(self.device.clone()).name(), body).await;
    }

    async fn send_body_to(&self, topic: &str, body: &[u8]) {
        let template = Message::new(topic, QoS::AtLeastOnce, Bytes::new());
        let deliveries = self.link.publisher().publish_body(&template, body).await.expect("publish");
        assert_eq!(deliveries.len(), 1, "a batch must fit one frame");
        tmo_protocol::link::Delivery::all_confirmed(deliveries).await.expect("PUBACK");
    }

    /// Publishes raw bytes on this device's outcomes topic.
    pub async fn send_raw(&self, payload: &[u8]) {
        let topic = Topic::Outcomes(self.device.clone()).name();
        let delivery = self
            .link
            .publisher()
            .publish(Message::new(topic, QoS::AtLeastOnce, payload.to_vec()))
            .await
            .expect("publish");
        delivery.confirmed().await.expect("PUBACK");
    }

    /// The next ack within `timeout`.
    pub async fn next_ack(&mut self, timeout: Duration) -> Option<OutcomeAck> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let incoming = tokio::time::timeout(left, self.link.incoming.recv()).await.ok()??;
            if let Some(ack) =
                self.inbox.receive::<OutcomeAck>(&incoming.topic, &incoming.payload, Instant::now())
            {
                return Some(ack);
            }
        }
    }
}

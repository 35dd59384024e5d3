//! The outcome collector: outcome batches in from a shared subscription, rows written durably
//! to the dataset once each, acknowledgements out to each device.
//!
//! Three stages:
//! 1. a tokio task forwards received publishes from the link to
//! 2. the writer thread (`fleet-collector`), which takes every publish waiting at that moment
//!    (up to a group limit), decodes them (frames, CBOR, each row straight into a `TurnOutcome`),
//!    writes the whole group as one Parquet file per day it touches (`fleet_data::writer`:
//!    atomic, fsynced), and only then hands the acks to
//! 3. a tokio task that publishes each ack (CBOR, QoS 1) on the device's ack topic.
//!
//! Batches that arrive together share one file and one fsync, which is what makes the
//! throughput: the cost of durability is per group, not per batch. The collector keeps no
//! keys: a batch sent again is written again, and readers keep each row's latest version, so
//! it starts at once and several collectors may write one dataset. Refusals never stop the
//! collector: a malformed payload is counted and logged; a batch whose device differs from its topic's is
//! counted and not acknowledged; a row that is not a `TurnOutcome`, disagrees with its key or
//! fails validation is listed with its reason in the ack's `rejected`. A write error is logged
//! and counted and the group is not acknowledged: the devices send it again.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleet_data::{DataError, DatasetWriter};
use outcome_log::TurnOutcome;
use outcome_log::dataset::TimeWindow;
use tmo_protocol::codec::{CborMessage, DecodeError};
use tmo_protocol::link::{
    Delivery, Incoming, Link, LinkConfig, LinkError, LinkSetup, Message, Publisher, QoS, Subscription,
};
use tmo_protocol::reject::RejectKind;
use tmo_protocol::topic::filter;
use tmo_protocol::{
    DeviceId, Inbox, OutcomeAck, OutcomeBatch, OutcomeKey, ReassemblyLimits, RejectedRow, ShareGroup, Topic,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

/// The default shared-subscription group of collectors.
pub const DEFAULT_SHARE: &str = "collectors";

/// Settings of a collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorConfig {
    /// Collectors with the same share group split the batches between them.
    pub share: ShareGroup,
    /// The dataset directory (several collectors may share one).
    pub out_dir: PathBuf,
    /// Largest batch accepted (bytes of its CBOR body).
    pub max_batch_bytes: usize,
    /// Most publishes written with one fsync.
    pub max_group_batches: usize,
    /// Most rows written with one fsync (a group closes once it reaches this).
    pub max_group_rows: usize,
    /// Publishes buffered between the link and the writer thread (at least the link's
    /// `incoming_capacity` is raised to this).
    pub queue_capacity: usize,
    /// How far from its receipt a row's own time may be (rows outside are rejected with the
    /// reason), so that devices cannot pick partitions.
    pub window: TimeWindow,
}

impl CollectorConfig {
    /// Defaults: 16 MiB batches, groups of up to 256 batches or 50,000 rows, 1024 queued, rows
    /// up to 30 days old.
    pub fn new(share: ShareGroup, out_dir: impl Into<PathBuf>) -> Self {
        Self {
            share,
            out_dir: out_dir.into(),
            max_batch_bytes: 16 << 20,
            max_group_batches: 256,
            max_group_rows: 50_000,
            queue_capacity: 1024,
            window: TimeWindow::default(),
        }
    }
}

/// The collector could not start.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// The dataset could not be opened.
    #[error("opening the dataset: {0}")]
    Dataset(#[from] DataError),
    /// The MQTT link could not start.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A thread could not be started or joined.
    #[error("collector thread: {0}")]
    Thread(String),
}

/// The collector's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollectorStats {
    /// Batches decoded and accepted for writing.
    pub batches: u64,
    /// Rows written to the dataset (a row sent again is written again: readers keep its
    /// latest version).
    pub rows_written: u64,
    /// Rows rejected (listed in the ack's `rejected`).
    pub rejected_rows: u64,
    /// Payloads refused as frames or CBOR (malformed, oversized, wrong version, ...).
    pub malformed: u64,
    /// Batches refused because their device is not their topic's (not acknowledged).
    pub refused_batches: u64,
    /// Groups written (each as one file per day it touches).
    pub write_groups: u64,
    /// Groups that failed to write (not acknowledged; devices resend).
    pub write_errors: u64,
    /// Acks confirmed by the broker.
    pub acks_published: u64,
    /// Acks that could not be published or were not confirmed.
    pub ack_failures: u64,
    /// Publishes the link dropped because the collector's queue was full (devices resend).
    pub dropped_queue_full: u64,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    rows_written: AtomicU64,
    rejected_rows: AtomicU64,
    malformed: AtomicU64,
    refused_batches: AtomicU64,
    write_groups: AtomicU64,
    write_errors: AtomicU64,
    acks_published: AtomicU64,
    ack_failures: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A running collector. Stop it with [`Collector::shutdown`]; dropping it stops it without
/// draining.
#[derive(Debug)]
pub struct Collector {
    link: Option<Link>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
    forwarder: Option<JoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
    acker: Option<JoinHandle<()>>,
    out_dir: PathBuf,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Collector {
    /// Opens the dataset in `out_dir` and starts collecting with the shared subscription
    /// `$share/<share>/tmo/v1/dev/+/outcomes`. Needs a tokio runtime; returns before the
    /// connection is up (see [`Collector::wait_connected`]); reconnects by itself.
    pub async fn start(
        link_config: &LinkConfig,
        share: ShareGroup,
        out_dir: impl Into<PathBuf>,
    ) -> Result<Collector, CollectorError> {
        Self::start_with(link_config, CollectorConfig::new(share, out_dir)).await
    }

    /// [`Collector::start`] with every setting.
    pub async fn start_with(
        link_config: &LinkConfig,
        config: CollectorConfig,
    ) -> Result<Collector, CollectorError> {
        link_config.validate()?;
        let (dir, window, name) = (config.out_dir.clone(), config.window, link_config.client_id.clone());
        let writer = tokio::task::spawn_blocking(move || DatasetWriter::open(dir, &name, window))
            .await
            .map_err(|e| CollectorError::Thread(e.to_string()))??;
        let mut link_config = link_config.clone();
        link_config.incoming_capacity = link_config.incoming_capacity.max(config.queue_capacity);
        let subscription = Subscription::new(filter::outcomes_shared(&config.share), QoS::AtLeastOnce);
        let mut link = Link::start(
            &link_config,
            LinkSetup { availability_topic: None, subscriptions: vec![subscription] },
        )?;
        let incoming = std::mem::replace(&mut link.incoming, mpsc::channel(1).1);
        let counters = Arc::new(Counters::default());
        let cancel = CancellationToken::new();

        let (to_writer, writer_rx) = mpsc::channel(config.queue_capacity.max(1));
        let (to_acker, acker_rx) = mpsc::channel(config.queue_capacity.max(1));
        let forwarder = tokio::spawn(forward(incoming, to_writer, cancel.clone()));
        let acker = tokio::spawn(publish_acks(acker_rx, link.publisher(), counters.clone()));
        let stage = WriterStage {
            incoming: writer_rx,
            dataset: writer,
            inbox: Inbox::new(ReassemblyLimits {
                max_message_bytes: config.max_batch_bytes,
                max_partial_bytes: config.max_batch_bytes.saturating_mul(4),
                ..ReassemblyLimits::default()
            }),
            acks: to_acker,
            counters: counters.clone(),
            max_group_batches: config.max_group_batches.max(1),
            max_group_rows: config.max_group_rows.max(1),
        };
        let writer = std::thread::Builder::new()
            .name("fleet-collector".into())
            .spawn(move || stage.run())
            .map_err(|e| CollectorError::Thread(e.to_string()))?;
        info!(share = %config.share, out_dir = %config.out_dir.display(), "collector started");
        Ok(Collector {
            link: Some(link),
            counters,
            cancel,
            forwarder: Some(forwarder),
            writer: Some(writer),
            acker: Some(acker),
            out_dir: config.out_dir,
        })
    }

    /// Waits until connected and subscribed, at most `timeout`; returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        match &self.link {
            Some(link) => link.wait_connected(timeout).await,
            None => false,
        }
    }

    /// The dataset directory.
    pub fn out_dir(&self) -> &std::path::Path {
        &self.out_dir
    }

    /// The counters now.
    pub fn stats(&self) -> CollectorStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CollectorStats {
            batches: get(&c.batches),
            rows_written: get(&c.rows_written),
            rejected_rows: get(&c.rejected_rows),
            malformed: get(&c.malformed),
            refused_batches: get(&c.refused_batches),
            write_groups: get(&c.write_groups),
            write_errors: get(&c.write_errors),
            acks_published: get(&c.acks_published),
            ack_failures: get(&c.ack_failures),
            dropped_queue_full: self.link.as_ref().map_or(0, |l| l.stats().dropped_channel_full),
        }
    }

    /// Stops taking batches, writes and acknowledges those already taken, waits for the acks'
    /// confirmations and disconnects, all within about `timeout`; returns the final counters.
    pub async fn shutdown(mut self, timeout: Duration) -> CollectorStats {
        let deadline = tokio::time::Instant::now() + timeout;
        self.cancel.cancel();
        if let Some(forwarder) = self.forwarder.take() {
            let _ = forwarder.await;
        }
        if let Some(writer) = self.writer.take() {
            // The writer ends once the forwarder's sender is gone and its queue is drained.
            let joined = tokio::task::spawn_blocking(move || writer.join());
            if tokio::time::timeout_at(deadline, joined).await.is_err() {
                warn!("collector writer still busy at the shutdown deadline");
            }
        }
        if let Some(mut acker) = self.acker.take()
            && tokio::time::timeout_at(deadline, &mut acker).await.is_err()
        {
            warn!("acks still unconfirmed at the shutdown deadline");
            acker.abort();
        }
        let stats = self.stats();
        if let Some(link) = self.link.take() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            link.shutdown(left.max(Duration::from_millis(200))).await;
        }
        info!(?stats, "collector stopped");
        stats
    }
}

async fn forward(
    mut incoming: mpsc::Receiver<Incoming>,
    to_writer: mpsc::Sender<Incoming>,
    cancel: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            message = incoming.recv() => message,
        };
        let Some(message) = message else { break };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            sent = to_writer.send(message) => if sent.is_err() { break },
        }
    }
}

/// A decoded batch waiting for its group's write.
struct Taken {
    device: DeviceId,
    batch_id: u64,
    rows: Vec<TurnOutcome>,
    accepted: Vec<OutcomeKey>,
    rejected: Vec<RejectedRow>,
}

impl Taken {
    /// Lists the row `key` in the ack's `rejected`, with the reason.
    fn reject(&mut self, key: OutcomeKey, reason: String) {
        debug!(device = %self.device, dialogue = %key.dialogue_id, turn = key.turn, %reason, "row rejected");
        self.rejected.push(RejectedRow { key, reason });
    }
}

struct WriterStage {
    incoming: mpsc::Receiver<Incoming>,
    dataset: DatasetWriter,
    inbox: Inbox,
    acks: mpsc::Sender<(DeviceId, OutcomeAck)>,
    counters: Arc<Counters>,
    max_group_batches: usize,
    max_group_rows: usize,
}

impl WriterStage {
    fn run(mut self) {
        let mut last_expiry = Instant::now();
        while let Some(first) = self.incoming.blocking_recv() {
            let mut group = Vec::new();
            let mut rows = 0usize;
            let mut publishes = 1usize;
            self.take(first, &mut group, &mut rows);
            while publishes < self.max_group_batches && rows < self.max_group_rows {
                match self.incoming.try_recv() {
                    Ok(message) => {
                        publishes += 1;
                        self.take(message, &mut group, &mut rows);
                    }
                    Err(_) => break,
                }
            }
            self.update_malformed();
            if last_expiry.elapsed() >= Duration::from_secs(1) {
                last_expiry = Instant::now();
                let expired = self.inbox.expire(last_expiry);
                if expired > 0 {
                    warn!(expired, "partial outcome batches expired");
                }
                self.update_malformed();
            }
            if !group.is_empty() {
                self.write(group);
            }
        }
        debug!("collector writer ends");
    }

    fn update_malformed(&self) {
        let rejected = self.inbox.rejected();
        let malformed = rejected.total() - rejected.get(RejectKind::Duplicate);
        self.counters.malformed.store(malformed, Ordering::Relaxed);
    }

    /// Decodes one publish into `group`.
    fn take(&mut self, message: Incoming, group: &mut Vec<Taken>, rows: &mut usize) {
        let device = match Topic::parse(&message.topic) {
            Ok(Topic::Outcomes(device)) => device,
            _ => {
                add(&self.counters.refused_batches, 1);
                warn!(topic = %message.topic, "publish on a topic that is not a device's outcomes, refused");
                return;
            }
        };
        let Some(batch) =
            self.inbox.receive_with(&message.topic, &message.payload, Instant::now(), decode_batch)
        else {
            return;
        };
        if batch.device_id != device {
            add(&self.counters.refused_batches, 1);
            warn!(
                topic = %message.topic,
                batch_device = %batch.device_id,
                batch_id = batch.batch_id,
                "outcome batch of another device than its topic's, refused without an ack"
            );
            return;
        }
        let mut taken = Taken {
            device,
            batch_id: batch.batch_id,
            rows: Vec::with_capacity(batch.rows.len()),
            accepted: Vec::with_capacity(batch.rows.len()),
            rejected: Vec::new(),
        };
        for (key, row) in batch.rows {
            match row.and_then(|outcome| check_row(&key, outcome)) {
                Ok(outcome) => {
                    taken.rows.push(outcome);
                    taken.accepted.push(key);
                }
                Err(reason) => taken.reject(key, reason),
            }
        }
        add(&self.counters.batches, 1);
        add(&self.counters.rejected_rows, taken.rejected.len() as u64);
        *rows += taken.rows.len();
        group.push(taken);
    }

    /// Writes a group with one durable append, then queues its acks.
    fn write(&mut self, group: Vec<Taken>) {
        let received = crate::unix_ms_now();
        let mut batches = Vec::with_capacity(group.len());
        let mut acks = Vec::with_capacity(group.len());
        let window = self.dataset.window();
        for mut taken in group {
            // A row made outside the window of its receipt (a device's clock, or a device) would
            // pick a partition of its own: rejected with the reason, the device sets it aside.
            let (mut rows, mut accepted) = (Vec::with_capacity(taken.rows.len()), Vec::new());
            let taken_rows = std::mem::take(&mut taken.rows);
            for (row, key) in taken_rows.into_iter().zip(std::mem::take(&mut taken.accepted)) {
                match window.check(row.created_at_ms, received) {
                    Ok(()) => {
                        rows.push(row);
                        accepted.push(key);
                    }
                    Err(reason) => {
                        taken.reject(key, reason);
                        add(&self.counters.rejected_rows, 1);
                    }
                }
            }
            taken.accepted = accepted;
            batches.push((taken.device.to_string(), rows));
            acks.push((
                taken.device,
                OutcomeAck { batch_id: taken.batch_id, accepted: taken.accepted, rejected: taken.rejected },
            ));
        }
        let started = Instant::now();
        match self.dataset.append_many(&batches, received) {
            Ok(summaries) => {
                add(&self.counters.write_groups, 1);
                let written: usize = summaries.iter().map(|s| s.written).sum();
                add(&self.counters.rows_written, written as u64);
                debug!(
                    batches = acks.len(),
                    written,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "group written"
                );
                // Tests stop or kill the collector here: written, not yet acknowledged.
                fail::fail_point!("collector-after-write");
                for ack in acks {
                    if self.acks.blocking_send(ack).is_err() {
                        warn!("ack publisher gone; acks dropped (devices resend)");
                        break;
                    }
                }
            }
            Err(e) => {
                add(&self.counters.write_errors, 1);
                error!(error = %e, batches = acks.len(), "writing outcome rows failed; batches not acknowledged (devices resend)");
            }
        }
    }
}

/// A batch as the writer takes it: each row a `TurnOutcome`, or why it is not one.
struct DecodedBatch {
    device_id: DeviceId,
    batch_id: u64,
    rows: Vec<(OutcomeKey, Result<TurnOutcome, String>)>,
}

/// Decodes a batch body with its rows read straight into `TurnOutcome`s; when that fails, in
/// the lenient form (rows as JSON values) that names what is wrong with each row. Every row of
/// a batch from a device of this version takes the first path, which skips building a JSON
/// value per row (it halves the decoding time).
fn decode_batch(body: &[u8], max_bytes: usize) -> Result<DecodedBatch, DecodeError> {
    if let Ok(batch) = OutcomeBatch::<TurnOutcome>::from_cbor(body, max_bytes) {
        let rows = batch.rows.into_iter().map(|r| (r.key, Ok(r.row))).collect();
        return Ok(DecodedBatch { device_id: batch.device_id, batch_id: batch.batch_id, rows });
    }
    let batch = OutcomeBatch::<serde_json::Value>::from_cbor(body, max_bytes)?;
    let rows = batch
        .rows
        .into_iter()
        .map(|r| {
            let row = serde_json::from_value(r.row).map_err(|e| format!("not a turn outcome: {e}"));
            (r.key, row)
        })
        .collect();
    Ok(DecodedBatch { device_id: batch.device_id, batch_id: batch.batch_id, rows })
}

/// The row if its key is `key` and it keeps the outcome rules, or why not.
fn check_row(key: &OutcomeKey, outcome: TurnOutcome) -> Result<TurnOutcome, String> {
    if outcome.dialogue_id != key.dialogue_id || outcome.turn != key.turn {
        return Err(format!(
            "key (dialogue {:?}, turn {}) disagrees with the row's (dialogue {:?}, turn {})",
            key.dialogue_id, key.turn, outcome.dialogue_id, outcome.turn
        ));
    }
    outcome.validate().map_err(|e| e.to_string())?;
    Ok(outcome)
}

async fn publish_acks(
    mut acks: mpsc::Receiver<(DeviceId, OutcomeAck)>,
    publisher: Publisher,
    counters: Arc<Counters>,
) {
    let confirmations = TaskTracker::new();
    while let Some((device, ack)) = acks.recv().await {
        let body = match ack.to_cbor() {
            Ok(body) => body,
            Err(e) => {
                add(&counters.ack_failures, 1);
                error!(error = %e, %device, "ack not encoded");
                continue;
            }
        };
        let template = Message::new(Topic::OutcomeAck(device.clone()).name(), QoS::AtLeastOnce, Bytes::new());
        match publisher.publish_body(&template, &body).await {
            Ok(deliveries) => {
                let counters = counters.clone();
                confirmations.spawn(async move {
                    match Delivery::all_confirmed(deliveries).await {
                        Ok(_) => add(&counters.acks_published, 1),
                        Err(e) => {
                            add(&counters.ack_failures, 1);
                            warn!(error = %e, %device, batch_id = ack.batch_id, "ack not confirmed (the device resends)");
                        }
                    }
                });
            }
            Err(e) => {
                add(&counters.ack_failures, 1);
                warn!(error = %e, %device, batch_id = ack.batch_id, "ack not published (the device resends)");
            }
        }
    }
    confirmations.close();
    confirmations.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_with_rows_that_are_not_outcomes_decodes_with_a_reason_for_each() {
        let device = DeviceId::new("kitchen-1").unwrap();
        let key = |turn| OutcomeKey { dialogue_id: "d".into(), turn };
        let batch = OutcomeBatch {
            device_id: device.clone(),
            batch_id: 3,
            rows: vec![
                tmo_protocol::OutcomeRow { key: key(0), row: serde_json::json!({"not": "an outcome"}) },
                tmo_protocol::OutcomeRow { key: key(1), row: serde_json::json!(42) },
            ],
        };
        let body = batch.to_cbor().unwrap();
        let decoded = decode_batch(&body, 1 << 20).unwrap();
        assert_eq!((decoded.device_id, decoded.batch_id, decoded.rows.len()), (device, 3, 2));
        for (_, row) in decoded.rows {
            assert!(row.unwrap_err().starts_with("not a turn outcome"));
        }
        assert!(decode_batch(b"junk", 1 << 20).is_err());
    }
}

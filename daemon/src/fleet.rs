//! The device's side of the fleet loop, on the MQTT link:
//! - **upload**: outcome rows go out oldest first in batches (one MQTT packet each, QoS 1) and
//!   are marked uploaded only for the keys a collector stores (rows it refuses are set aside
//!   with its reason, neither uploaded nor sent again, and counted; a row over the packet goes
//!   with the end of its text cut, or is set aside if even that cannot fit); while the broker is away
//!   they wait in the log (bounded by its size, uploaded rows evicted first) and drain in order
//!   after reconnecting;
//! - **status**: a retained `DeviceStatus` on `tmo/v1/dev/<id>/status`, periodically and after
//!   every policy event;
//! - **policies**: signed bundles on the group's retained policy topic are verified (trusted key,
//!   signature, hash, size), checked against the device (its group, the bundle's device list,
//!   expiry, a sequence above the highest taken: no replay or downgrade), then against the board
//!   (canary share, schema, daemon version, probe run) and adopted, or refused with the reason
//!   on the status topic. A fleet rollback is a newer bundle of the earlier policy, replacing the
//!   retained one, so it holds across reconnects and restarts; there are no group commands.
//!
//! The daemon is reached through [`FleetHost`] only, so this module never names the service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::Context;
use ed25519_dalek::VerifyingKey;
use outcome_log::{LoggedOutcome, OutcomeWriter};
use policy_onnx::LoadOptions;
use tmo_protocol::link::{Delivered, Incoming, Message, QoS};
use tmo_protocol::{
    CborMessage, DeviceId, DeviceStatus, GroupName, Inbox, JsonMessage, OutcomeAck, OutcomeBatch, OutcomeKey,
    OutcomeRow, PolicyBundle, PolicyStats, PolicyUpdateReport, ReassemblyLimits, StatusCounters, Topic,
    in_canary,
};
use tokio::sync::{Notify, oneshot};

use crate::config::Config;
use crate::link::DeviceLink;
use crate::policies::ServingPolicy;
use crate::util::{lock, unix_ms_now};

/// Waits after a failed upload, doubling up to the maximum.
const UPLOAD_BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// What the fleet tasks need of the daemon: its outcome log and counters, the wakeups of the
/// uploader and the status publisher, and the serving policy.
pub trait FleetHost: Send + Sync + 'static {
    /// The outcome log: the rows to upload, the rows uploaded, its figures for the status.
    fn outcomes(&self) -> &OutcomeWriter;
    /// Notified when a row was logged.
    fn upload_wakeup(&self) -> &Notify;
    /// Notified when the counters or the policy changed.
    fn status_wakeup(&self) -> &Notify;
    /// The counters as the status message carries them (the log's figures added by the caller).
    fn status_counters(&self) -> StatusCounters;
    /// How bundles are loaded on this board (schema, size limit).
    fn policy_options(&self) -> &LoadOptions;
    /// The serving policy's version, its bundle's creation time, and the previous version.
    fn policy_versions(&self) -> (String, u64, Option<String>);
    /// The last policy bundle handled.
    fn last_policy_update(&self) -> Option<PolicyUpdateReport>;
    /// How the recent policy versions served, the serving one first.
    fn policy_stats(&self) -> Vec<PolicyStats>;
    /// tmod stops cleanly: a policy on trial goes on with its trial at the next start.
    fn note_clean_stop(&self);
    /// Records what became of a bundle, for `/v1/status` and the status topic.
    fn report_policy_update(&self, version: String, accepted: bool, reason: Option<String>);
    /// The highest bundle sequence taken, kept across restarts.
    fn policy_sequence_high_water(&self) -> u64;
    /// Raises that mark (a bundle of the serving policy under a newer sequence).
    fn raise_policy_sequence(&self, sequence: u64) -> Result<(), String>;
    /// Serves a verified, prepared policy from the next decision on (the mark rises to its
    /// bundle's sequence).
    fn adopt_policy(&self, prepared: ServingPolicy) -> Result<(), String>;
}

/// `[fleet]`, parsed.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub group: Option<GroupName>,
    pub trusted_keys: Vec<VerifyingKey>,
    pub upload: bool,
    pub upload_batch_rows: usize,
    pub ack_timeout: Duration,
    pub status_interval: Duration,
}

impl FleetConfig {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let f = &config.file.fleet;
        let group = (!f.group.is_empty())
            .then(|| GroupName::new(f.group.clone()))
            .transpose()
            .context("fleet.group")?;
        let trusted_keys = f
            .trusted_keys
            .iter()
            .map(|k| tmo_protocol::bundle::public_key_from_hex(k).map_err(|e| format!("{k:?}: {e}")))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)
            .context("fleet.trusted_keys")?;
        Ok(Self {
            group,
            trusted_keys,
            upload: f.upload,
            upload_batch_rows: f.upload_batch_rows,
            ack_timeout: Duration::from_secs_f64(f.ack_timeout_secs),
            status_interval: Duration::from_secs_f64(f.status_interval_secs),
        })
    }

    /// The fleet topics the device subscribes to: its acks, and its group's policy.
    pub fn topics(&self, device: &DeviceId) -> Vec<String> {
        let mut topics = vec![Topic::OutcomeAck(device.clone()).name()];
        if let Some(group) = &self.group {
            topics.push(Topic::Policy(group.clone()).name());
        }
        topics
    }
}

type AckWaiters = Arc<Mutex<HashMap<u64, oneshot::Sender<OutcomeAck>>>>;

/// Starts the uploader, the status publisher and the handler of fleet messages.
pub fn start<S: FleetHost>(
    service: &Arc<S>,
    link: Arc<DeviceLink>,
    incoming: tokio::sync::mpsc::Receiver<Incoming>,
    config: FleetConfig,
) {
    let acks = AckWaiters::default();
    let config = Arc::new(config);
    let device = link.device().clone();
    tokio::spawn(handle_incoming(Arc::downgrade(service), device, incoming, acks.clone(), config.clone()));
    if config.upload {
        tokio::spawn(upload(Arc::downgrade(service), link.clone(), acks, config.clone()));
    }
    tokio::spawn(publish_status(Arc::downgrade(service), link, config));
}

/// Outcome batches out, acknowledged keys marked uploaded.
async fn upload<S: FleetHost>(
    service: Weak<S>,
    link: Arc<DeviceLink>,
    acks: AckWaiters,
    config: Arc<FleetConfig>,
) {
    let device = link.device().clone();
    let topic = Topic::Outcomes(device.clone()).name();
    let mut connected = link.connected();
    let mut backoff = UPLOAD_BACKOFF.0;
    let mut batch_id = unix_ms_now();
    loop {
        if connected.wait_for(|up| *up).await.is_err() {
            return;
        }
        let Some(svc) = service.upgrade() else { return };
        let rows = match svc.outcomes().rows_pending_upload(config.upload_batch_rows).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!("outcome upload: reading the log: {e}");
                drop(svc);
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        if rows.is_empty() {
            tokio::select! {
                _ = svc.upload_wakeup().notified() => {}
                _ = tokio::time::sleep(config.status_interval) => {}
            }
            continue;
        }
        drop(svc);
        batch_id += 1;
        match send_batch(&link, &topic, &device, batch_id, rows, &acks, config.ack_timeout).await {
            Ok((ids, refused)) => {
                let Some(svc) = service.upgrade() else { return };
                let rejected = refused.len();
                match svc.outcomes().mark_uploaded(ids).await {
                    Ok(marked) => tracing::debug!(batch_id, marked, rejected, "outcome batch acknowledged"),
                    Err(e) => tracing::error!("outcome upload: marking rows: {e}"),
                }
                // Not uploaded (an uploaded row may be evicted), not pending (it would go again
                // forever): set aside with the collector's reason, and counted in the status.
                if !refused.is_empty()
                    && let Err(e) = svc.outcomes().mark_upload_refused(refused).await
                {
                    tracing::error!("outcome upload: setting refused rows aside: {e}");
                }
                backoff = UPLOAD_BACKOFF.0;
            }
            Err(e) => {
                tracing::warn!(batch_id, "outcome upload: {e}; sending again in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(UPLOAD_BACKOFF.1);
            }
        }
    }
}

/// Publishes one batch (as many of `rows` as fit one packet) and waits for its ack; returns
/// the row ids the collector stored and those it refused for good, with its reasons.
async fn send_batch(
    link: &DeviceLink,
    topic: &str,
    device: &DeviceId,
    batch_id: u64,
    mut rows: Vec<LoggedOutcome>,
    acks: &AckWaiters,
    timeout: Duration,
) -> Result<(Vec<outcome_log::RowId>, Vec<(outcome_log::RowId, String)>), String> {
    let template = Message::new(topic.to_owned(), QoS::AtLeastOnce, Vec::new());
    let max =
        link.publisher().max_frame_bytes(&template).saturating_sub(tmo_protocol::chunk::WHOLE_HEADER_BYTES);
    let body = loop {
        let batch = OutcomeBatch {
            device_id: device.clone(),
            batch_id,
            rows: rows
                .iter()
                .map(|r| OutcomeRow {
                    key: OutcomeKey { dialogue_id: r.outcome.dialogue_id.clone(), turn: r.outcome.turn },
                    row: serde_json::to_value(&r.outcome).unwrap_or_default(),
                })
                .collect(),
        };
        let body = batch.to_cbor().map_err(|e| e.to_string())?;
        if body.len() <= max {
            break body;
        }
        if rows.len() > 1 {
            rows.truncate(rows.len() / 2);
            continue;
        }
        // One row over the packet (a long answer): it goes up with the end of its text left out
        // and counted, since training reads its decision, costs and score, not its words. A row
        // too large even without text is set aside with the reason, never blocking the rows
        // behind it.
        let row = &mut rows[0];
        if !row.outcome.cut_text(body.len() - max) {
            let text = row.outcome.question.len() + row.outcome.answer.len();
            let reason = format!(
                "the row is {} bytes, more than the {max} bytes one upload packet carries, even without its \
                 {text} bytes of text",
                body.len()
            );
            tracing::warn!(dialogue = %row.outcome.dialogue_id, turn = row.outcome.turn, "outcome row set aside: {reason}");
            return Ok((Vec::new(), vec![(row.id, reason)]));
        }
    };
    let (tx, rx) = oneshot::channel();
    lock(acks).insert(batch_id, tx);
    let result = async {
        let deliveries = link.publisher().publish_body(&template, &body).await.map_err(|e| e.to_string())?;
        match tmo_protocol::link::Delivery::all_confirmed(deliveries).await {
            Ok(Delivered::Acknowledged { no_matching_subscribers: true }) => {
                return Err("no collector is subscribed".to_owned());
            }
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
        let ack = tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| format!("no acknowledgement within {timeout:?}"))?
            .map_err(|_| "the link closed".to_owned())?;
        let by_key: HashMap<(&str, u32), outcome_log::RowId> =
            rows.iter().map(|r| ((r.outcome.dialogue_id.as_str(), r.outcome.turn), r.id)).collect();
        for r in &ack.rejected {
            tracing::warn!(dialogue = %r.key.dialogue_id, turn = r.key.turn, reason = %r.reason, "collector refused an outcome row");
        }
        let id_of = |k: &OutcomeKey| by_key.get(&(k.dialogue_id.as_str(), k.turn)).copied();
        let ids = ack.accepted.iter().filter_map(id_of).collect();
        let refused = ack.rejected.iter().filter_map(|r| Some((id_of(&r.key)?, r.reason.clone()))).collect();
        Ok((ids, refused))
    }
    .await;
    lock(acks).remove(&batch_id);
    result
}

/// Acks, bundles and commands from the link.
async fn handle_incoming<S: FleetHost>(
    service: Weak<S>,
    device: DeviceId,
    mut incoming: tokio::sync::mpsc::Receiver<Incoming>,
    acks: AckWaiters,
    config: Arc<FleetConfig>,
) {
    let max_bundle =
        service.upgrade().map_or(8 << 20, |s| s.policy_options().max_bytes as usize * 2 + (64 << 10));
    let mut inbox = Inbox::new(ReassemblyLimits {
        max_message_bytes: max_bundle,
        max_partial_bytes: 2 * max_bundle,
        ..ReassemblyLimits::default()
    });
    // The signature of the last bundle refused (or left to another canary share): delivered
    // again at a reconnect, it is not checked and reported again; pushed again with a new
    // manifest (a wider canary share), it is a new bundle.
    let mut refused_signature: Option<Vec<u8>> = None;
    while let Some(message) = incoming.recv().await {
        let Some(svc) = service.upgrade() else { return };
        match Topic::parse(&message.topic) {
            Ok(Topic::OutcomeAck(_)) => {
                if let Some(ack) =
                    inbox.receive::<OutcomeAck>(&message.topic, &message.payload, Instant::now())
                {
                    match lock(&acks).remove(&ack.batch_id) {
                        Some(waiter) => {
                            let _ = waiter.send(ack);
                        }
                        None => tracing::debug!(batch_id = ack.batch_id, "ack of a batch no longer waiting"),
                    }
                }
            }
            Ok(Topic::Policy(_)) => {
                match inbox.try_receive::<PolicyBundle>(&message.topic, &message.payload, Instant::now()) {
                    Ok(Some(bundle)) => {
                        if refused_signature.as_deref() == Some(bundle.signature.as_slice()) {
                            continue; // the retained bundle refused last, delivered again
                        }
                        let signature = bundle.signature.clone();
                        let (svc, config, device) = (svc.clone(), config.clone(), device.clone());
                        // Loading and probing a model is blocking work.
                        let refused =
                            tokio::task::spawn_blocking(move || take_bundle(&*svc, &config, &device, bundle))
                                .await
                                .unwrap_or(true);
                        refused_signature = refused.then_some(signature);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!("policy bundle refused: {e}");
                        svc.report_policy_update(
                            String::new(),
                            false,
                            Some(format!("malformed bundle: {e}")),
                        );
                    }
                }
            }
            _ => tracing::debug!(topic = %message.topic, "publish on an unexpected topic ignored"),
        }
    }
}

/// Verifies, checks and adopts a bundle, reporting the result either way; returns whether it
/// was refused (or is for another canary share).
fn take_bundle(
    service: &impl FleetHost,
    config: &FleetConfig,
    device: &DeviceId,
    bundle: PolicyBundle,
) -> bool {
    let refuse = |version: String, reason: String| {
        tracing::warn!(%version, %reason, "policy bundle refused");
        service.report_policy_update(version, false, Some(reason));
        true
    };
    let manifest = match bundle.verify(&config.trusted_keys) {
        Ok(m) => m,
        Err(e) => return refuse(String::new(), e.to_string()),
    };
    let Some(group) = &config.group else {
        return refuse(manifest.version, "this device is in no group".into());
    };
    let (current, _, _) = service.policy_versions();
    let (now, high_water) = (unix_ms_now(), service.policy_sequence_high_water());
    if manifest.version == current {
        // The serving policy again: its retained copy at a reconnect, or a fleet rollback to
        // it under a newer sequence, which is recorded so that the bundle it replaced (or any
        // older one) is not taken later.
        if manifest.check_binding(group, device, now, high_water).is_ok()
            && let Err(e) = service.raise_policy_sequence(manifest.sequence)
        {
            tracing::warn!("policy sequence not recorded: {e}");
        }
        return false;
    }
    if manifest.sequence == high_water && high_water > 0 {
        // The bundle taken last, which this device went back from (a failed decision, or a tmod
        // that ended with it on trial), delivered again: that was reported when it happened.
        tracing::info!(version = %manifest.version, "policy bundle gone back from is not taken again");
        return true;
    }
    if let Err(e) = manifest.check_binding(group, device, now, high_water) {
        return refuse(manifest.version, e.to_string());
    }
    if let Some(percent) = manifest.canary_percent
        && !in_canary(device, &manifest.version, percent)
    {
        tracing::info!(version = %manifest.version, percent, "policy bundle not for this device (canary)");
        service.report_policy_update(
            manifest.version,
            false,
            Some(format!("not in the {percent}% canary share")),
        );
        return true;
    }
    let prepared = match ServingPolicy::prepare(bundle.onnx, &manifest, service.policy_options()) {
        Ok(p) => p,
        Err(reason) => return refuse(manifest.version, reason),
    };
    match service.adopt_policy(prepared) {
        Ok(()) => {
            tracing::info!(version = %manifest.version, previous = %current, "policy adopted");
            service.report_policy_update(manifest.version, true, None);
            false
        }
        Err(reason) => refuse(manifest.version, reason),
    }
}

/// The retained status, on connect, periodically and after events.
async fn publish_status<S: FleetHost>(service: Weak<S>, link: Arc<DeviceLink>, config: Arc<FleetConfig>) {
    let topic = Topic::Status(link.device().clone()).name();
    let mut connected = link.connected();
    loop {
        if connected.wait_for(|up| *up).await.is_err() {
            return;
        }
        let Some(svc) = service.upgrade() else { return };
        let status = device_status(&*svc, link.device(), config.group.clone()).await;
        match status.to_json() {
            Ok(payload) => {
                let message = Message::new(topic.clone(), QoS::AtLeastOnce, payload).retained(true);
                if let Err(e) = link.publisher().publish(message).await {
                    tracing::debug!("status not published: {e}");
                }
            }
            Err(e) => tracing::warn!("status not encoded: {e}"),
        }
        tokio::select! {
            _ = svc.status_wakeup().notified() => {}
            _ = tokio::time::sleep(config.status_interval) => {}
            _ = connected.changed() => {}
        }
    }
}

async fn device_status(
    service: &impl FleetHost,
    device: &DeviceId,
    group: Option<GroupName>,
) -> DeviceStatus {
    let (version, _, previous) = service.policy_versions();
    let mut counters = service.status_counters();
    if let Ok(stats) = service.outcomes().stats().await {
        counters.outcomes_logged = stats.rows;
        counters.outcomes_uploaded = stats.uploaded;
        counters.outcomes_upload_refused = stats.upload_refused;
    }
    DeviceStatus {
        v: tmo_protocol::MESSAGE_VERSION,
        device_id: device.clone(),
        online: true,
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        group,
        policy_version: Some(version),
        previous_policy_version: previous,
        last_policy_update: service.last_policy_update(),
        counters,
        policy_stats: service.policy_stats(),
        updated_unix_ms: unix_ms_now(),
        extra: serde_json::Map::new(),
    }
}

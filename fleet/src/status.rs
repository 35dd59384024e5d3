//! The fleet's status table, from the devices' retained status and availability messages.

use std::collections::BTreeMap;
use std::time::Duration;

use comfy_table::{CellAlignment, Table, presets};
use tmo_protocol::codec::{DecodeError, JsonMessage};
use tmo_protocol::link::{Incoming, Link, LinkConfig, QoS, Subscription};
use tmo_protocol::topic::{OFFLINE, ONLINE, filter};
use tmo_protocol::{DeviceId, DeviceStatus, Topic};

use crate::net::{self, NetError};

/// Largest status message accepted.
pub const MAX_STATUS_BYTES: usize = 64 * 1024;

/// Why a status or availability message was not taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatusError {
    /// The topic is not a device's status or availability topic.
    #[error("topic {0:?} is not a device status or availability topic")]
    Topic(String),
    /// The status does not decode.
    #[error("status of {device}: {source}")]
    Decode {
        /// The device of the topic.
        device: DeviceId,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// The status names another device than its topic.
    #[error("status on the topic of {topic_device} names device {status_device}")]
    WrongDevice {
        /// The device of the topic.
        topic_device: DeviceId,
        /// The device in the status.
        status_device: DeviceId,
    },
    /// Availability other than `online` / `offline`.
    #[error("availability of {device} is {payload:?}, expected online or offline")]
    Availability {
        /// The device.
        device: DeviceId,
        /// The payload, lossily as text.
        payload: String,
    },
}

/// What is known about one device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceEntry {
    /// From the availability topic (`online` / `offline`, the last will); `None` when unknown.
    pub available: Option<bool>,
    /// The latest status.
    pub status: Option<DeviceStatus>,
}

impl DeviceEntry {
    /// Online: the availability message if there is one, else the status's own flag.
    pub fn online(&self) -> Option<bool> {
        self.available.or_else(|| self.status.as_ref().map(|s| s.online))
    }
}

/// The latest status and availability of every device seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetView {
    devices: BTreeMap<DeviceId, DeviceEntry>,
    refused: u64,
}

impl FleetView {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// The subscriptions that feed a view.
    pub fn subscriptions() -> Vec<Subscription> {
        vec![
            Subscription::new(filter::all_status(), QoS::AtLeastOnce),
            Subscription::new(filter::all_availability(), QoS::AtLeastOnce),
        ]
    }

    /// Takes one message; an empty payload (a cleared retained message) forgets what it
    /// carried. Refusals are counted ([`FleetView::refused`]) and returned.
    pub fn apply(&mut self, topic: &str, payload: &[u8]) -> Result<(), StatusError> {
        let result = self.apply_inner(topic, payload);
        if result.is_err() {
            self.refused += 1;
        }
        result
    }

    fn apply_inner(&mut self, topic: &str, payload: &[u8]) -> Result<(), StatusError> {
        match Topic::parse(topic) {
            Ok(Topic::Status(device)) => {
                if payload.is_empty() {
                    self.entry(&device).status = None;
                    return Ok(());
                }
                let status = DeviceStatus::from_json(payload, MAX_STATUS_BYTES)
                    .map_err(|source| StatusError::Decode { device: device.clone(), source })?;
                if status.device_id != device {
                    return Err(StatusError::WrongDevice {
                        topic_device: device,
                        status_device: status.device_id,
                    });
                }
                self.entry(&device).status = Some(status);
                Ok(())
            }
            Ok(Topic::Availability(device)) => {
                let available = match payload {
                    b"" => None,
                    p if p == ONLINE => Some(true),
                    p if p == OFFLINE => Some(false),
                    other => {
                        return Err(StatusError::Availability {
                            device,
                            payload: String::from_utf8_lossy(&other[..other.len().min(64)]).into_owned(),
                        });
                    }
                };
                self.entry(&device).available = available;
                Ok(())
            }
            _ => Err(StatusError::Topic(topic.to_owned())),
        }
    }

    fn entry(&mut self, device: &DeviceId) -> &mut DeviceEntry {
        self.devices.entry(device.clone()).or_default()
    }

    /// Every device, by id.
    pub fn devices(&self) -> &BTreeMap<DeviceId, DeviceEntry> {
        &self.devices
    }

    /// Messages refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The table: one row per device.
    pub fn render(&self, now_unix_ms: u64) -> String {
        let mut table = Table::new();
        table.load_preset(presets::ASCII_MARKDOWN);
        table.set_header(vec![
            "device",
            "online",
            "policy",
            "previous",
            "last policy update",
            "last outcome",
            "requests",
            "cloud",
            "mean reward",
            "energy J",
            "uploaded/logged",
        ]);
        for (device, entry) in &self.devices {
            let online = match entry.online() {
                Some(true) => "yes",
                Some(false) => "no",
                None => "?",
            };
            let mut row = vec![device.to_string(), online.to_owned()];
            match &entry.status {
                None => row.extend(std::iter::repeat_n("-".to_owned(), 9)),
                Some(s) => {
                    let c = &s.counters;
                    let answered = c.local_answers + c.cloud_answers;
                    row.push(s.policy_version.clone().unwrap_or_else(|| "-".into()));
                    row.push(s.previous_policy_version.clone().unwrap_or_else(|| "-".into()));
                    row.push(match &s.last_policy_update {
                        None => "-".into(),
                        Some(u) if u.accepted => {
                            format!("{} accepted {}", u.version, age(now_unix_ms, u.unix_ms))
                        }
                        Some(u) => format!(
                            "{} rejected {}: {}",
                            u.version,
                            age(now_unix_ms, u.unix_ms),
                            u.reason.as_deref().unwrap_or("no reason given")
                        ),
                    });
                    row.push(c.last_outcome_unix_ms.map_or_else(|| "-".into(), |t| age(now_unix_ms, t)));
                    row.push(c.requests.to_string());
                    row.push(if answered == 0 {
                        "-".into()
                    } else {
                        format!("{:.0}%", 100.0 * c.cloud_answers as f64 / answered as f64)
                    });
                    row.push(c.mean_reward.map_or_else(|| "-".into(), |r| format!("{r:.3}")));
                    row.push(c.energy_joules.map_or_else(|| "-".into(), |e| format!("{e:.1}")));
                    row.push(format!("{}/{}", c.outcomes_uploaded, c.outcomes_logged));
                }
            }
            table.add_row(row);
        }
        for index in 6..=10 {
            if let Some(column) = table.column_mut(index) {
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
        let mut text = table.to_string();
        text.push('\n');
        text
    }
}

/// "12s ago", "5m ago", "3h ago", "2d ago" (or "in 4s" for a clock ahead of ours).
pub fn age(now_unix_ms: u64, then_unix_ms: u64) -> String {
    let (secs, ahead) = if then_unix_ms > now_unix_ms {
        ((then_unix_ms - now_unix_ms) / 1000, true)
    } else {
        ((now_unix_ms - then_unix_ms) / 1000, false)
    };
    let text = match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    };
    if ahead { format!("in {text}") } else { format!("{text} ago") }
}

/// Feeds `view` from `link` until no message arrived for `quiet` (the retained messages come
/// in a burst right after subscribing), or the link closes.
pub async fn collect_until_quiet(link: &mut Link, view: &mut FleetView, quiet: Duration) {
    while let Ok(Some(incoming)) = tokio::time::timeout(quiet, link.incoming.recv()).await {
        apply_logged(view, &incoming);
    }
}

/// Applies one message, logging a refusal.
pub fn apply_logged(view: &mut FleetView, incoming: &Incoming) {
    if let Err(error) = view.apply(&incoming.topic, &incoming.payload) {
        tracing::warn!(%error, "status message refused");
    }
}

/// Connects, gathers the retained status and availability messages until `quiet` passes
/// without one, disconnects and returns the view.
pub async fn snapshot(
    config: &LinkConfig,
    connect_timeout: Duration,
    quiet: Duration,
) -> Result<FleetView, NetError> {
    let mut link = net::connect(config, FleetView::subscriptions(), connect_timeout).await?;
    let mut view = FleetView::new();
    collect_until_quiet(&mut link, &mut view, quiet).await;
    link.shutdown(Duration::from_secs(2)).await;
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_json(device: &str) -> Vec<u8> {
        format!(
            r#"{{"v":1,"device_id":"{device}","online":true,"daemon_version":"0.1.0","group":"pilot",
            "policy_version":"p-4","previous_policy_version":"p-3",
            "last_policy_update":{{"version":"p-5","accepted":false,"reason":"unknown key","unix_ms":1000000}},
            "counters":{{"requests":10,"local_answers":6,"cloud_answers":4,"outcomes_logged":10,
            "outcomes_uploaded":8,"mean_reward":0.625,"energy_joules":151.25,"last_outcome_unix_ms":1030000}},
            "updated_unix_ms":1030000}}"#
        )
        .into_bytes()
    }

    #[test]
    fn the_table_shows_each_devices_latest_state() {
        let mut view = FleetView::new();
        view.apply("tmo/v1/dev/kitchen-1/status", &status_json("kitchen-1")).unwrap();
        view.apply("tmo/v1/dev/kitchen-1/availability", b"online").unwrap();
        view.apply("tmo/v1/dev/kitchen-2/availability", b"offline").unwrap();
        let table = view.render(1_060_000);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].contains("device") && lines[0].contains("uploaded/logged"), "{table}");
        let row = lines[2];
        for expected in [
            "kitchen-1",
            "yes",
            "p-4",
            "p-3",
            "p-5 rejected 60s ago: unknown key",
            "30s ago",
            "10",
            "40%",
            "0.625",
            "151.2",
            "8/10",
        ] {
            assert!(row.contains(expected), "{expected:?} missing from {row:?}");
        }
        assert!(lines[3].contains("kitchen-2") && lines[3].contains("no"), "{table}");
        // The device goes offline (its last will), then its status is cleared.
        view.apply("tmo/v1/dev/kitchen-1/availability", b"offline").unwrap();
        assert_eq!(view.devices()[&DeviceId::new("kitchen-1").unwrap()].online(), Some(false));
        view.apply("tmo/v1/dev/kitchen-1/status", b"").unwrap();
        assert!(view.devices()[&DeviceId::new("kitchen-1").unwrap()].status.is_none());
    }

    #[test]
    fn bad_messages_are_refused_and_counted() {
        let mut view = FleetView::new();
        assert!(matches!(view.apply("tmo/v1/dev/a/status", b"{nope"), Err(StatusError::Decode { .. })));
        assert!(matches!(
            view.apply("tmo/v1/dev/a/status", &status_json("b")),
            Err(StatusError::WrongDevice { .. })
        ));
        assert!(matches!(
            view.apply("tmo/v1/dev/a/availability", b"maybe"),
            Err(StatusError::Availability { .. })
        ));
        assert!(matches!(view.apply("tmo/v1/group/g/policy", b"x"), Err(StatusError::Topic(_))));
        assert_eq!(view.refused(), 4);
        assert!(view.devices().values().all(|e| e.status.is_none()));
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(10_000, 5_000), "5s ago");
        assert_eq!(age(1_000_000, 0), "16m ago");
        assert_eq!(age(0, 4_000), "in 4s");
        assert_eq!(age(3 * 86_400_000, 0), "3d ago");
    }
}

//! Telemetry: CPU load per core, memory, temperatures (sysinfo) and the energy meter, sampled on
//! a fixed period into a latest snapshot.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use device_profiles::TelemetrySettings;
use serde::Serialize;
use sysinfo::{Components, System};

use crate::energy::{EnergyLedger, EnergyMeter, Reading};
use crate::health::Health;

/// One temperature sensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Temperature {
    /// Sensor label as the kernel names it.
    pub label: String,
    /// Degrees Celsius.
    pub celsius: f32,
}

/// The latest telemetry sample.
#[derive(Debug, Clone, Serialize)]
pub struct TelemetrySnapshot {
    /// When the sample was taken (monotonic; not serialised).
    #[serde(skip)]
    pub taken_at: Instant,
    /// When the sample was taken, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Load of each core in percent (0 on the very first sample).
    pub cpu_percent: Vec<f32>,
    /// Load over all cores in percent.
    pub cpu_total_percent: f32,
    /// Memory in use.
    pub memory_used_bytes: u64,
    /// Memory available to new work.
    pub memory_available_bytes: u64,
    /// Installed memory.
    pub memory_total_bytes: u64,
    /// Temperature sensors that report a value.
    pub temperatures: Vec<Temperature>,
    /// Energy meter in use (`rapl`, `hwmon`, `power_supply`, `rpi5_pmic`), if any.
    pub energy_source: Option<&'static str>,
    /// Power over the last sampling period, when the meter gave it.
    pub power_watts: Option<f64>,
    /// Joules counted since sensing started.
    pub energy_total_joules: f64,
    /// Health of the energy meter.
    pub energy_health: Health,
}

/// Samples sysinfo and the energy meter.
#[derive(Debug)]
pub struct TelemetrySampler {
    system: System,
    components: Components,
    meter: Option<EnergyMeter>,
    settings: TelemetrySettings,
    /// Integrated energy; read by [`crate::SensingHandle::energy_between`].
    pub ledger: EnergyLedger,
    health: Health,
}

impl TelemetrySampler {
    /// A sampler; a missing energy meter is reported in every snapshot (and retried on the
    /// sampling period), not an error.
    pub fn new(settings: &TelemetrySettings) -> Result<Self, sysinfo::Error> {
        let mut system = System::new()?;
        system.refresh_cpu_usage();
        system.refresh_memory();
        let components = Components::new_with_refreshed_list()?;
        let history = std::time::Duration::from_secs(settings.energy_history_secs);
        let mut s = TelemetrySampler {
            system,
            components,
            meter: None,
            settings: settings.clone(),
            ledger: EnergyLedger::new(history),
            health: Health::default(),
        };
        s.open_meter();
        Ok(s)
    }

    fn open_meter(&mut self) {
        match EnergyMeter::open(&self.settings) {
            Ok(m) => self.meter = m,
            Err(e) => self.health.fail("energy", e.to_string()),
        }
    }

    /// Takes one sample.
    pub fn sample(&mut self) -> TelemetrySnapshot {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.components.refresh(false);
        let now = Instant::now();
        if self.meter.is_none() && self.settings.energy != device_profiles::EnergySourceKind::None {
            self.open_meter();
        }
        let mut power = None;
        if let Some(m) = self.meter.as_mut() {
            match m.read() {
                Ok(r) => {
                    power = self.ledger.push(now, r);
                    if let Reading::Watts(w) = r {
                        power = Some(w);
                    }
                    self.health.ok("energy");
                }
                Err(e) => {
                    self.ledger.gap();
                    self.health.fail("energy", e.to_string());
                }
            }
        }
        let temperatures = (&self.components)
            .into_iter()
            .filter_map(|c| {
                let t = c.temperature()?;
                t.is_finite().then(|| Temperature { label: c.label().to_owned(), celsius: t })
            })
            .collect();
        TelemetrySnapshot {
            taken_at: now,
            unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            cpu_percent: self.system.cpus().iter().map(|c| c.usage()).collect(),
            cpu_total_percent: self.system.global_cpu_usage(),
            memory_used_bytes: self.system.used_memory(),
            memory_available_bytes: self.system.available_memory(),
            memory_total_bytes: self.system.total_memory(),
            temperatures,
            energy_source: self.meter.as_ref().map(|m| m.kind()),
            power_watts: power,
            energy_total_joules: self.ledger.total_joules(),
            energy_health: self.health.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_sample_reports_this_machines_cores_and_memory() {
        let mut s = TelemetrySampler::new(&TelemetrySettings::default()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let snap = s.sample();
        assert_eq!(snap.cpu_percent.len(), std::thread::available_parallelism().map_or(1, |n| n.get()));
        assert!(snap.memory_total_bytes > 0 && snap.memory_used_bytes <= snap.memory_total_bytes);
        assert!(snap.cpu_percent.iter().all(|p| (0.0..=100.0).contains(p)));
    }

    #[test]
    fn the_fixture_board_integrates_its_hwmon_power() {
        let settings = TelemetrySettings {
            sysfs_root: Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sysfs/jetson-ina3221"),
            energy: device_profiles::EnergySourceKind::Hwmon,
            ..TelemetrySettings::default()
        };
        let mut s = TelemetrySampler::new(&settings).unwrap();
        let a = s.sample();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let b = s.sample();
        assert_eq!(b.energy_source, Some("hwmon"));
        assert_eq!(b.power_watts, Some(5.08 * 1.32));
        let span = s.ledger.between(a.taken_at, b.taken_at).unwrap();
        let expected = 5.08 * 1.32 * b.taken_at.duration_since(a.taken_at).as_secs_f64();
        assert!((span.joules - expected).abs() < 1e-9, "{span:?}");
        assert!(b.energy_health.up);
    }

    #[test]
    fn a_missing_meter_is_reported_not_fatal() {
        let settings = TelemetrySettings {
            sysfs_root: "/no/such/sysfs".into(),
            energy: device_profiles::EnergySourceKind::Rapl,
            ..TelemetrySettings::default()
        };
        let mut s = TelemetrySampler::new(&settings).unwrap();
        let snap = s.sample();
        assert_eq!(snap.energy_source, None);
        assert!(!snap.energy_health.up);
        assert!(
            snap.energy_health.cause.as_deref().is_some_and(|c| c.contains("RAPL")),
            "{:?}",
            snap.energy_health
        );
        assert_eq!(snap.energy_health.failures, 1);
    }
}

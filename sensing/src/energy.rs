//! Energy meters read from sysfs (RAPL powercap, hwmon INA3221/INA219, power_supply battery) or
//! from the Raspberry Pi 5 PMIC (`vcgencmd pmic_read_adc`), and the ledger that integrates their
//! readings into joules over any span.
//!
//! Every reader takes the sysfs root (`/sys` on a board) so the tests run it against fixture
//! trees with the real file layouts.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use device_profiles::{EnergySourceKind, TelemetrySettings};
use serde::Serialize;

/// Why an energy meter could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    /// The kernel exposes the counter to root only (RAPL since Linux 5.10, CVE-2020-8694).
    #[error(
        "{path} is readable by root only (RAPL energy counters are root-only since Linux 5.10): run tmod as root, or grant read access with a udev rule (chmod o+r on energy_uj)"
    )]
    RootOnly {
        /// The counter file.
        path: PathBuf,
    },
    /// A sysfs file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A sysfs file or command output did not hold the expected number.
    #[error("{what} holds `{text}`, not a number")]
    Parse {
        /// The file or command.
        what: String,
        /// What it held.
        text: String,
    },
    /// The source is not on this board.
    #[error("no {0} energy source found")]
    NotFound(&'static str),
    /// A battery that is not discharging does not measure what the board draws.
    #[error("battery {0} is not discharging (the board runs on external power, which it cannot measure)")]
    NotDischarging(String),
    /// `vcgencmd` failed.
    #[error("`{program} pmic_read_adc` failed: {reason}")]
    Command {
        /// The program run.
        program: String,
        /// Exit status or spawn error.
        reason: String,
    },
    /// Energy was asked for a span the ledger does not cover.
    #[error("no energy samples cover the span (history holds {held_secs:.1} s)")]
    SpanNotCovered {
        /// Seconds of history held.
        held_secs: f64,
    },
}

/// One reading of a meter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reading {
    /// Energy counted since the previous reading of a counter (0 on the first).
    Joules(f64),
    /// Instantaneous power.
    Watts(f64),
}

fn read_text(path: &Path) -> Result<String, EnergyError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().to_owned()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            Err(EnergyError::RootOnly { path: path.to_owned() })
        }
        Err(source) => Err(EnergyError::Read { path: path.to_owned(), source }),
    }
}

fn read_u64(path: &Path) -> Result<u64, EnergyError> {
    let text = read_text(path)?;
    text.parse().map_err(|_| EnergyError::Parse { what: path.display().to_string(), text })
}

fn read_f64(path: &Path) -> Result<f64, EnergyError> {
    let text = read_text(path)?;
    text.parse().map_err(|_| EnergyError::Parse { what: path.display().to_string(), text })
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        fs::read_dir(dir).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    v.sort();
    v
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

#[derive(Debug)]
struct RaplZone {
    energy: PathBuf,
    max_uj: u64,
    last_uj: Option<u64>,
}

/// RAPL powercap counters: the top-level zones (`intel-rapl:N`), or the platform zone `psys`
/// alone when present (it already contains the packages). Subzones (core, uncore, dram inside a
/// package) are never added to their package.
#[derive(Debug)]
pub struct RaplMeter {
    zones: Vec<RaplZone>,
    names: Vec<String>,
}

impl RaplMeter {
    /// Finds the zones under `<sysfs>/class/powercap`.
    pub fn open(sysfs: &Path) -> Result<Self, EnergyError> {
        let mut tops = Vec::new();
        for dir in sorted_entries(&sysfs.join("class/powercap")) {
            let n = file_name(&dir);
            let top = n.strip_prefix("intel-rapl:").is_some_and(|rest| !rest.contains(':'));
            if top && dir.join("energy_uj").exists() {
                let name = read_text(&dir.join("name")).unwrap_or_else(|_| n.clone());
                tops.push((name, dir));
            }
        }
        if tops.is_empty() {
            return Err(EnergyError::NotFound("RAPL powercap"));
        }
        if let Some(psys) = tops.iter().position(|(name, _)| name == "psys") {
            let keep = tops.swap_remove(psys);
            tops = vec![keep];
        }
        let mut zones = Vec::new();
        let mut names = Vec::new();
        for (name, dir) in tops {
            let max_uj = read_u64(&dir.join("max_energy_range_uj"))?;
            // Reading the counter now surfaces a root-only file at open time with a clear error.
            let energy = dir.join("energy_uj");
            read_u64(&energy)?;
            zones.push(RaplZone { energy, max_uj, last_uj: None });
            names.push(name);
        }
        Ok(RaplMeter { zones, names })
    }

    /// The zone names summed (`package-0`, ...).
    pub fn zones(&self) -> &[String] {
        &self.names
    }

    /// Joules since the previous call, across a counter wrap at `max_energy_range_uj`.
    pub fn read(&mut self) -> Result<Reading, EnergyError> {
        let mut now = Vec::with_capacity(self.zones.len());
        for z in &self.zones {
            now.push(read_u64(&z.energy)?);
        }
        let mut uj = 0u64;
        for (z, v) in self.zones.iter_mut().zip(now) {
            if let Some(last) = z.last_uj {
                uj += if v >= last { v - last } else { z.max_uj.saturating_sub(last) + v };
            }
            z.last_uj = Some(v);
        }
        Ok(Reading::Joules(uj as f64 / 1e6))
    }
}

#[derive(Debug, Clone)]
enum Rail {
    /// Bus voltage (mV) and current (mA) files.
    VoltsAmps { label: String, volts: PathBuf, amps: PathBuf },
    /// A power file and its unit in watts (1e-6 for hwmon microwatts, 1e-3 for iio milliwatts).
    Power { label: String, power: PathBuf, unit: f64 },
}

impl Rail {
    fn label(&self) -> &str {
        match self {
            Rail::VoltsAmps { label, .. } | Rail::Power { label, .. } => label,
        }
    }
    fn watts(&self) -> Result<f64, EnergyError> {
        match self {
            Rail::VoltsAmps { volts, amps, .. } => Ok(read_f64(volts)? / 1e3 * read_f64(amps)? / 1e3),
            Rail::Power { power, unit, .. } => Ok(read_f64(power)? * unit),
        }
    }
}

/// hwmon power monitors: INA3221 (three channels, each bus voltage x current) and INA219/INA226
/// (`power1_input`, else voltage x current), plus the older Jetson kernels' (L4T 32, TX2) iio
/// driver `ina3221x` (`in_powerN_input` in milliwatts, `rail_name_N`). When one rail carries the
/// board's total input (`hwmon_total_rail`, `VDD_IN` on Jetson), only that rail counts: the
/// others are inside it.
#[derive(Debug)]
pub struct HwmonMeter {
    rails: Vec<Rail>,
}

impl HwmonMeter {
    /// Finds the monitors under `<sysfs>/class/hwmon`.
    pub fn open(sysfs: &Path, total_rail: &str) -> Result<Self, EnergyError> {
        let mut rails = Vec::new();
        for dir in sorted_entries(&sysfs.join("class/hwmon")) {
            let Ok(chip) = read_text(&dir.join("name")) else { continue };
            let hw = file_name(&dir);
            if chip == "ina3221" {
                for ch in 1..=3 {
                    let volts = dir.join(format!("in{ch}_input"));
                    let amps = dir.join(format!("curr{ch}_input"));
                    let enabled = read_text(&dir.join(format!("in{ch}_enable"))).map_or(true, |s| s != "0");
                    if enabled && volts.exists() && amps.exists() {
                        let label = read_text(&dir.join(format!("in{ch}_label")))
                            .unwrap_or_else(|_| format!("{hw}/ch{ch}"));
                        rails.push(Rail::VoltsAmps { label, volts, amps });
                    }
                }
            } else if chip.starts_with("ina2") {
                let label = read_text(&dir.join("in1_label")).unwrap_or_else(|_| format!("{hw}/{chip}"));
                let power = dir.join("power1_input");
                if power.exists() {
                    rails.push(Rail::Power { label, power, unit: 1e-6 });
                } else if dir.join("in1_input").exists() && dir.join("curr1_input").exists() {
                    rails.push(Rail::VoltsAmps {
                        label,
                        volts: dir.join("in1_input"),
                        amps: dir.join("curr1_input"),
                    });
                }
            }
        }
        for dir in sorted_entries(&sysfs.join("bus/iio/devices")) {
            if read_text(&dir.join("name")).is_ok_and(|n| n == "ina3221x") {
                for ch in 0..3 {
                    let power = dir.join(format!("in_power{ch}_input"));
                    if power.exists() {
                        let label = read_text(&dir.join(format!("rail_name_{ch}")))
                            .unwrap_or_else(|_| format!("{}/ch{ch}", file_name(&dir)));
                        rails.push(Rail::Power { label, power, unit: 1e-3 });
                    }
                }
            }
        }
        if let Some(total) = rails.iter().find(|r| r.label() == total_rail).cloned() {
            rails = vec![total];
        }
        if rails.is_empty() {
            return Err(EnergyError::NotFound("hwmon INA3221/INA219 or iio ina3221x"));
        }
        Ok(HwmonMeter { rails })
    }

    /// Labels of the rails summed.
    pub fn rails(&self) -> Vec<String> {
        self.rails.iter().map(|r| r.label().to_owned()).collect()
    }

    /// Power now, summed over the counted rails.
    pub fn read(&mut self) -> Result<Reading, EnergyError> {
        let mut w = 0.0;
        for r in &self.rails {
            w += r.watts()?;
        }
        Ok(Reading::Watts(w))
    }
}

/// A `power_supply` battery's discharge power (`power_now`, else `current_now` x `voltage_now`).
#[derive(Debug)]
pub struct BatteryMeter {
    dir: PathBuf,
    name: String,
}

impl BatteryMeter {
    /// Finds the first supply of type `Battery` under `<sysfs>/class/power_supply`.
    pub fn open(sysfs: &Path) -> Result<Self, EnergyError> {
        for dir in sorted_entries(&sysfs.join("class/power_supply")) {
            if read_text(&dir.join("type")).is_ok_and(|t| t == "Battery") {
                return Ok(BatteryMeter { name: file_name(&dir), dir });
            }
        }
        Err(EnergyError::NotFound("power_supply battery"))
    }

    /// Power drawn from the battery now; an error while it is charging or full.
    pub fn read(&mut self) -> Result<Reading, EnergyError> {
        let status = read_text(&self.dir.join("status"))?;
        if status != "Discharging" {
            return Err(EnergyError::NotDischarging(self.name.clone()));
        }
        let power = self.dir.join("power_now");
        let w = if power.exists() {
            read_f64(&power)? / 1e6
        } else {
            read_f64(&self.dir.join("current_now"))? / 1e6 * read_f64(&self.dir.join("voltage_now"))? / 1e6
        };
        Ok(Reading::Watts(w.abs()))
    }
}

/// Total power of the Raspberry Pi 5 PMIC rails in `vcgencmd pmic_read_adc` output: each rail
/// `X` that has both a current line `X_A current(n)=..A` and a voltage line `X_V volt(n)=..V`
/// contributes I x V (inputs such as `EXT5V_V` have no current line and are left out).
pub fn parse_pmic_adc(text: &str) -> Result<(f64, usize), EnergyError> {
    let mut amps = std::collections::BTreeMap::new();
    let mut volts = std::collections::BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else { continue };
        let Some((_, number)) = value.split_once('=') else { continue };
        let parse = |unit: char| {
            number.strip_suffix(unit).and_then(|n| n.parse::<f64>().ok()).ok_or_else(|| EnergyError::Parse {
                what: "vcgencmd pmic_read_adc".into(),
                text: line.trim().to_owned(),
            })
        };
        if let Some(rail) = name.strip_suffix("_A") {
            amps.insert(rail.to_owned(), parse('A')?);
        } else if let Some(rail) = name.strip_suffix("_V") {
            volts.insert(rail.to_owned(), parse('V')?);
        }
    }
    let mut watts = 0.0;
    let mut rails = 0;
    for (rail, a) in &amps {
        if let Some(v) = volts.get(rail) {
            watts += a * v;
            rails += 1;
        }
    }
    if rails == 0 {
        return Err(EnergyError::Parse {
            what: "vcgencmd pmic_read_adc".into(),
            text: text.chars().take(200).collect(),
        });
    }
    Ok((watts, rails))
}

/// The Raspberry Pi 5 PMIC, read by running `<program> pmic_read_adc` at most once per interval
/// (between reads the last power is reported again).
#[derive(Debug)]
pub struct PmicMeter {
    program: PathBuf,
    interval: Duration,
    last: Option<(Instant, f64)>,
    /// How many times the program ran.
    pub runs: u64,
}

impl PmicMeter {
    /// A meter running `program` (normally `vcgencmd`), no more than once per `interval`.
    pub fn new(program: PathBuf, interval: Duration) -> Self {
        PmicMeter { program, interval, last: None, runs: 0 }
    }

    /// Power now (cached within the interval).
    pub fn read(&mut self) -> Result<Reading, EnergyError> {
        let now = Instant::now();
        if let Some((at, w)) = self.last
            && now.duration_since(at) < self.interval
        {
            return Ok(Reading::Watts(w));
        }
        self.runs += 1;
        let program = self.program.display().to_string();
        let out = Command::new(&self.program)
            .arg("pmic_read_adc")
            .output()
            .map_err(|e| EnergyError::Command { program: program.clone(), reason: e.to_string() })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(EnergyError::Command { program, reason: format!("{}: {stderr}", out.status) });
        }
        let (w, _) = parse_pmic_adc(&String::from_utf8_lossy(&out.stdout))?;
        self.last = Some((now, w));
        Ok(Reading::Watts(w))
    }
}

/// The board's energy meter, chosen by the profile or auto-detected.
#[derive(Debug)]
pub enum EnergyMeter {
    /// RAPL powercap.
    Rapl(RaplMeter),
    /// hwmon power monitors.
    Hwmon(HwmonMeter),
    /// Battery discharge.
    Battery(BatteryMeter),
    /// Raspberry Pi 5 PMIC.
    Pmic(PmicMeter),
}

impl EnergyMeter {
    /// Opens the meter the settings name; `auto` tries RAPL, hwmon, the Pi 5 PMIC (when the
    /// device tree says Raspberry Pi 5), then a battery. `Ok(None)` means `energy = "none"`.
    pub fn open(s: &TelemetrySettings) -> Result<Option<Self>, EnergyError> {
        let root = s.sysfs_root.as_path();
        let pmic = || PmicMeter::new(s.vcgencmd.clone(), Duration::from_millis(s.pmic_interval_ms));
        Ok(Some(match s.energy {
            EnergySourceKind::None => return Ok(None),
            EnergySourceKind::Rapl => EnergyMeter::Rapl(RaplMeter::open(root)?),
            EnergySourceKind::Hwmon => EnergyMeter::Hwmon(HwmonMeter::open(root, &s.hwmon_total_rail)?),
            EnergySourceKind::PowerSupply => EnergyMeter::Battery(BatteryMeter::open(root)?),
            EnergySourceKind::Rpi5Pmic => EnergyMeter::Pmic(pmic()),
            EnergySourceKind::Auto => {
                let mut root_only = None;
                match RaplMeter::open(root) {
                    Ok(m) => return Ok(Some(EnergyMeter::Rapl(m))),
                    Err(e @ EnergyError::RootOnly { .. }) => root_only = Some(e),
                    Err(_) => {}
                }
                if let Ok(m) = HwmonMeter::open(root, &s.hwmon_total_rail) {
                    return Ok(Some(EnergyMeter::Hwmon(m)));
                }
                let model = read_text(&root.join("firmware/devicetree/base/model")).unwrap_or_default();
                if model.contains("Raspberry Pi 5") {
                    return Ok(Some(EnergyMeter::Pmic(pmic())));
                }
                if let Ok(m) = BatteryMeter::open(root) {
                    return Ok(Some(EnergyMeter::Battery(m)));
                }
                return Err(root_only.unwrap_or(EnergyError::NotFound("RAPL, hwmon, Pi 5 PMIC or battery")));
            }
        }))
    }

    /// Short name of the meter (`rapl`, `hwmon`, `power_supply`, `rpi5_pmic`).
    pub fn kind(&self) -> &'static str {
        match self {
            EnergyMeter::Rapl(_) => "rapl",
            EnergyMeter::Hwmon(_) => "hwmon",
            EnergyMeter::Battery(_) => "power_supply",
            EnergyMeter::Pmic(_) => "rpi5_pmic",
        }
    }

    /// One reading.
    pub fn read(&mut self) -> Result<Reading, EnergyError> {
        match self {
            EnergyMeter::Rapl(m) => m.read(),
            EnergyMeter::Hwmon(m) => m.read(),
            EnergyMeter::Battery(m) => m.read(),
            EnergyMeter::Pmic(m) => m.read(),
        }
    }
}

/// Energy integrated over a span.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EnergySpan {
    /// Joules used in the covered part of the span.
    pub joules: f64,
    /// Seconds of the span covered by samples (less than `span_secs` when the span starts before
    /// the history, ends after the last sample, or crosses a gap in readings).
    pub covered_secs: f64,
    /// Seconds asked for.
    pub span_secs: f64,
}

#[derive(Debug, Clone, Copy)]
struct Point {
    at: Instant,
    /// Cumulative joules at `at`.
    joules: f64,
    /// False when the reading before this one failed: the segment ending here is a gap.
    joined: bool,
}

/// Cumulative energy over time from meter readings; bounded to a history length.
#[derive(Debug)]
pub struct EnergyLedger {
    points: VecDeque<Point>,
    history: Duration,
    last_watts: Option<f64>,
    joined: bool,
    total: f64,
}

impl EnergyLedger {
    /// A ledger keeping `history` of samples.
    pub fn new(history: Duration) -> Self {
        EnergyLedger { points: VecDeque::new(), history, last_watts: None, joined: false, total: 0.0 }
    }

    /// Adds a reading taken at `at`; returns the power over the last segment when known.
    pub fn push(&mut self, at: Instant, reading: Reading) -> Option<f64> {
        let prev = self.points.back().copied();
        let dt = prev.map(|p| at.saturating_duration_since(p.at).as_secs_f64()).unwrap_or(0.0);
        let (added, watts) = match reading {
            Reading::Joules(j) => {
                (if self.joined { j } else { 0.0 }, (dt > 0.0 && self.joined).then(|| j / dt))
            }
            Reading::Watts(w) => {
                let added = match (self.joined, self.last_watts) {
                    (true, Some(lw)) => (w + lw) / 2.0 * dt,
                    _ => 0.0,
                };
                self.last_watts = Some(w);
                (added, Some(w))
            }
        };
        self.total += added;
        self.points.push_back(Point { at, joules: self.total, joined: self.joined && prev.is_some() });
        self.joined = true;
        while self.points.front().is_some_and(|p| at.saturating_duration_since(p.at) > self.history) {
            self.points.pop_front();
        }
        watts
    }

    /// Records a failed reading: the next segment is a gap, not integrated.
    pub fn gap(&mut self) {
        self.joined = false;
        self.last_watts = None;
    }

    /// Joules counted since the ledger started.
    pub fn total_joules(&self) -> f64 {
        self.total
    }

    /// Energy between two instants, interpolated linearly inside each sampled segment.
    pub fn between(&self, from: Instant, to: Instant) -> Result<EnergySpan, EnergyError> {
        let span_secs = to.saturating_duration_since(from).as_secs_f64();
        let held_secs = match (self.points.front(), self.points.back()) {
            (Some(a), Some(b)) => b.at.saturating_duration_since(a.at).as_secs_f64(),
            _ => 0.0,
        };
        let mut joules = 0.0;
        let mut covered = 0.0;
        for (a, b) in self.points.iter().zip(self.points.iter().skip(1)) {
            if !b.joined || b.at <= from || a.at >= to {
                continue;
            }
            let seg = b.at.saturating_duration_since(a.at).as_secs_f64();
            if seg <= 0.0 {
                continue;
            }
            let lo = if from > a.at { from } else { a.at };
            let hi = if to < b.at { to } else { b.at };
            let part = hi.saturating_duration_since(lo).as_secs_f64();
            joules += (b.joules - a.joules) * part / seg;
            covered += part;
        }
        if covered == 0.0 && span_secs > 0.0 {
            return Err(EnergyError::SpanNotCovered { held_secs });
        }
        Ok(EnergySpan { joules, covered_secs: covered, span_secs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sysfs")
    }

    /// Copies a fixture tree to a temporary directory the test may change.
    fn copy_tree(name: &str) -> tempfile::TempDir {
        fn copy(from: &Path, to: &Path) {
            fs::create_dir_all(to).unwrap();
            for e in fs::read_dir(from).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    copy(&p, &to.join(e.file_name()));
                } else {
                    fs::copy(&p, to.join(e.file_name())).unwrap();
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        copy(&fixtures().join(name), dir.path());
        dir
    }

    #[test]
    fn rapl_sums_packages_not_subzones_and_handles_the_wrap() {
        let tree = copy_tree("x86-rapl");
        let mut m = RaplMeter::open(tree.path()).unwrap();
        assert_eq!(m.zones(), ["package-0", "package-1"]);
        assert_eq!(m.read().unwrap(), Reading::Joules(0.0));
        let zone0 = tree.path().join("class/powercap/intel-rapl:0/energy_uj");
        let zone1 = tree.path().join("class/powercap/intel-rapl:1/energy_uj");
        // Package 0 goes up 5 J; package 1 wraps: from 262143.328850 J (max 262143.999999 J)
        // to 2.0 J, that is 0.671149 + 2.0 J.
        fs::write(&zone0, "1005000000\n").unwrap();
        fs::write(&zone1, "2000000\n").unwrap();
        let Reading::Joules(j) = m.read().unwrap() else { panic!("a counter gives joules") };
        assert!((j - (5.0 + 2.671149)).abs() < 1e-6, "{j}");
    }

    #[test]
    fn rapl_uses_psys_alone_when_present() {
        let tree = copy_tree("x86-rapl-psys");
        let m = RaplMeter::open(tree.path()).unwrap();
        assert_eq!(m.zones(), ["psys"]);
    }

    #[cfg(unix)]
    #[test]
    fn a_root_only_rapl_counter_says_so() {
        use std::os::unix::fs::PermissionsExt;
        // As root the mode does not stop a read, so check the error text the mode would produce.
        let err = EnergyError::RootOnly { path: "/sys/class/powercap/intel-rapl:0/energy_uj".into() };
        assert!(err.to_string().contains("root only"), "{err}");
        let tree = copy_tree("x86-rapl");
        let f = tree.path().join("class/powercap/intel-rapl:0/energy_uj");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o000)).unwrap();
        let readable = fs::read_to_string(&f).is_ok();
        match RaplMeter::open(tree.path()) {
            Ok(_) => assert!(readable, "only root reads a mode-000 file"),
            Err(e) => assert!(matches!(e, EnergyError::RootOnly { .. }), "{e}"),
        }
    }

    #[test]
    fn ina3221_counts_only_the_total_rail() {
        let tree = copy_tree("jetson-ina3221");
        let mut m = HwmonMeter::open(tree.path(), "VDD_IN").unwrap();
        assert_eq!(m.rails(), ["VDD_IN"]);
        // VDD_IN: 5080 mV x 1320 mA.
        assert_eq!(m.read().unwrap(), Reading::Watts(5.08 * 1.32));
        // Without a total rail every channel is added: 5.08*1.32 + 5.072*0.408 + 5.076*0.536.
        let mut all = HwmonMeter::open(tree.path(), "NO_SUCH_RAIL").unwrap();
        assert_eq!(all.rails().len(), 3);
        let Reading::Watts(w) = all.read().unwrap() else { panic!() };
        assert!((w - (5.08 * 1.32 + 5.072 * 0.408 + 5.076 * 0.536)).abs() < 1e-9, "{w}");
    }

    #[test]
    fn tx2_iio_ina3221x_counts_only_the_total_rail() {
        let tree = copy_tree("jetson-tx2-iio");
        let mut m = HwmonMeter::open(tree.path(), "VDD_IN").unwrap();
        assert_eq!(m.rails(), ["VDD_IN"]);
        let Reading::Watts(w) = m.read().unwrap() else { panic!() };
        assert!((w - 4.312).abs() < 1e-9, "{w}");
        let all = HwmonMeter::open(tree.path(), "NO_SUCH_RAIL").unwrap();
        assert_eq!(all.rails(), ["VDD_IN", "VDD_GPU", "VDD_SOC", "VDD_CPU", "VDD_DDR", "VDD_WIFI"]);
    }

    #[test]
    fn ina219_reads_its_power_file() {
        let tree = copy_tree("ina219");
        let mut m = HwmonMeter::open(tree.path(), "VDD_IN").unwrap();
        assert_eq!(m.read().unwrap(), Reading::Watts(4.2));
    }

    #[test]
    fn a_disappearing_sysfs_file_fails_then_recovers() {
        let tree = copy_tree("jetson-ina3221");
        let mut m = HwmonMeter::open(tree.path(), "VDD_IN").unwrap();
        let f = tree.path().join("class/hwmon/hwmon1/curr1_input");
        let saved = fs::read(&f).unwrap();
        fs::remove_file(&f).unwrap();
        let err = m.read().unwrap_err();
        assert!(matches!(err, EnergyError::Read { .. }), "{err}");
        fs::write(&f, saved).unwrap();
        assert!(m.read().is_ok());
    }

    #[test]
    fn battery_power_only_while_discharging() {
        let tree = copy_tree("battery");
        let mut m = BatteryMeter::open(tree.path()).unwrap();
        // 1.5 A x 7.6 V.
        let Reading::Watts(w) = m.read().unwrap() else { panic!() };
        assert!((w - 11.4).abs() < 1e-9, "{w}");
        fs::write(tree.path().join("class/power_supply/BAT0/status"), "Charging\n").unwrap();
        assert!(matches!(m.read(), Err(EnergyError::NotDischarging(_))));
    }

    #[test]
    fn pmic_output_pairs_currents_with_voltages() {
        let text = fs::read_to_string(fixtures().join("../rpi5/pmic_read_adc.txt")).unwrap();
        let (w, rails) = parse_pmic_adc(&text).unwrap();
        assert_eq!(rails, 12);
        assert!(w > 1.0 && w < 10.0, "{w}");
        assert!(parse_pmic_adc("nothing here").is_err());
        assert!(parse_pmic_adc(" VDD_CORE_A current(7)=abcA").is_err());
    }

    #[test]
    fn pmic_runs_the_program_at_most_once_per_interval() {
        let script = fixtures().join("../rpi5/vcgencmd");
        let mut m = PmicMeter::new(script, Duration::from_secs(3600));
        let a = m.read().unwrap();
        let b = m.read().unwrap();
        assert_eq!(a, b);
        assert_eq!(m.runs, 1);
        let mut broken = PmicMeter::new("/no/such/vcgencmd".into(), Duration::from_secs(1));
        assert!(matches!(broken.read(), Err(EnergyError::Command { .. })));
    }

    #[test]
    fn auto_detection_prefers_rapl_then_hwmon_then_battery() {
        let mut s = TelemetrySettings::default();
        for (tree, kind) in [("x86-rapl", "rapl"), ("jetson-ina3221", "hwmon"), ("battery", "power_supply")] {
            s.sysfs_root = fixtures().join(tree);
            let m = EnergyMeter::open(&s).unwrap().unwrap();
            assert_eq!(m.kind(), kind, "{tree}");
        }
        s.sysfs_root = fixtures().join("rpi5");
        // The Pi 5 tree has only a device-tree model file: auto picks the PMIC.
        assert_eq!(EnergyMeter::open(&s).unwrap().unwrap().kind(), "rpi5_pmic");
        s.sysfs_root = "/no/such/sysfs".into();
        assert!(matches!(EnergyMeter::open(&s), Err(EnergyError::NotFound(_))));
        s.energy = EnergySourceKind::None;
        assert!(EnergyMeter::open(&s).unwrap().is_none());
    }

    #[test]
    fn this_machines_own_meter_reads_when_present() {
        let s = TelemetrySettings::default();
        match EnergyMeter::open(&s) {
            Ok(Some(mut m)) => match m.read() {
                Ok(Reading::Joules(j)) => assert!(j >= 0.0),
                Ok(Reading::Watts(w)) => assert!(w.is_finite() && w >= 0.0),
                Err(EnergyError::NotDischarging(_)) => {}
                Err(e) => panic!("{} meter present but unreadable: {e}", m.kind()),
            },
            Ok(None) => panic!("auto never yields none"),
            Err(e) => assert!(matches!(e, EnergyError::NotFound(_) | EnergyError::RootOnly { .. }), "{e}"),
        }
    }

    #[test]
    fn the_ledger_integrates_power_and_counters_and_skips_gaps() {
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let mut l = EnergyLedger::new(Duration::from_secs(3600));
        l.push(s(0.0), Reading::Watts(10.0));
        l.push(s(1.0), Reading::Watts(10.0));
        l.push(s(2.0), Reading::Watts(20.0));
        // 10 J in [0,1], 15 J in [1,2].
        let e = l.between(s(0.0), s(2.0)).unwrap();
        assert!((e.joules - 25.0).abs() < 1e-9 && (e.covered_secs - 2.0).abs() < 1e-9, "{e:?}");
        let half = l.between(s(0.5), s(1.5)).unwrap();
        assert!((half.joules - 12.5).abs() < 1e-9, "{half:?}");
        l.gap();
        l.push(s(10.0), Reading::Watts(20.0));
        l.push(s(11.0), Reading::Watts(20.0));
        let e = l.between(s(0.0), s(11.0)).unwrap();
        assert!((e.joules - 45.0).abs() < 1e-9 && (e.covered_secs - 3.0).abs() < 1e-9, "{e:?}");
        assert!(matches!(l.between(s(3.0), s(9.0)), Err(EnergyError::SpanNotCovered { .. })));

        let mut c = EnergyLedger::new(Duration::from_secs(3600));
        assert_eq!(c.push(s(0.0), Reading::Joules(0.0)), None);
        assert_eq!(c.push(s(2.0), Reading::Joules(30.0)), Some(15.0));
        assert!((c.between(s(0.0), s(2.0)).unwrap().joules - 30.0).abs() < 1e-9);
        assert!((c.total_joules() - 30.0).abs() < 1e-9);
    }

    #[test]
    fn the_ledger_forgets_beyond_its_history() {
        let t0 = Instant::now();
        let mut l = EnergyLedger::new(Duration::from_secs(10));
        for i in 0..100 {
            l.push(t0 + Duration::from_secs(i), Reading::Watts(1.0));
        }
        assert!(l.points.len() <= 11);
        assert!(l.between(t0, t0 + Duration::from_secs(50)).is_err());
    }
}

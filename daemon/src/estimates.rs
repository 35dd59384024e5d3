//! Expected latency, cost and energy of each action class (local, cloud with k modalities), as
//! the budget mask and the v2 observation use them: a small model of the cost table that starts
//! from the device profile's table and follows what the device measures now.
//!
//! - **Local** (class 0): latency = `idle_latency x load_factor(current load)`, with
//!   `load_factor = (1 + busy) / freq_ratio` (`busy` the CPU busy fraction of the whole board
//!   before the answer starts, `freq_ratio` the current over the maximum CPU frequency, 1 when
//!   unknown): a second process saturating the cores halves the engine's share, a throttled
//!   clock slows it in proportion. `idle_latency` is a moving average of measured local
//!   latencies each divided by the load factor at its start; it starts at the profile's figure
//!   (the profile describes an idle board). Cost and energy: moving averages of the outcomes.
//! - **Cloud with k attachments** (class 1 + k): latency = `link(k) + backend(k) + residual`,
//!   `link(k) = rtt + request_bytes(k) / upload_throughput`,
//!   `request_bytes(k) = base_bytes + k x attachment_bytes`.
//!   - `rtt`: median of the last [`LINK_WINDOW`] small deliveries (PUBACK seconds of a publish of
//!     at most [`SMALL_DELIVERY_BYTES`], such as the idle probe or a text-only request, less its
//!     bytes at the current throughput);
//!   - seconds per uploaded byte: median over the last [`LINK_WINDOW`] large deliveries of
//!     `(puback_secs - rtt) / bytes`, clamped to 1 kB/s ..= 1 GB/s. Medians follow a change of
//!     the link within three samples and ignore a single stall;
//!   - `base_bytes`, `attachment_bytes`: moving averages of the sizes of requests sent
//!     (text-only requests for the base, `(bytes - base) / k` for the others);
//!   - `backend(k)`: moving average of the backend seconds the bridge reports (a class the
//!     bridge has not answered yet moves by as much as the class that was answered);
//!   - `residual`: one moving average, over every cloud class, of the measured turn latency less
//!     its prediction (the bridge's own time, the reply's way back, time-outs and fallbacks).
//!   - usage: moving average of the price the bridge charged per class; energy: of the outcomes.
//!
//!   Before any link measurement the link is assumed to be [`PRIOR_RTT_SECS`] and
//!   [`PRIOR_UPLOAD_BYTES_PER_SEC`] (scaled down if that would exceed half a profile latency),
//!   and `backend(k)` starts at the profile's latency less that link, so the table starts equal
//!   to the profile's (computed as `profile(k) + (link(k) - link0(k)) + (backend(k) - backend0(k))
//!   + residual` so that it is the same bits). Non-finite or negative measurements are ignored.

use device_profiles::{ActionCost, CostTable, DeviceProfile, ModalityKind};
use serde::Serialize;

/// Weight of a new measurement in the moving averages.
const SMOOTHING: f64 = 0.2;
/// Deliveries each link median looks back over.
pub const LINK_WINDOW: usize = 5;
/// A delivery of at most this many bytes measures the round trip, a larger one the throughput.
pub const SMALL_DELIVERY_BYTES: usize = 8 * 1024;
/// The link assumed before any measurement: round trip...
pub const PRIOR_RTT_SECS: f64 = 0.05;
/// ...and upload throughput.
pub const PRIOR_UPLOAD_BYTES_PER_SEC: f64 = 1_000_000.0;
/// A request's size without attachments (text and dialogue history) before any is measured.
pub const DEFAULT_BASE_REQUEST_BYTES: f64 = 2_000.0;
/// One attachment's size before any is measured (a 640x480 JPEG at quality 80).
pub const DEFAULT_ATTACHMENT_BYTES: f64 = 60_000.0;
/// Throughput clamps, bytes per second.
const MIN_THROUGHPUT: f64 = 1_000.0;
const MAX_THROUGHPUT: f64 = 1e9;
/// Longest PUBACK time taken as a measurement (beyond it the sample is ignored).
const MAX_DELIVERY_SECS: f64 = 300.0;
/// Slowest CPU clock taken into account, as a fraction of the maximum.
const MIN_FREQ_RATIO: f64 = 0.05;

/// One action class's expectation and how many measurements moved it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ClassEstimate {
    pub latency_secs: f64,
    pub cost_usd: f64,
    pub energy_j: f64,
    /// Outcomes and bridge reports measured so far for this class (0: the profile's figures,
    /// moved only by the link and the load).
    pub measured: u64,
}

/// The board's load as the local answer time depends on it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Load {
    /// CPU busy fraction over all cores, 0 ..= 1.
    pub busy: f64,
    /// Current over maximum CPU frequency, 0 < r <= 1 (1 when unknown).
    pub freq_ratio: f64,
}

impl Load {
    /// An idle board at full clock: the profile's conditions.
    pub const IDLE: Load = Load { busy: 0.0, freq_ratio: 1.0 };

    /// From a telemetry sample (which reports no clock frequency: the ratio is 1).
    pub fn from_telemetry(snapshot: &sensing::TelemetrySnapshot) -> Self {
        Load { busy: f64::from(snapshot.cpu_total_percent) / 100.0, freq_ratio: 1.0 }
    }

    /// `(1 + busy) / freq_ratio`, or `None` when a field is not a number.
    pub fn factor(&self) -> Option<f64> {
        if !self.busy.is_finite() || !self.freq_ratio.is_finite() || self.freq_ratio <= 0.0 {
            return None;
        }
        Some((1.0 + self.busy.clamp(0.0, 1.0)) / self.freq_ratio.clamp(MIN_FREQ_RATIO, 1.0))
    }
}

/// A small ring of the last [`LINK_WINDOW`] samples.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    samples: [(f64, f64); LINK_WINDOW],
    len: usize,
    next: usize,
    total: u64,
}

impl Window {
    fn push(&mut self, bytes: f64, secs: f64) {
        self.samples[self.next] = (bytes, secs);
        self.next = (self.next + 1) % LINK_WINDOW;
        self.len = (self.len + 1).min(LINK_WINDOW);
        self.total += 1;
    }

    /// The median of `f` over the samples (mean of the middle two for an even count).
    fn median(&self, f: impl Fn(f64, f64) -> f64) -> Option<f64> {
        let mut values = [0.0; LINK_WINDOW];
        for (v, &(bytes, secs)) in values.iter_mut().zip(&self.samples[..self.len]) {
            *v = f(bytes, secs);
        }
        let values = &mut values[..self.len];
        values.sort_by(f64::total_cmp);
        match self.len {
            0 => None,
            n if n % 2 == 1 => Some(values[n / 2]),
            n => Some(0.5 * (values[n / 2 - 1] + values[n / 2])),
        }
    }
}

/// The link to the broker as PUBACK times show it.
#[derive(Debug, Clone, Copy)]
struct Link {
    rtt_secs: f64,
    secs_per_byte: f64,
    small: Window,
    large: Window,
}

impl Link {
    fn secs(&self, bytes: f64) -> f64 {
        self.rtt_secs + bytes * self.secs_per_byte
    }

    fn record(&mut self, bytes: usize, secs: f64) {
        let bytes = bytes as f64;
        if bytes <= SMALL_DELIVERY_BYTES as f64 {
            self.small.push(bytes, secs);
        } else {
            self.large.push(bytes, secs);
        }
        // Each median uses the other's estimate: twice round, so that a change of both shows
        // in both at once.
        for _ in 0..2 {
            let per_byte = self.secs_per_byte;
            if let Some(rtt) = self.small.median(|b, t| t - b * per_byte) {
                self.rtt_secs = rtt.max(0.0);
            }
            let rtt = self.rtt_secs;
            if let Some(per_byte) = self.large.median(|b, t| (t - rtt) / b) {
                self.secs_per_byte = per_byte.clamp(1.0 / MAX_THROUGHPUT, 1.0 / MIN_THROUGHPUT);
            }
        }
    }
}

/// Sizes of the requests sent.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct RequestSize {
    /// Bytes of a request without attachments.
    pub base_bytes: f64,
    /// Bytes each attachment adds.
    pub attachment_bytes: f64,
}

impl RequestSize {
    fn bytes(&self, attachments: usize) -> f64 {
        self.base_bytes + attachments as f64 * self.attachment_bytes
    }
}

/// What one cloud class has learned from the bridge.
#[derive(Debug, Clone, Copy)]
struct CloudClass {
    profile_latency_secs: f64,
    backend_prior_secs: f64,
    backend_secs: f64,
    price_usd: f64,
    energy_j: f64,
    /// Bridge reports whose turn outcome has not been recorded yet: that outcome's cost is the
    /// reported price, already counted.
    replies_pending: u32,
}

/// The link and the local board, as `/v1/status` and the logs show them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EstimatesSnapshot {
    /// Every class: local, then cloud with 0..=X attachments.
    pub classes: Vec<ClassEstimate>,
    /// The round trip to the broker, seconds.
    pub rtt_secs: f64,
    /// The upload throughput to the broker, bytes per second.
    pub upload_bytes_per_sec: f64,
    /// Deliveries measured: small (round trip) and large (throughput).
    pub rtt_samples: u64,
    pub upload_samples: u64,
    /// Request sizes.
    pub request: RequestSize,
    /// Backend seconds per cloud class, as the bridge reports them.
    pub backend_secs: Vec<f64>,
    /// Measured cloud latency beyond the model, seconds.
    pub cloud_residual_secs: f64,
    /// The local answer time on an idle board.
    pub local_idle_latency_secs: f64,
    /// The board's load now, and its factor on the local answer time.
    pub load: Load,
    pub load_factor: f64,
}

/// The cost model of every class; index 0 is local, `1 + k` the cloud with k modalities.
#[derive(Debug, Clone)]
pub struct CostEstimates {
    local_idle_latency_secs: f64,
    local_cost_usd: f64,
    local_energy_j: f64,
    load_factor: f64,
    load: Load,
    link: Link,
    link_prior: (f64, f64),
    request: RequestSize,
    request_prior: RequestSize,
    cloud: Vec<CloudClass>,
    residual_secs: f64,
    classes: Vec<ClassEstimate>,
    table: CostTable,
}

fn valid(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

fn blend(old: &mut f64, new: f64) {
    if valid(new) {
        *old += SMOOTHING * (new - *old);
    }
}

impl CostEstimates {
    /// Starts from the profile's table, with [`DEFAULT_ATTACHMENT_BYTES`] per attachment.
    #[cfg(test)]
    pub fn from_profile(costs: &CostTable) -> Self {
        Self::new(costs, DEFAULT_ATTACHMENT_BYTES)
    }

    /// Starts from the profile's table, with attachment sizes from its capture settings: half
    /// the JPEG cap for a camera view, a 16-bit mono WAV of 5 s for the audio clip (averaged).
    pub fn from_device_profile(profile: &DeviceProfile) -> Self {
        let sizes = profile.modalities.iter().map(|m| match m.kind {
            ModalityKind::Camera => profile.sensing.camera.jpeg_max_bytes as f64 / 2.0,
            ModalityKind::Audio => profile
                .sensing
                .audio
                .as_ref()
                .map_or(DEFAULT_ATTACHMENT_BYTES, |a| 44.0 + f64::from(a.sample_rate_hz) * 2.0 * 5.0),
        });
        let count = profile.modalities.len();
        let mean = if count == 0 { DEFAULT_ATTACHMENT_BYTES } else { sizes.sum::<f64>() / count as f64 };
        Self::new(&profile.costs, mean)
    }

    fn new(costs: &CostTable, attachment_bytes: f64) -> Self {
        let request = RequestSize { base_bytes: DEFAULT_BASE_REQUEST_BYTES, attachment_bytes };
        let count = costs.cloud.latency_secs.len();
        // The assumed link, scaled so that it takes at most half of any profile latency.
        let (mut rtt, mut per_byte) = (PRIOR_RTT_SECS, 1.0 / PRIOR_UPLOAD_BYTES_PER_SEC);
        let scale = (0..count)
            .map(|k| 0.5 * costs.cloud.latency_secs[k] / (rtt + request.bytes(k) * per_byte))
            .filter(|s| s.is_finite())
            .fold(1.0_f64, f64::min)
            .max(0.0);
        rtt *= scale;
        per_byte = (per_byte * scale).max(1.0 / MAX_THROUGHPUT);
        let link = Link {
            rtt_secs: rtt,
            secs_per_byte: per_byte,
            small: Window::default(),
            large: Window::default(),
        };
        let cloud = (0..count)
            .map(|k| {
                let c = costs.cloud(k);
                let backend = c.latency_secs - link.secs(request.bytes(k));
                CloudClass {
                    profile_latency_secs: c.latency_secs,
                    backend_prior_secs: backend,
                    backend_secs: backend,
                    price_usd: c.cost_usd,
                    energy_j: c.energy_j,
                    replies_pending: 0,
                }
            })
            .collect();
        let mut estimates = Self {
            local_idle_latency_secs: costs.local.latency_secs,
            local_cost_usd: costs.local.cost_usd,
            local_energy_j: costs.local.energy_j,
            load_factor: 1.0,
            load: Load::IDLE,
            link,
            link_prior: (link.rtt_secs, link.secs_per_byte),
            request,
            request_prior: request,
            cloud,
            residual_secs: 0.0,
            classes: vec![
                ClassEstimate { latency_secs: 0.0, cost_usd: 0.0, energy_j: 0.0, measured: 0 };
                count + 1
            ],
            table: costs.clone(),
        };
        estimates.refresh();
        estimates
    }

    /// The class index of an action sending `attached` modalities (`None`: local).
    pub fn class_of(cloud_attached: Option<usize>) -> usize {
        cloud_attached.map_or(0, |k| k + 1)
    }

    /// Folds one turn's measured outcome into its class: for local, [`Self::record_local`] at
    /// the current load; for a cloud class, the latency moves the cloud residual, the cost the
    /// class's price (unless the bridge already reported it for this turn), the energy its
    /// average. Fallbacks count against the cloud class chosen.
    pub fn record(&mut self, class: usize, latency_secs: f64, cost_usd: f64, energy_j: f64) {
        if class == 0 {
            self.record_local(latency_secs, cost_usd, energy_j, self.load);
            return;
        }
        let Some(predicted) = self.classes.get(class).map(|c| c.latency_secs) else { return };
        let c = &mut self.cloud[class - 1];
        if valid(latency_secs) {
            self.residual_secs += SMOOTHING * (latency_secs - predicted);
        }
        if c.replies_pending > 0 {
            c.replies_pending -= 1;
        } else {
            blend(&mut c.price_usd, cost_usd);
        }
        blend(&mut c.energy_j, energy_j);
        self.classes[class].measured += 1;
        self.refresh();
    }

    /// A local answer: its latency, cost and energy, and the board's load when it started.
    pub fn record_local(&mut self, latency_secs: f64, cost_usd: f64, energy_j: f64, load: Load) {
        let factor = load.factor().unwrap_or(self.load_factor);
        blend(&mut self.local_idle_latency_secs, latency_secs / factor);
        blend(&mut self.local_cost_usd, cost_usd);
        blend(&mut self.local_energy_j, energy_j);
        self.classes[0].measured += 1;
        self.refresh();
    }

    /// The board's load now (from the latest telemetry): the local estimate follows it.
    pub fn set_current_load(&mut self, load: Load) {
        if let Some(factor) = load.factor() {
            self.load = load;
            self.load_factor = factor;
            self.refresh();
        }
    }

    /// A publish of `bytes` acknowledged by the broker `puback_secs` after it was sent (a cloud
    /// request, an outcome batch or the idle probe).
    pub fn record_delivery(&mut self, bytes: usize, puback_secs: f64) {
        if bytes == 0 || !valid(puback_secs) || puback_secs > MAX_DELIVERY_SECS {
            return;
        }
        self.link.record(bytes, puback_secs);
        self.refresh();
    }

    /// The bridge's reply to a request of `request_bytes` with `attachments` modalities: the time
    /// its backend took and the price it charged.
    pub fn record_cloud_reply(
        &mut self,
        attachments: usize,
        request_bytes: usize,
        backend_secs: f64,
        price_usd: f64,
    ) {
        let Some(c) = self.cloud.get_mut(attachments) else { return };
        let before = c.backend_secs;
        blend(&mut c.backend_secs, backend_secs);
        let moved = c.backend_secs - before;
        if valid(price_usd) {
            blend(&mut c.price_usd, price_usd);
            c.replies_pending = c.replies_pending.saturating_add(1);
        }
        // A class the bridge has not answered yet moves with the measured ones (keeping the
        // profile's differences between classes): the backend is the same model whatever is
        // attached, and a class never chosen must not keep the profile's figure forever.
        for (k, other) in self.cloud.iter_mut().enumerate() {
            if k != attachments && self.classes[k + 1].measured == 0 {
                other.backend_secs += moved;
            }
        }
        let bytes = request_bytes as f64;
        if request_bytes > 0 {
            if attachments == 0 {
                blend(&mut self.request.base_bytes, bytes);
            } else {
                let per = (bytes - self.request.base_bytes) / attachments as f64;
                blend(&mut self.request.attachment_bytes, per.max(0.0));
            }
        }
        self.classes[attachments + 1].measured += 1;
        self.refresh();
    }

    /// Recomputes the classes and the table from the model.
    fn refresh(&mut self) {
        let local = &mut self.classes[0];
        local.latency_secs = self.local_idle_latency_secs * self.load_factor;
        local.cost_usd = self.local_cost_usd;
        local.energy_j = self.local_energy_j;
        let (rtt0, per_byte0) = self.link_prior;
        for (k, c) in self.cloud.iter().enumerate() {
            let link = self.link.secs(self.request.bytes(k));
            let link0 = rtt0 + self.request_prior.bytes(k) * per_byte0;
            let latency = c.profile_latency_secs
                + (link - link0)
                + (c.backend_secs - c.backend_prior_secs)
                + self.residual_secs;
            let class = &mut self.classes[k + 1];
            class.latency_secs = latency.max(link);
            class.cost_usd = c.price_usd;
            class.energy_j = c.energy_j;
        }
        let l = self.classes[0];
        self.table.local =
            ActionCost { latency_secs: l.latency_secs, cost_usd: l.cost_usd, energy_j: l.energy_j };
        for (k, c) in self.classes[1..].iter().enumerate() {
            self.table.cloud.latency_secs[k] = c.latency_secs;
            self.table.cloud.cost_usd[k] = c.cost_usd;
            self.table.cloud.energy_j[k] = c.energy_j;
        }
    }

    /// A class's current expectation.
    pub fn cost(&self, class: usize) -> ActionCost {
        let c = self.classes[class.min(self.classes.len() - 1)];
        ActionCost { latency_secs: c.latency_secs, cost_usd: c.cost_usd, energy_j: c.energy_j }
    }

    /// The table the budget mask reads.
    pub fn table(&self) -> &CostTable {
        &self.table
    }

    /// Every class, for the status report.
    pub fn classes(&self) -> &[ClassEstimate] {
        &self.classes
    }

    /// The model's state, for `/v1/status` and the logs.
    pub fn snapshot(&self) -> EstimatesSnapshot {
        EstimatesSnapshot {
            classes: self.classes.clone(),
            rtt_secs: self.link.rtt_secs,
            upload_bytes_per_sec: 1.0 / self.link.secs_per_byte,
            rtt_samples: self.link.small.total,
            upload_samples: self.link.large.total,
            request: self.request,
            backend_secs: self.cloud.iter().map(|c| c.backend_secs).collect(),
            cloud_residual_secs: self.residual_secs,
            local_idle_latency_secs: self.local_idle_latency_secs,
            load: self.load,
            load_factor: self.load_factor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> DeviceProfile {
        DeviceProfile::builtin("x86-dev").expect("profile")
    }

    fn latencies(e: &CostEstimates) -> Vec<f64> {
        e.classes().iter().map(|c| c.latency_secs).collect()
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// A probe (200 B) and a request with two attachments (122,000 B) over a link of `rtt` and
    /// `throughput`.
    fn deliver(e: &mut CostEstimates, rtt: f64, throughput: f64) {
        e.record_delivery(200, rtt + 200.0 / throughput);
        e.record_delivery(122_000, rtt + 122_000.0 / throughput);
    }

    #[test]
    fn measurements_move_the_mask_table() {
        let profile = profile();
        let mut estimates = CostEstimates::from_profile(&profile.costs);
        assert_eq!(estimates.table(), &profile.costs);
        let before = estimates.cost(0).latency_secs;
        for _ in 0..30 {
            estimates.record(0, 0.5, 1e-6, 10.0);
        }
        let after = estimates.table().local;
        assert!((after.latency_secs - 0.5).abs() < 0.01 && before > 1.0, "{after:?}");
        assert_eq!(estimates.classes()[0].measured, 30);
        estimates.record(2, f64::NAN, 0.004, 50.0);
        assert_eq!(estimates.table().cloud.latency_secs[1], profile.costs.cloud.latency_secs[1]);
        assert!(estimates.table().cloud.cost_usd[1] < profile.costs.cloud.cost_usd[1]);
    }

    #[test]
    fn starts_at_the_profile() {
        let profile = profile();
        for e in [CostEstimates::from_profile(&profile.costs), CostEstimates::from_device_profile(&profile)] {
            assert_eq!(e.table(), &profile.costs);
        }
        // Three 640x480 views at half the 150,000-byte JPEG cap.
        let snapshot = CostEstimates::from_device_profile(&profile).snapshot();
        assert_eq!(snapshot.request.attachment_bytes, 75_000.0);
        assert_eq!((snapshot.rtt_secs, snapshot.upload_bytes_per_sec), (0.05, 1_000_000.0));
        assert!(serde_json::to_string(&snapshot).expect("json").contains("\"rtt_secs\":0.05"));
    }

    #[test]
    fn a_degraded_link_raises_the_attachment_classes_most() {
        let profile = profile();
        let mut e = CostEstimates::from_profile(&profile.costs);
        for _ in 0..3 {
            deliver(&mut e, 0.3, 100_000.0);
        }
        let s = e.snapshot();
        assert!(close(s.rtt_secs, 0.3, 1e-3) && close(s.upload_bytes_per_sec, 100_000.0, 100.0), "{s:?}");
        // link(k) - link0(k) = (0.3 + (2,000 + 60,000 k) / 1e5) - (0.05 + (2,000 + 60,000 k) / 1e6)
        let rise: Vec<f64> = latencies(&e)
            .iter()
            .zip(&latencies(&CostEstimates::from_profile(&profile.costs)))
            .map(|(a, b)| a - b)
            .collect();
        let want = [0.0, 0.268, 0.808, 1.348, 1.888];
        for (got, want) in rise.iter().zip(want) {
            assert!(close(*got, want, 2e-3), "{rise:?}");
        }
    }

    #[test]
    fn the_link_estimate_follows_a_change_and_its_recovery() {
        let mut e = CostEstimates::from_profile(&profile().costs);
        let good = |e: &CostEstimates| {
            let s = e.snapshot();
            close(s.rtt_secs, 0.02, 1e-3) && close(s.upload_bytes_per_sec, 1e6, 1e4)
        };
        for _ in 0..5 {
            deliver(&mut e, 0.02, 1e6);
        }
        assert!(good(&e), "{:?}", e.snapshot());
        let fine = latencies(&e);
        // A single stall is not a change of the link.
        e.record_delivery(200, 5.0);
        assert!(good(&e), "{:?}", e.snapshot());
        for _ in 0..5 {
            deliver(&mut e, 0.02, 1e6);
        }
        for _ in 0..3 {
            deliver(&mut e, 0.5, 50_000.0);
        }
        let s = e.snapshot();
        assert!(close(s.rtt_secs, 0.5, 2e-3) && close(s.upload_bytes_per_sec, 50_000.0, 500.0), "{s:?}");
        assert!(latencies(&e)[4] > fine[4] + 3.0);
        for _ in 0..3 {
            deliver(&mut e, 0.02, 1e6);
        }
        assert!(good(&e), "{:?}", e.snapshot());
        for (a, b) in latencies(&e).iter().zip(&fine) {
            assert!(close(*a, *b, 0.01), "{:?} against {fine:?}", latencies(&e));
        }
    }

    #[test]
    fn the_idle_probe_alone_moves_the_round_trip() {
        let profile = profile();
        let mut e = CostEstimates::from_profile(&profile.costs);
        for _ in 0..3 {
            e.record_delivery(200, 0.25);
        }
        let s = e.snapshot();
        assert!(close(s.rtt_secs, 0.2498, 1e-9) && s.upload_bytes_per_sec == 1e6, "{s:?}");
        for (k, l) in latencies(&e)[1..].iter().enumerate() {
            assert!(close(l - profile.costs.cloud.latency_secs[k], 0.1998, 1e-9), "{k}: {l}");
        }
        assert_eq!((s.rtt_samples, s.upload_samples), (3, 0));
    }

    #[test]
    fn bad_values_never_reach_the_table() {
        let profile = profile();
        let mut e = CostEstimates::from_profile(&profile.costs);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0] {
            e.record_delivery(200, bad);
            e.record_delivery(100_000, bad);
            e.record_cloud_reply(2, 122_000, bad, bad);
            e.record_local(bad, bad, bad, Load::IDLE);
            e.record_local(1.0, 1e-6, 1.0, Load { busy: bad, freq_ratio: bad });
            e.set_current_load(Load { busy: bad, freq_ratio: bad });
            e.set_current_load(Load { busy: 0.0, freq_ratio: bad });
            for class in 0..7 {
                e.record(class, bad, bad, bad);
            }
        }
        e.record_delivery(0, 0.1);
        e.record_cloud_reply(9, 100_000, 1.0, 0.01);
        e.record_cloud_reply(1, 0, f64::NAN, f64::NAN);
        // The four valid local answers of 1 s at an unknown load count at the current (idle) one.
        let mut want = CostEstimates::from_profile(&profile.costs);
        for _ in 0..4 {
            want.record_local(1.0, 1e-6, 1.0, Load::IDLE);
        }
        assert_eq!(e.table(), want.table());
        assert!(e.table().cloud.latency_secs.iter().chain(&e.table().cloud.cost_usd).all(|x| x.is_finite()));
        assert_eq!(e.table().cloud, profile.costs.cloud);
    }

    #[test]
    fn a_busy_or_throttled_board_raises_the_local_estimate() {
        let mut e = CostEstimates::from_profile(&profile().costs);
        e.set_current_load(Load { busy: 1.0, freq_ratio: 1.0 });
        assert_eq!(e.cost(0).latency_secs, 3.0);
        e.set_current_load(Load { busy: 0.5, freq_ratio: 0.5 });
        assert_eq!(e.cost(0).latency_secs, 4.5);
        // 2 s measured on a fully busy board is 1 s idle: 1.5 + 0.2 (1 - 1.5) = 1.4 idle.
        e.record_local(2.0, 1e-6, 10.0, Load { busy: 1.0, freq_ratio: 1.0 });
        assert!(close(e.snapshot().local_idle_latency_secs, 1.4, 1e-12));
        assert!(close(e.cost(0).latency_secs, 4.2, 1e-12));
        e.set_current_load(Load::IDLE);
        assert!(close(e.cost(0).latency_secs, 1.4, 1e-12));
    }

    /// Classes the bridge has not answered move with the answered one, keeping the profile's
    /// differences; once answered, a class follows its own reports.
    #[test]
    fn unanswered_classes_follow_the_answered_backend() {
        let mut e = CostEstimates::from_profile(&profile().costs);
        let before = latencies(&e);
        for _ in 0..40 {
            e.record_cloud_reply(1, 62_000, 1.0, 0.0001);
        }
        let after = latencies(&e);
        let moved = after[2] - before[2];
        assert!(moved < -3.0, "{before:?} -> {after:?}");
        for k in [1, 3, 4] {
            assert!((after[k] - before[k] - moved).abs() < 1e-9, "class {k}: {before:?} -> {after:?}");
        }
        for _ in 0..40 {
            e.record_cloud_reply(0, 2_000, 0.5, 0.0001);
        }
        let text_only = latencies(&e);
        assert!(text_only[1] < after[1] - 0.4, "{after:?} -> {text_only:?}");
        assert!((text_only[2] - after[2]).abs() < 1e-9, "an answered class keeps its own: {text_only:?}");
    }

    #[test]
    fn the_bridge_reports_move_backend_price_and_sizes() {
        let profile = profile();
        let mut e = CostEstimates::from_profile(&profile.costs);
        e.record_cloud_reply(0, 3_000, 1.0, 0.001);
        // backend0 = 6.4603 - (0.05 + 2,000 / 1e6) = 6.4083, blended towards 1 s: 5.32664; base
        // bytes 2,200: link 0.0522; latency 6.4603 + 0.0002 - 1.08166 = 5.37884.
        let s = e.snapshot();
        assert!(close(s.backend_secs[0], 5.32664, 1e-9) && s.request.base_bytes == 2_200.0, "{s:?}");
        assert!(close(e.cost(1).latency_secs, 5.37884, 1e-9));
        assert!(close(e.cost(1).cost_usd, 0.000592, 1e-12));
        // The turn's outcome does not count the reported price twice; the next turn's does.
        e.record(1, 5.37884, 0.5, 1.0);
        assert!(close(e.cost(1).cost_usd, 0.000592, 1e-12));
        e.record(1, 5.37884, 0.5, 1.0);
        assert!(e.cost(1).cost_usd > 0.1);
        // Attachments: (122,200 - 2,200) / 2 = 60,000 per attachment, no change.
        e.record_cloud_reply(2, 122_200, 6.0, 0.009);
        assert_eq!(e.snapshot().request.attachment_bytes, 60_000.0);
        // A measured latency 10 s above the prediction moves the residual by 2 s for every
        // cloud class (fallbacks count against the class chosen).
        let before = latencies(&e);
        e.record(3, before[3] + 10.0, 0.009, 1.0);
        for (k, (after, before)) in latencies(&e).iter().zip(&before).enumerate().skip(1) {
            assert!(close(after - before, 2.0, 1e-9), "{k}");
        }
        assert_eq!(e.classes()[3].measured, 2);
    }
}

//! The conditions a v2 policy is trained across: cost tables and budgets.
//!
//! The paper's tables (its `tmo/devices.py`): cloud seconds for 0..3 images on four networks,
//! the same usage prices on every network, and its boards' local call from peak GFLOPS and watts.
//! Training draws a pool of conditions: the profile's own table, every paper board on every
//! paper network, and perturbations around them (slower or faster links, an uplink that charges
//! each attachment, faster or slower boards, other prices), each with the profile's budgets or
//! budgets drawn in a wide range, so that one policy holds on links and boards it never saw.

use device_profiles::{CostTable, DeviceProfile};
use rand::Rng;
use serde::Serialize;

use crate::schema::{ClassCosts, Schema};

/// One of the paper's networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    Wired,
    Wifi,
    FiveG,
    FourG,
}

impl Network {
    pub const ALL: [Network; 4] = [Network::Wired, Network::Wifi, Network::FiveG, Network::FourG];

    /// Cloud seconds with 0, 1, 2, 3 images (the paper's table).
    pub fn cloud_latency_secs(self) -> [f64; 4] {
        match self {
            Network::Wired => [6.46030, 4.76134, 6.24569, 6.98211],
            Network::Wifi => [0.5, 1.898, 2.016, 2.238],
            Network::FiveG => [0.5, 6.037, 6.412, 7.118],
            Network::FourG => [0.5, 16.603, 17.636, 19.573],
        }
    }

    /// `wired`, `wifi`, `5g`, `4g`.
    pub fn name(self) -> &'static str {
        match self {
            Network::Wired => "wired",
            Network::Wifi => "wifi",
            Network::FiveG => "5g",
            Network::FourG => "4g",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.name().eq_ignore_ascii_case(name))
    }

    /// `table` with this network's cloud latencies and the paper's prices (its local class
    /// kept). Cloud calls with more than 3 attachments extrapolate the last step.
    pub fn apply(self, table: &CostTable) -> CostTable {
        let mut out = table.clone();
        let latency = self.cloud_latency_secs();
        for k in 0..out.cloud.latency_secs.len() {
            out.cloud.latency_secs[k] = extrapolate(&latency, k);
            out.cloud.cost_usd[k] = extrapolate(&CLOUD_USAGE_USD, k);
        }
        out
    }
}

/// The paper's usage price of a cloud call with 0, 1, 2, 3 images, on every network.
pub const CLOUD_USAGE_USD: [f64; 4] = [0.00049, 0.00500, 0.00945, 0.01368];

fn extrapolate(values: &[f64; 4], k: usize) -> f64 {
    match values.get(k) {
        Some(v) => *v,
        None => values[3] + (k - 3) as f64 * (values[3] - values[2]),
    }
}

/// One of the paper's boards: peak GFLOPS and watts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Board {
    pub name: &'static str,
    pub peak_gflops: f64,
    pub watts: f64,
}

/// The paper's boards.
pub const BOARDS: [Board; 7] = [
    Board { name: "raspberry-pi-4b", peak_gflops: 13.5, watts: 8.0 },
    Board { name: "raspberry-pi-5", peak_gflops: 31.4, watts: 12.0 },
    Board { name: "jetson-nano", peak_gflops: 472.0, watts: 10.0 },
    Board { name: "jetson-tx2", peak_gflops: 1330.0, watts: 15.0 },
    Board { name: "jetson-xavier-nx", peak_gflops: 21e3, watts: 20.0 },
    Board { name: "jetson-orin-nx", peak_gflops: 100e3, watts: 25.0 },
    Board { name: "jetson-agx-orin", peak_gflops: 275e3, watts: 60.0 },
];

impl Board {
    /// The paper's local call: seconds, then USD.
    pub fn local_call(self) -> (f64, f64) {
        let secs = (2.0 * 3.8e9 / 1024.0 * 2048.0) / (self.peak_gflops * 1e9);
        (secs, self.watts * secs * 0.1668 / 3.6e6)
    }
}

/// The class table of `board` on `network` for `schema`'s modality count.
pub fn paper_classes(board: Board, network: Network, schema: &Schema) -> ClassCosts {
    let (local_secs, local_usd) = board.local_call();
    let mut latency_secs = vec![local_secs];
    let mut usage_usd = vec![local_usd];
    for k in 0..=schema.modalities() {
        latency_secs.push(extrapolate(&network.cloud_latency_secs(), k));
        usage_usd.push(extrapolate(&CLOUD_USAGE_USD, k));
    }
    ClassCosts { latency_secs, usage_usd }
}

/// A cost table and the budgets a dialogue starts with under it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Condition {
    pub name: String,
    pub classes: ClassCosts,
    pub budget_latency_secs: f64,
    pub budget_usage_usd: f64,
}

/// How the pool of training conditions is drawn.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConditionConfig {
    /// Conditions in the pool (at least the profile's and the 28 paper tables).
    pub pool: usize,
    /// Share of rolled-out dialogues played under one of the unperturbed conditions (the
    /// profile's, `extra`, the paper's tables); the rest draw from the whole pool.
    pub base_share: f64,

    /// Probability that a drawn condition keeps the profile's budgets; else they are drawn as
    /// the journal version of the paper's code draws them (`tmo/env.py`, its default "normal"
    /// distribution): for each budget a normal around the middle of [Z x the cheapest class,
    /// Z x the dearest class] with a sixth of that span as deviation, clipped to it.
    pub profile_budgets: f64,
    /// Multiplicative spread (natural log) of the link's cloud seconds, the board's local call
    /// and the prices around the paper's tables.
    pub link_spread: f64,
    pub board_spread: f64,
    pub price_spread: f64,
    /// Probability of a slow uplink: each attachment adds up to `max_upload_secs_per_attachment`.
    pub slow_uplink: f64,
    pub max_upload_secs_per_attachment: f64,
    /// Conditions the pool always holds besides the paper's (for example the cost tables that
    /// logged turns carried: `tmoctl policy train --outcomes`).
    pub extra: Vec<Condition>,
}

impl Default for ConditionConfig {
    fn default() -> Self {
        ConditionConfig {
            pool: 400,
            base_share: 0.5,
            profile_budgets: 0.3,
            link_spread: 0.7,
            board_spread: 1.5,
            price_spread: 1.5,
            slow_uplink: 0.3,
            max_upload_secs_per_attachment: 4.0,
            extra: Vec::new(),
        }
    }
}

impl ConditionConfig {
    /// How many conditions open the pool unperturbed: the profile's, `extra`, the paper's 28.
    pub fn base_conditions(&self) -> usize {
        1 + self.extra.len() + BOARDS.len() * Network::ALL.len()
    }
}

/// The pool: the profile's table, `config.extra`, every paper board on every paper network (with
/// the profile's budgets), then perturbed conditions drawn with `rng` up to `config.pool`.
pub fn pool(
    profile: &DeviceProfile,
    schema: &Schema,
    config: &ConditionConfig,
    rng: &mut impl Rng,
) -> Vec<Condition> {
    let budgets = (profile.budgets.latency_secs, profile.budgets.cost_usd);
    let condition = |name: String, classes: ClassCosts, (l, u): (f64, f64)| Condition {
        name,
        classes,
        budget_latency_secs: l,
        budget_usage_usd: u,
    };
    let mut out =
        vec![condition(profile.board.name.clone(), ClassCosts::from_table(&profile.costs), budgets)];
    out.extend(config.extra.iter().filter(|c| c.classes.len() == schema.cost_classes()).cloned());
    for board in BOARDS {
        for network in Network::ALL {
            let name = format!("{}/{}", board.name, network.name());
            out.push(condition(name, paper_classes(board, network, schema), budgets));
        }
    }
    while out.len() < config.pool {
        let board = BOARDS[rng.random_range(0..BOARDS.len())];
        let network = Network::ALL[rng.random_range(0..Network::ALL.len())];
        let mut classes = paper_classes(board, network, schema);
        let spread = |rng: &mut dyn rand::RngCore, s: f64| exp_series(rng.random_range(-s..=s));
        let board_factor = spread(rng, config.board_spread);
        classes.latency_secs[0] *= board_factor;
        classes.usage_usd[0] *= board_factor * spread(rng, config.price_spread);
        let link = spread(rng, config.link_spread);
        let price = spread(rng, config.price_spread);
        let per_attachment = if rng.random_bool(config.slow_uplink) {
            rng.random_range(0.0..=config.max_upload_secs_per_attachment)
        } else {
            0.0
        };
        for k in 0..=schema.modalities() {
            let c = 1 + k;
            classes.latency_secs[c] =
                classes.latency_secs[c] * link * spread(rng, 0.1) + k as f64 * per_attachment;
            classes.usage_usd[c] *= price * spread(rng, 0.1);
        }
        let budgets = if rng.random_bool(config.profile_budgets) {
            budgets
        } else {
            let z = schema.history() as f64;
            (journal_budget(rng, &classes.latency_secs, z), journal_budget(rng, &classes.usage_usd, z))
        };
        let name = format!("perturbed {}/{} #{}", board.name, network.name(), out.len());
        out.push(condition(name, classes, budgets));
    }
    out
}

/// A budget drawn as the paper's journal code draws it: normal, mean the middle of
/// [z x min, z x max] of the classes, deviation a sixth of that span, clipped to it. The normal
/// is the sum of 12 uniforms less 6 (Irwin-Hall): basic arithmetic only, so the pool is the same
/// bits on every platform (libm's ln and cos may differ in the last bit between C libraries).
fn journal_budget(rng: &mut impl Rng, classes: &[f64], z: f64) -> f64 {
    let lo = z * classes.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = z * classes.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let normal = (0..12).map(|_| rng.random::<f64>()).sum::<f64>() - 6.0;
    (0.5 * (lo + hi) + normal * ((hi - lo) / 6.0).max(1e-8)).clamp(lo, hi)
}

/// e^x by its Taylor series (|x| <= 2 here, 30 terms: well below f64's precision), with basic
/// arithmetic only, for the same reason.
fn exp_series(x: f64) -> f64 {
    let (mut term, mut sum) = (1.0, 1.0);
    for n in 1..30 {
        term *= x / f64::from(n);
        sum += term;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_papers_tx2_on_wired_is_the_tx2_profile() {
        let tx2 = DeviceProfile::builtin("jetson-tx2").unwrap();
        let schema = Schema::default();
        let paper = paper_classes(BOARDS[3], Network::Wired, &schema);
        let profile = ClassCosts::from_table(&tx2.costs);
        for (a, b) in paper.latency_secs.iter().zip(&profile.latency_secs) {
            assert!((a - b).abs() < 1e-4, "{paper:?} vs {profile:?}");
        }
        for (a, b) in paper.usage_usd.iter().zip(&profile.usage_usd) {
            assert!((a - b).abs() < 1e-10, "{paper:?} vs {profile:?}");
        }
        // Network::apply keeps the profile's local class.
        let on_4g = Network::FourG.apply(&tx2.costs);
        assert_eq!(on_4g.local, tx2.costs.local);
        assert_eq!(on_4g.cloud.latency_secs, vec![0.5, 16.603, 17.636, 19.573]);
        assert_eq!(Network::from_name("5G"), Some(Network::FiveG));
    }

    #[test]
    fn the_series_is_exp() {
        for x in [-1.5, -0.7, -0.1, 0.0, 0.3, 1.5] {
            assert!((exp_series(x) - f64::exp(x)).abs() < 1e-14 * f64::exp(x), "{x}");
        }
    }

    #[test]
    fn the_pool_is_deterministic_and_covers_the_papers_tables() {
        let tx2 = DeviceProfile::builtin("jetson-tx2").unwrap();
        let schema = Schema::default();
        let draw = |seed| {
            pool(
                &tx2,
                &schema,
                &ConditionConfig::default(),
                &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            )
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        assert_eq!(a.len(), 400);
        assert_eq!(a[0].classes, ClassCosts::from_table(&tx2.costs));
        assert!(a.iter().any(|c| c.name == "raspberry-pi-4b/4g"));
        for c in &a {
            assert!(
                c.classes.latency_secs.iter().chain(&c.classes.usage_usd).all(|v| v.is_finite() && *v > 0.0)
            );
        }
    }
}

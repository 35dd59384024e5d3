//! Expected latency, cost and energy of each action class (local, cloud with k modalities),
//! as the budget mask uses them: they start from the device profile's table and follow the
//! outcomes the device measures, as exponential moving averages.

use device_profiles::{ActionCost, CostTable};
use serde::Serialize;

/// Weight of a new measurement in the moving average.
const SMOOTHING: f64 = 0.2;

/// One action class's expectation and how many measurements moved it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ClassEstimate {
    pub latency_secs: f64,
    pub cost_usd: f64,
    pub energy_j: f64,
    /// Outcomes measured so far (0: still the profile's figures).
    pub measured: u64,
}

/// The moving averages of every class; index 0 is local, `1 + k` the cloud with k modalities.
#[derive(Debug, Clone)]
pub struct CostEstimates {
    classes: Vec<ClassEstimate>,
    table: CostTable,
}

impl CostEstimates {
    /// Starts from the profile's table.
    pub fn from_profile(costs: &CostTable) -> Self {
        let class = |c: ActionCost| ClassEstimate {
            latency_secs: c.latency_secs,
            cost_usd: c.cost_usd,
            energy_j: c.energy_j,
            measured: 0,
        };
        let mut classes = vec![class(costs.local)];
        classes.extend((0..costs.cloud.latency_secs.len()).map(|k| class(costs.cloud(k))));
        Self { classes, table: costs.clone() }
    }

    /// The class index of an action sending `attached` modalities (`None`: local).
    pub fn class_of(cloud_attached: Option<usize>) -> usize {
        cloud_attached.map_or(0, |k| k + 1)
    }

    /// Folds one measured outcome into its class.
    pub fn record(&mut self, class: usize, latency_secs: f64, cost_usd: f64, energy_j: f64) {
        let Some(c) = self.classes.get_mut(class) else { return };
        let blend = |old: &mut f64, new: f64| {
            if new.is_finite() && new >= 0.0 {
                *old += SMOOTHING * (new - *old);
            }
        };
        blend(&mut c.latency_secs, latency_secs);
        blend(&mut c.cost_usd, cost_usd);
        blend(&mut c.energy_j, energy_j);
        c.measured += 1;
        let ActionCost { latency_secs, cost_usd, energy_j } = self.cost(class);
        if class == 0 {
            self.table.local = ActionCost { latency_secs, cost_usd, energy_j };
        } else {
            let k = class - 1;
            self.table.cloud.latency_secs[k] = latency_secs;
            self.table.cloud.cost_usd[k] = cost_usd;
            self.table.cloud.energy_j[k] = energy_j;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use device_profiles::DeviceProfile;

    #[test]
    fn measurements_move_the_mask_table() {
        let profile = DeviceProfile::builtin("x86-dev").expect("profile");
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
}

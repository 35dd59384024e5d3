//! Policy contracts v1 and v2: task categories, modality sets, the action space and the
//! observation.
//!
//! With X modalities there are A = 1 + 2^X actions: 0 is local (text only), 1 + i is the cloud
//! with the i-th modality subset, subsets enumerated by size then lexicographic order. For X = 3:
//! 1 = text only, 2..4 = {m0},{m1},{m2}, 5..7 = {m0,m1},{m0,m2},{m1,m2}, 8 = {m0,m1,m2}.
//!
//! Each turn has a step vector of X + 2 floats: [previous turn's action (-1 on the first turn,
//! 0 local, 1 cloud), the modalities the previous turn sent (X flags), this turn's task id].
//! The observation is the step vectors of the last Z turns, oldest first, padded with -1 before the
//! dialogue's first turn, followed by [remaining latency budget (s), remaining usage budget (USD)].
//!
//! Contract v2 appends the live cost table: the expected latency in seconds of each of the X + 2
//! cost classes [local, cloud with 0 attachments, cloud with 1, ..., cloud with X], then the
//! expected usage in USD of the same classes (raw units), 2 (X + 2) more floats. The action space
//! is the same.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The version tag of observation schema v1, as written in policy manifests.
pub const SCHEMA_V1: &str = "tmo-obs-v1";
/// The version tag of observation schema v2 (v1 and the cost table), as written in manifests.
pub const SCHEMA_V2: &str = "tmo-obs-v2";

/// Which observation a policy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ObservationVersion {
    /// The paper's: the last Z step vectors and the remaining budgets.
    #[default]
    V1,
    /// v1 followed by the expected latency and usage of every cost class.
    V2,
}

impl ObservationVersion {
    /// The manifest's `schema` tag.
    pub fn tag(self) -> &'static str {
        match self {
            ObservationVersion::V1 => SCHEMA_V1,
            ObservationVersion::V2 => SCHEMA_V2,
        }
    }

    /// The version a manifest's `schema` tag names (`"tmo-obs-v1"`, `"tmo-obs-v2"`).
    pub fn from_tag(tag: &str) -> Option<Self> {
        [ObservationVersion::V1, ObservationVersion::V2].into_iter().find(|v| v.tag() == tag)
    }

    /// The manifest's numeric schema (1 or 2).
    pub fn number(self) -> u32 {
        match self {
            ObservationVersion::V1 => 1,
            ObservationVersion::V2 => 2,
        }
    }
}

impl fmt::Display for ObservationVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.tag())
    }
}

/// Expected latency (seconds) and usage (USD) of every cost class, in the contract's order
/// [local, cloud with 0 attachments, ..., cloud with X]: the cost part of a v2 observation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassCosts {
    pub latency_secs: Vec<f64>,
    pub usage_usd: Vec<f64>,
}

impl ClassCosts {
    /// The classes of a profile's cost table (X + 2 of each, for X = `cloud.latency_secs.len() - 1`).
    pub fn from_table(costs: &device_profiles::CostTable) -> Self {
        let classes = costs.cloud.latency_secs.len() + 1;
        let mut out = ClassCosts { latency_secs: vec![0.0; classes], usage_usd: vec![0.0; classes] };
        out.set_from_table(costs);
        out
    }

    /// Overwrites these classes with `costs`' (same class count; no allocation).
    pub fn set_from_table(&mut self, costs: &device_profiles::CostTable) {
        for class in 0..self.latency_secs.len() {
            let c = if class == 0 { costs.local } else { costs.cloud(class - 1) };
            self.latency_secs[class] = c.latency_secs;
            self.usage_usd[class] = c.cost_usd;
        }
    }

    /// Number of classes (X + 2).
    pub fn len(&self) -> usize {
        self.latency_secs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.latency_secs.is_empty()
    }

    /// The class of `action`: 0 for local, 1 + k for the cloud with k attachments.
    pub fn class_of(action: Action) -> usize {
        match action {
            Action::Local => 0,
            Action::Cloud { modalities } => 1 + modalities.len(),
        }
    }
}

/// Largest number of modalities the contract supports (2^X subsets must fit a `u32` mask).
pub const MAX_MODALITIES: usize = 16;

/// The four task categories of M4A1; their ids are the sorted names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaskCategory {
    #[serde(rename = "Assistive System")]
    AssistiveSystem,
    #[serde(rename = "Message Editing")]
    MessageEditing,
    #[serde(rename = "Query")]
    Query,
    #[serde(rename = "Recommendation")]
    Recommendation,
}

impl TaskCategory {
    pub const ALL: [TaskCategory; 4] = [
        TaskCategory::AssistiveSystem,
        TaskCategory::MessageEditing,
        TaskCategory::Query,
        TaskCategory::Recommendation,
    ];

    /// The id fed to the policy: the index of the name in sorted order.
    pub fn id(self) -> usize {
        self as usize
    }

    pub fn from_id(id: usize) -> Option<Self> {
        Self::ALL.get(id).copied()
    }

    /// The M4A1 name (`"Assistive System"`, `"Message Editing"`, `"Query"`, `"Recommendation"`).
    pub fn name(self) -> &'static str {
        match self {
            TaskCategory::AssistiveSystem => "Assistive System",
            TaskCategory::MessageEditing => "Message Editing",
            TaskCategory::Query => "Query",
            TaskCategory::Recommendation => "Recommendation",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for TaskCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of modalities as a bit mask: bit i is modality m_i.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ModalitySet(pub u32);

impl ModalitySet {
    pub const EMPTY: ModalitySet = ModalitySet(0);

    /// All of the first `count` modalities.
    pub fn all(count: usize) -> Self {
        debug_assert!(count <= MAX_MODALITIES);
        ModalitySet(((1u64 << count) - 1) as u32)
    }

    pub fn from_indices(indices: impl IntoIterator<Item = usize>) -> Self {
        ModalitySet(indices.into_iter().fold(0, |m, i| m | (1 << i)))
    }

    pub fn contains(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// True when every modality of `self` is in `other`.
    pub fn is_subset_of(self, other: ModalitySet) -> bool {
        self.0 & !other.0 == 0
    }

    /// The member indices in increasing order.
    pub fn indices(self) -> impl Iterator<Item = usize> {
        (0..32).filter(move |i| self.contains(*i))
    }
}

/// What a turn did: answer locally, or forward to the cloud with some modalities attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    Local,
    Cloud { modalities: ModalitySet },
}

impl Action {
    /// The modalities the action sends (none for local).
    pub fn modalities(self) -> ModalitySet {
        match self {
            Action::Local => ModalitySet::EMPTY,
            Action::Cloud { modalities } => modalities,
        }
    }

    pub fn is_cloud(self) -> bool {
        matches!(self, Action::Cloud { .. })
    }
}

/// The contract's shape: X modalities, a history window of Z turns, and the observation version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    modalities: usize,
    history: usize,
    version: ObservationVersion,
    /// Cloud subsets in action order: `subsets[k]` is the set of action `1 + k`.
    subsets: Vec<ModalitySet>,
}

/// The schema of DESIGN.md: three camera views, five turns of history.
impl Default for Schema {
    fn default() -> Self {
        Schema::new(3, 5)
    }
}

impl Schema {
    /// A v1 schema (the paper's observation).
    ///
    /// # Panics
    /// If `modalities` exceeds [`MAX_MODALITIES`] or `history` is zero: both are programming
    /// errors, profiles are validated before they reach here.
    pub fn new(modalities: usize, history: usize) -> Self {
        Self::with_version(modalities, history, ObservationVersion::V1)
    }

    /// A v2 schema (v1 and the cost table).
    pub fn v2(modalities: usize, history: usize) -> Self {
        Self::with_version(modalities, history, ObservationVersion::V2)
    }

    /// The same shape with observation `version`.
    pub fn to_version(&self, version: ObservationVersion) -> Self {
        Schema { version, ..self.clone() }
    }

    /// # Panics
    /// As [`Self::new`].
    pub fn with_version(modalities: usize, history: usize, version: ObservationVersion) -> Self {
        assert!(modalities <= MAX_MODALITIES, "at most {MAX_MODALITIES} modalities");
        assert!(history > 0, "the history window holds at least the current turn");
        let mut subsets: Vec<ModalitySet> = (0..1u32 << modalities).map(ModalitySet).collect();
        // By size, then lexicographic order of the sorted member indices.
        subsets.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.indices().cmp(b.indices())));
        Schema { modalities, history, version, subsets }
    }

    /// Which observation this schema encodes.
    pub fn version(&self) -> ObservationVersion {
        self.version
    }

    /// Number of modalities X.
    pub fn modalities(&self) -> usize {
        self.modalities
    }

    /// History window Z.
    pub fn history(&self) -> usize {
        self.history
    }

    /// Floats per turn: X + 2.
    pub fn step_len(&self) -> usize {
        self.modalities + 2
    }

    /// Floats of the v1 part (the window and the budgets): Z (X + 2) + 2, 27 for X = 3, Z = 5.
    pub fn dialogue_len(&self) -> usize {
        self.history * self.step_len() + 2
    }

    /// Cost classes: local and the cloud with 0..=X attachments, X + 2.
    pub fn cost_classes(&self) -> usize {
        self.modalities + 2
    }

    /// Floats per observation: 27 (v1) or 37 (v2) for X = 3, Z = 5.
    pub fn observation_len(&self) -> usize {
        match self.version {
            ObservationVersion::V1 => self.dialogue_len(),
            ObservationVersion::V2 => self.dialogue_len() + 2 * self.cost_classes(),
        }
    }

    /// Number of actions A = 1 + 2^X (9 for the default schema).
    pub fn action_count(&self) -> usize {
        1 + self.subsets.len()
    }

    /// The action with index `index`, if it is in range.
    pub fn action(&self, index: usize) -> Option<Action> {
        match index {
            0 => Some(Action::Local),
            k => self.subsets.get(k - 1).map(|&modalities| Action::Cloud { modalities }),
        }
    }

    /// The index of `action`, if its modalities exist in this schema.
    pub fn action_index(&self, action: Action) -> Option<usize> {
        match action {
            Action::Local => Some(0),
            Action::Cloud { modalities } => self.subsets.iter().position(|s| *s == modalities).map(|k| k + 1),
        }
    }

    /// Every action, in index order.
    pub fn actions(&self) -> impl Iterator<Item = Action> + '_ {
        std::iter::once(Action::Local)
            .chain(self.subsets.iter().map(|&modalities| Action::Cloud { modalities }))
    }

    /// Writes the whole observation of the current turn into `out` (length
    /// [`Self::observation_len`]): the v1 part, then for v2 the cost classes `costs`.
    ///
    /// # Panics
    /// If `out` has the wrong length, or `costs` does not have [`Self::cost_classes`] classes.
    pub fn encode(
        &self,
        previous: &[Turn],
        task: TaskCategory,
        remaining_latency_secs: f64,
        remaining_cost_usd: f64,
        costs: &ClassCosts,
        out: &mut [f32],
    ) {
        assert_eq!(out.len(), self.observation_len(), "observation buffer length");
        let (dialogue, cost_part) = out.split_at_mut(self.dialogue_len());
        self.encode_observation(previous, task, remaining_latency_secs, remaining_cost_usd, dialogue);
        self.encode_costs(costs, cost_part);
    }

    /// Writes the cost part of a v2 observation (nothing for v1): the classes' latencies, then
    /// their usages, raw units.
    ///
    /// # Panics
    /// If `out` is not `2 (X + 2)` long for v2 (empty for v1) or `costs` has another class count.
    pub fn encode_costs(&self, costs: &ClassCosts, out: &mut [f32]) {
        if self.version == ObservationVersion::V1 {
            assert!(out.is_empty(), "a v1 observation has no cost part");
            return;
        }
        let k = self.cost_classes();
        assert_eq!(costs.len(), k, "cost classes");
        assert_eq!(out.len(), 2 * k, "cost part length");
        for (dst, src) in out.iter_mut().zip(costs.latency_secs.iter().chain(&costs.usage_usd)) {
            *dst = *src as f32;
        }
    }

    /// [`Self::encode`] into a new vector.
    pub fn observation_with_costs(
        &self,
        previous: &[Turn],
        task: TaskCategory,
        remaining_latency_secs: f64,
        remaining_cost_usd: f64,
        costs: &ClassCosts,
    ) -> Vec<f32> {
        let mut out = vec![0.0; self.observation_len()];
        self.encode(previous, task, remaining_latency_secs, remaining_cost_usd, costs, &mut out);
        out
    }

    /// Writes the v1 part of the current turn's observation (the window and the budgets) into
    /// `out` (length [`Self::dialogue_len`]).
    ///
    /// `previous` holds the dialogue's earlier turns, oldest first (only the last Z - 1 matter);
    /// `task` is the current turn's task; budgets are what remains of the dialogue's budgets.
    ///
    /// # Panics
    /// If `out` has the wrong length.
    pub fn encode_observation(
        &self,
        previous: &[Turn],
        task: TaskCategory,
        remaining_latency_secs: f64,
        remaining_cost_usd: f64,
        out: &mut [f32],
    ) {
        assert_eq!(out.len(), self.dialogue_len(), "observation buffer length");
        let step = self.step_len();
        let z = self.history;
        // Turn indices of the window, oldest first: the current turn is number `previous.len()`.
        let current = previous.len();
        for slot in 0..z {
            let dst = &mut out[slot * step..(slot + 1) * step];
            let Some(turn) = (current + slot + 1).checked_sub(z) else {
                dst.fill(-1.0);
                continue;
            };
            let this_task = if turn == current { task } else { previous[turn].task };
            match turn.checked_sub(1).map(|p| previous[p].action) {
                None => {
                    dst[0] = -1.0;
                    dst[1..=self.modalities].fill(0.0);
                }
                Some(prev) => {
                    dst[0] = if prev.is_cloud() { 1.0 } else { 0.0 };
                    let sent = prev.modalities();
                    for (i, v) in dst[1..=self.modalities].iter_mut().enumerate() {
                        *v = if sent.contains(i) { 1.0 } else { 0.0 };
                    }
                }
            }
            dst[step - 1] = this_task.id() as f32;
        }
        out[z * step] = remaining_latency_secs as f32;
        out[z * step + 1] = remaining_cost_usd as f32;
    }

    /// [`Self::encode_observation`] into a new vector (the v1 part only).
    pub fn observation(
        &self,
        previous: &[Turn],
        task: TaskCategory,
        remaining_latency_secs: f64,
        remaining_cost_usd: f64,
    ) -> Vec<f32> {
        let mut out = vec![0.0; self.dialogue_len()];
        self.encode_observation(previous, task, remaining_latency_secs, remaining_cost_usd, &mut out);
        out
    }
}

/// One finished turn of a dialogue, as the observation sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub task: TaskCategory,
    pub action: Action,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cloud(indices: &[usize]) -> Action {
        Action::Cloud { modalities: ModalitySet::from_indices(indices.iter().copied()) }
    }

    #[test]
    fn action_order_matches_the_contract() {
        let s = Schema::default();
        assert_eq!(s.action_count(), 9);
        assert_eq!(s.observation_len(), 27);
        let expected = [
            Action::Local,
            cloud(&[]),
            cloud(&[0]),
            cloud(&[1]),
            cloud(&[2]),
            cloud(&[0, 1]),
            cloud(&[0, 2]),
            cloud(&[1, 2]),
            cloud(&[0, 1, 2]),
        ];
        assert_eq!(s.actions().collect::<Vec<_>>(), expected);
        for (k, a) in expected.iter().enumerate() {
            assert_eq!(s.action(k), Some(*a));
            assert_eq!(s.action_index(*a), Some(k));
        }
        assert_eq!(s.action(9), None);
        assert_eq!(s.action_index(cloud(&[3])), None);
    }

    #[test]
    fn generalises_to_other_modality_counts() {
        for x in 0..=6 {
            let s = Schema::new(x, 4);
            assert_eq!(s.action_count(), 1 + (1 << x));
            assert_eq!(s.observation_len(), 4 * (x + 2) + 2);
            let sizes: Vec<usize> = s.actions().skip(1).map(|a| a.modalities().len()).collect();
            assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "subsets by size");
        }
        let s = Schema::new(4, 5);
        // Size two, lexicographic: {0,1},{0,2},{0,3},{1,2},{1,3},{2,3} are actions 6..=11.
        assert_eq!(s.action(6), Some(cloud(&[0, 1])));
        assert_eq!(s.action(8), Some(cloud(&[0, 3])));
        assert_eq!(s.action(11), Some(cloud(&[2, 3])));
        assert_eq!(s.action(16), Some(cloud(&[0, 1, 2, 3])));
    }

    #[test]
    fn first_turn_of_a_query_is_the_design_example() {
        let s = Schema::default();
        let obs = s.observation(&[], TaskCategory::Query, 30.0, 0.05);
        let mut expected = vec![-1.0; 20];
        expected.extend([-1.0, 0.0, 0.0, 0.0, 2.0, 30.0, 0.05]);
        assert_eq!(obs, expected);
    }

    /// DESIGN.md's v2 example: the first turn of a Query on the TX2 / wired table.
    #[test]
    fn first_turn_of_a_query_on_the_tx2_wired_table_is_the_v2_example() {
        let s = Schema::v2(3, 5);
        assert_eq!(s.observation_len(), 37);
        assert_eq!(s.dialogue_len(), 27);
        assert_eq!(s.action_count(), 9);
        let costs = ClassCosts {
            latency_secs: vec![0.0114, 6.4603, 4.76134, 6.24569, 6.98211],
            usage_usd: vec![7.9e-9, 0.00049, 0.005, 0.00945, 0.01368],
        };
        let tx2 = device_profiles::DeviceProfile::builtin("jetson-tx2").unwrap();
        assert_eq!(ClassCosts::from_table(&tx2.costs), costs);
        let obs = s.observation_with_costs(&[], TaskCategory::Query, 30.0, 0.05, &costs);
        let mut expected = vec![-1.0f32; 20];
        expected.extend([-1.0, 0.0, 0.0, 0.0, 2.0, 30.0, 0.05]);
        expected.extend([0.0114, 6.4603, 4.76134, 6.24569, 6.98211]);
        expected.extend([7.9e-9, 0.00049, 0.005, 0.00945, 0.01368]);
        assert_eq!(obs, expected);
        // The v1 schema of the same shape writes the first 27 of them.
        let v1 = s.to_version(ObservationVersion::V1);
        assert_eq!(v1.observation_with_costs(&[], TaskCategory::Query, 30.0, 0.05, &costs), expected[..27]);
    }

    /// A later turn of a two-modality board on another table: history, budgets and costs in place.
    #[test]
    fn v2_places_history_budgets_and_costs() {
        let s = Schema::v2(2, 2);
        assert_eq!(s.observation_len(), 2 * 4 + 2 + 2 * 4);
        let turns = [Turn { task: TaskCategory::Query, action: cloud(&[1]) }];
        let costs = ClassCosts {
            latency_secs: vec![1.126, 0.5, 1.898, 2.016],
            usage_usd: vec![1e-6, 0.00049, 0.005, 0.00945],
        };
        let obs = s.observation_with_costs(&turns, TaskCategory::AssistiveSystem, 12.5, 0.02, &costs);
        let expected: Vec<f32> = vec![
            -1.0, 0.0, 0.0, 2.0, // the first turn: a Query
            1.0, 0.0, 1.0, 0.0, // now: after a cloud turn that sent m1, an Assistive System question
            12.5, 0.02, // budgets left
            1.126, 0.5, 1.898, 2.016, // latency per class
            1e-6, 0.00049, 0.005, 0.00945, // usage per class
        ];
        assert_eq!(obs, expected);
        assert_eq!(ClassCosts::class_of(Action::Local), 0);
        assert_eq!(ClassCosts::class_of(cloud(&[])), 1);
        assert_eq!(ClassCosts::class_of(cloud(&[0, 1])), 3);
    }

    #[test]
    fn versions_round_trip_their_tags() {
        for v in [ObservationVersion::V1, ObservationVersion::V2] {
            assert_eq!(ObservationVersion::from_tag(v.tag()), Some(v));
        }
        assert_eq!(ObservationVersion::from_tag("tmo-obs-v3"), None);
        assert_eq!(ObservationVersion::V2.number(), 2);
    }

    #[test]
    fn task_ids_are_sorted_names() {
        let mut names: Vec<&str> = TaskCategory::ALL.iter().map(|t| t.name()).collect();
        names.sort();
        for (id, name) in names.iter().enumerate() {
            assert_eq!(TaskCategory::from_name(name).unwrap().id(), id);
            assert_eq!(TaskCategory::from_id(id).unwrap().name(), *name);
        }
        assert_eq!(TaskCategory::from_name("Cooking"), None);
    }

    #[test]
    fn window_keeps_the_last_z_turns() {
        let s = Schema::new(1, 2);
        let turns = [
            Turn { task: TaskCategory::Query, action: Action::Local },
            Turn { task: TaskCategory::Recommendation, action: cloud(&[0]) },
        ];
        // Z = 2, step = 3: the previous turn (its own previous was local) and the current one.
        let obs = s.observation(&turns, TaskCategory::MessageEditing, 1.5, 0.25);
        assert_eq!(obs, vec![0.0, 0.0, 3.0, 1.0, 1.0, 1.0, 1.5, 0.25]);
    }
}

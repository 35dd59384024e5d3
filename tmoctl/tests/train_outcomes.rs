//! `tmoctl policy train --outcomes` and `tmoctl outcomes export --dataset`, run as a fleet
//! manager runs them, on a collected dataset written by the test: three devices replay M4A1
//! dialogues with the default policy under epsilon-greedy exploration (exact propensities), the
//! budget mask of the profile, and scores from the trainer's response model.

use std::path::{Path, PathBuf};
use std::process::Command;

use device_profiles::DeviceProfile;
use outcome_log::{ScoreSource, TurnOutcome};
use policy_onnx::decision::{Availability, allowed_actions, choose};
use policy_onnx::m4a1::{self, Dialogue};
use policy_onnx::schema::Turn;
use policy_onnx::train::sim::{ResponseModel, episodes};
use policy_onnx::{ClassCosts, Exploration, LoadOptions, ModalitySet, Policy, Schema};
use rand::{Rng, SeedableRng};

const PROFILE: &str = "jetson-tx2";
const DEVICES: [&str; 3] = ["kitchen-a", "kitchen-b", "kitchen-c"];

fn tmoctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tmoctl"))
}

fn train_dialogues() -> Vec<Dialogue> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/m4a1/m4a1-train.json");
    m4a1::load(&path).unwrap()
}

/// What `devices` logged replaying `dialogues` (each device its share, dialogue ids "1", "2", ...
/// on every device), every `unscored_every`-th turn without a score.
fn fleet_rows(dialogues: &[Dialogue], devices: &[&str], unscored_every: usize) -> Vec<(String, TurnOutcome)> {
    let profile = DeviceProfile::builtin(PROFILE).unwrap();
    let schema = Schema::default();
    let v2 = Schema::v2(3, 5);
    let classes = ClassCosts::from_table(&profile.costs);
    let response = ResponseModel::fit(&episodes(dialogues, &schema).unwrap(), &schema).unwrap();
    let policy = Policy::from_bytes(policy_onnx::DEFAULT_POLICY, &LoadOptions::default()).unwrap();
    let mut session = policy.session().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut scores = vec![0.0f32; 9];
    let mut allowed = vec![true; 9];
    let mut rows = Vec::new();
    let mut count = 0usize;
    for (d, dialogue) in dialogues.iter().enumerate() {
        let device = devices[d % devices.len()];
        let dialogue_id = (d / devices.len() + 1).to_string();
        let (mut latency_left, mut cost_left) = (profile.budgets.latency_secs, profile.budgets.cost_usd);
        let mut history: Vec<Turn> = Vec::new();
        for (t, interaction) in dialogue.interactions.iter().enumerate() {
            // What tmod logs: the v2 observation (the v1 part, then the cost table it used).
            let observation =
                v2.observation_with_costs(&history, interaction.task_cat, latency_left, cost_left, &classes);
            session.scores_into(&observation, &mut scores).unwrap();
            let availability = Availability {
                modalities: ModalitySet::all(3),
                cloud_reachable: true,
                remaining_latency_secs: latency_left,
                remaining_cost_usd: cost_left,
                costs: &profile.costs,
            };
            allowed_actions(&schema, &availability, &mut allowed);
            let choice =
                choose(&scores, &allowed, Exploration::EpsilonGreedy { epsilon: 0.2 }, &mut rng).unwrap();
            let action = schema.action(choice.action).unwrap();
            let class = if action.is_cloud() {
                profile.costs.cloud(action.modalities().len())
            } else {
                profile.costs.local
            };
            let latency = class.latency_secs * rng.random_range(0.8..1.2);
            let cost = class.cost_usd * rng.random_range(0.9..1.1);
            let score =
                (response.predict(&observation, choice.action) + rng.random_range(-0.1..0.1)).max(0.0);
            count += 1;
            let scored = !count.is_multiple_of(unscored_every);
            let outcome = TurnOutcome {
                dialogue_id: dialogue_id.clone(),
                turn: t as u32,
                question: interaction.question.clone(),
                task: interaction.task_cat,
                observation,
                action_index: choice.action as u32,
                action,
                propensity: choice.propensity,
                policy_version: policy.info().version(),
                policy_sha256: policy.info().sha256.clone(),
                latency_secs: latency,
                energy_joules: None,
                cost_usd: cost,
                prompt_tokens: 40,
                generated_tokens: 60,
                answer: interaction.answer.clone(),
                score: scored.then_some(score),
                score_source: scored.then_some(ScoreSource::Judge),
                telemetry: serde_json::json!({}),
                route: None,
                cloud_attempt: None,
                created_at_ms: 1_795_996_800_000 + count as i64,
                text_cut_bytes: 0,
                forced: false,
            };
            latency_left -= latency;
            cost_left -= cost;
            history.push(Turn { task: interaction.task_cat, action });
            rows.push((device.to_owned(), outcome));
        }
    }
    rows
}

/// Writes rows as earlier collectors did (JSON lines, `<day>/<device>.jsonl`) and converts them
/// with `tmoctl outcomes convert` into the Parquet dataset `dir`.
fn write_dataset(dir: &Path, rows: &[(String, TurnOutcome)]) {
    let source = tempfile::tempdir().unwrap();
    let json_lines = source.path();
    let day = json_lines.join("2026-11-30");
    std::fs::create_dir_all(&day).unwrap();
    for device in DEVICES {
        let lines: String = rows
            .iter()
            .filter(|(d, _)| d == device)
            .enumerate()
            .map(|(i, (d, o))| {
                let record = serde_json::json!({"device_id": d, "received_unix_ms": 1_796_000_000_000u64 + i as u64, "outcome": o});
                format!("{record}\n")
            })
            .collect();
        if !lines.is_empty() {
            std::fs::write(day.join(format!("{device}.jsonl")), lines).unwrap();
        }
    }
    let o = tmoctl()
        .args(["outcomes", "convert", "--from"])
        .arg(json_lines)
        .arg("--to")
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains(&format!("converted {} records", rows.len())), "{said}");
}

fn finite_interval(v: &serde_json::Value) -> bool {
    ["estimate", "low", "high"].iter().all(|k| v[k].as_f64().is_some_and(f64::is_finite))
        && v["low"].as_f64() <= v["estimate"].as_f64()
        && v["estimate"].as_f64() <= v["high"].as_f64()
}

#[test]
fn policy_train_from_collected_outcomes_writes_a_policy_and_an_off_policy_report() {
    let dialogues = train_dialogues();
    let mut rows = fleet_rows(&dialogues, &DEVICES, 13);
    // Turns an app forced (OpenAI model tmo-local): not draws of the logging policy.
    let forced = 5;
    for (_, o) in rows.iter_mut().filter(|(_, o)| o.score.is_some()).take(forced) {
        o.forced = true;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dataset");
    write_dataset(&data, &rows);
    let logging = dir.path().join("default.onnx");
    std::fs::write(&logging, policy_onnx::DEFAULT_POLICY).unwrap();
    let out = dir.path().join("new.onnx");

    let run = tmoctl()
        .args([
            "policy",
            "train",
            "--profile",
            PROFILE,
            "--steps",
            "800",
            "--epochs",
            "8",
            "--quiet",
            "--json",
        ])
        .args(["--bootstrap", "500"])
        .arg("--outcomes")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .arg("--logging-policy")
        .arg(&logging)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let policy = Policy::from_file(&out, &LoadOptions::default()).unwrap();
    let manifest = policy.info().manifest.clone().unwrap();
    assert_eq!(manifest["data_hash"].as_str().unwrap().len(), 64);
    assert_eq!(manifest["profile"], PROFILE);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains(&policy.info().sha256), "{stderr}");

    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let unscored = rows.iter().filter(|(_, o)| o.score.is_none()).count();
    assert!(unscored > 10);
    assert_eq!(report["dataset"]["rows"], rows.len());
    assert_eq!(report["dataset"]["devices"], 3);
    assert_eq!(report["dataset"]["dialogues"], dialogues.len());
    assert_eq!(report["dataset"]["unscored_rows"], unscored);
    assert_eq!(report["dataset"]["forced_rows"], forced);
    assert_eq!(report["evaluated_turns"], rows.len() - unscored - forced);
    let policies = report["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 2);
    assert_eq!(policies[0]["role"], "new");
    assert_eq!(policies[0]["sha256"], policy.info().sha256.as_str());
    assert_eq!(policies[1]["role"], "logging");
    assert_eq!(policies[1]["logged_turns_by_this_policy"], rows.len() - unscored - forced);
    for p in policies {
        let e = &p["estimate"];
        for k in ["logging", "ips", "snips", "dr", "dr_gain"] {
            assert!(finite_interval(&e[k]), "{k}: {}", e[k]);
        }
        assert!(e["effective_sample_size"].as_f64().unwrap() > 1.0);
        let agreement = e["agreement"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&agreement));
    }
    // The logging policy's greedy choice is the logged action except where it explored:
    // epsilon 0.2 leaves it about 80% + 20%/|allowed|.
    let agreement = policies[1]["estimate"]["agreement"].as_f64().unwrap();
    assert!(agreement > 0.75, "{agreement}");

    // The table names the estimators and the policies.
    let table = tmoctl()
        .args(["policy", "train", "--profile", PROFILE, "--steps", "300", "--epochs", "2", "--quiet"])
        .args(["--bootstrap", "200"])
        .arg("--outcomes")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("table.onnx"))
        .output()
        .unwrap();
    assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
    let text = String::from_utf8(table.stdout).unwrap();
    for needle in ["IPS", "SNIPS", "DR - logged", "logged (mean reward)", "new tmo-plan-", "greedy arg-max"] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
}

#[test]
fn policy_train_refuses_a_dataset_with_too_few_scored_turns_and_names_the_counts() {
    let dialogues: Vec<Dialogue> = train_dialogues().into_iter().take(4).collect();
    let rows = fleet_rows(&dialogues, &DEVICES, 2);
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), &rows);
    let run = tmoctl()
        .args(["policy", "train", "--profile", PROFILE, "--quiet", "--outcomes"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("p.onnx"))
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    let unscored = rows.iter().filter(|(_, o)| o.score.is_none()).count();
    assert!(stderr.contains("too few scored turns to train"), "{stderr}");
    assert!(stderr.contains(&format!("{} rows from 3 devices", rows.len())), "{stderr}");
    assert!(stderr.contains(&format!("{unscored} without a score")), "{stderr}");
    assert!(!dir.path().join("p.onnx").exists());

    // --data and --outcomes are alternatives.
    let both = tmoctl()
        .args(["policy", "train", "--profile", PROFILE, "--data", "x.json", "--outcomes"])
        .arg(dir.path())
        .args(["--out", "p.onnx"])
        .output()
        .unwrap();
    assert!(!both.status.success());
}

#[test]
fn outcomes_export_of_a_dataset_keeps_devices_dialogues_apart() {
    let dialogues: Vec<Dialogue> = train_dialogues().into_iter().take(6).collect();
    let rows = fleet_rows(&dialogues, &DEVICES, usize::MAX);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dataset");
    write_dataset(&data, &rows);
    let out = dir.path().join("train.json");
    let run = tmoctl()
        .args(["outcomes", "export", "--format", "m4a1", "--modalities", "left,top,right", "--dataset"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let exported = m4a1::load(&out).unwrap();
    // Six dialogues, ids "1" and "2" on each of three devices: six dialogues, six distinct ids.
    assert_eq!(exported.len(), 6);
    let mut ids: Vec<u64> = exported.iter().map(|d| d.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 6);
    assert_eq!(exported.iter().map(|d| d.interactions.len()).sum::<usize>(), rows.len());
    let values: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let mut keys: Vec<(String, String)> = values
        .iter()
        .map(|v| (v["tmo_device_id"].as_str().unwrap().into(), v["tmo_dialogue_id"].as_str().unwrap().into()))
        .collect();
    keys.sort();
    let mut expected: Vec<(String, String)> =
        DEVICES.iter().flat_map(|d| ["1", "2"].map(|i| ((*d).to_owned(), i.to_owned()))).collect();
    expected.sort();
    assert_eq!(keys, expected);

    let neither = tmoctl().args(["outcomes", "export", "--out"]).arg(&out).output().unwrap();
    assert!(!neither.status.success());
}

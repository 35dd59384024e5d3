//! `tmoctl policy inspect` and `tmoctl policy decide`, run as a user runs them.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn tmoctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tmoctl"))
}

fn shared_policy(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/policies").join(name)
}

fn decide(policy: &str, extra: &[&str], input: impl AsRef<[u8]>) -> Vec<serde_json::Value> {
    let mut child = tmoctl()
        .args(["policy", "decide"])
        .arg(shared_policy(policy))
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_ref()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

const FIRST_QUERY: &str =
    "[-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,0,0,0,2,30.0,0.05]";

#[test]
fn help_lists_the_policy_commands() {
    let out = tmoctl().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("policy"), "{text}");
}

#[test]
fn inspect_prints_the_contract_as_json() {
    let out =
        tmoctl().args(["policy", "inspect"]).arg(shared_policy("sb3-rc-dqn-m4a1.onnx")).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["schema"], "tmo-obs-v1");
    assert_eq!(info["input_name"], "obs");
    assert_eq!(info["input_shape"][1], "27");
    assert_eq!(info["output_shape"][1], "9");
    assert_eq!(info["opset"], 17);
    assert!(info["parameter_count"].as_u64().unwrap() > 1000);
    assert_eq!(info["sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn inspect_rejects_a_file_that_is_not_a_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.onnx");
    std::fs::write(&path, "these are not weights").unwrap();
    let out = tmoctl().args(["policy", "inspect"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("not an ONNX model"), "{err}");
}

#[test]
fn decide_answers_every_line_and_names_bad_ones() {
    let input = format!(
        "{{\"obs\": {FIRST_QUERY}}}\nnot json\n{{\"obs\": [1, 2, 3]}}\n\n{{\"obs\": {FIRST_QUERY}, \"allowed\": [true, true, true, true, true, true, false, true, true]}}\n{{\"obs\": {FIRST_QUERY}, \"allowed\": [true]}}\n"
    );
    let lines = decide("sb3-rc-ppo-m4a1.onnx", &[], &input);
    assert_eq!(lines.len(), 5, "{lines:?}");
    // The paper's PPO agent sends views 0 and 2 on a first Query (see policy-onnx/tests).
    assert_eq!(lines[0]["action"], 6);
    assert_eq!(lines[0]["propensity"], 1.0);
    assert_eq!(lines[0]["scores"].as_array().unwrap().len(), 9);
    assert_eq!(lines[1]["line"], 2);
    assert!(lines[1]["error"].as_str().unwrap().contains("not a decide line"));
    assert_eq!(lines[2]["line"], 3);
    assert!(lines[2]["error"].as_str().unwrap().contains("27"), "{}", lines[2]);
    // Line 4 is blank and skipped; line 5 masks action 6: the runner-up (cloud, view 0).
    assert_eq!(lines[3]["action"], 2);
    assert_eq!(lines[4]["line"], 6);
}

#[test]
fn decide_with_a_profile_masks_over_budget_actions() {
    // 0.008 USD left: the policy wants views 0 and 2 (0.00945 USD on the paper's tables); the
    // profile masks it and the best affordable action, one view (0.005 USD), is taken.
    let obs = FIRST_QUERY.replace("30.0,0.05", "30.0,0.008");
    let line = format!("{{\"obs\": {obs}}}\n");
    assert_eq!(decide("sb3-rc-ppo-m4a1.onnx", &[], &line)[0]["action"], 6);
    assert_eq!(decide("sb3-rc-ppo-m4a1.onnx", &["--profile", "jetson-tx2"], &line)[0]["action"], 2);
    // 2 s left: nothing cloud fits; the policy's own choice is local anyway.
    let obs = FIRST_QUERY.replace("30.0,0.05", "2.0,0.001");
    let lines = decide("sb3-rc-ppo-m4a1.onnx", &["--profile", "jetson-tx2"], format!("{{\"obs\": {obs}}}\n"));
    assert_eq!(lines[0]["action"], 0, "{:?}", lines[0]);
}

#[test]
fn decide_survives_bytes_that_are_not_text() {
    let mut input = b"\xff\xfe\x00garbage\n".to_vec();
    input.extend(format!("{{\"obs\": {FIRST_QUERY}}}\n").bytes());
    let lines = decide("sb3-rc-dqn-m4a1.onnx", &[], input);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["line"], 1);
    assert!(lines[1]["action"].is_u64(), "{:?}", lines[1]);
}

/// `policy eval` plays v1 and v2 files alike under another cost table: one of the paper's
/// networks, or a profile's `[costs]`; an unknown network is a clear error.
#[test]
fn eval_takes_a_network_or_a_cost_table_for_v1_and_v2_files() {
    let dir = tempfile::tempdir().unwrap();
    let v2 = dir.path().join("default.onnx");
    std::fs::write(&v2, policy_onnx::DEFAULT_POLICY).unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/m4a1/m4a1-train.json");
    let eval = |extra: &[&str]| {
        tmoctl()
            .args(["policy", "eval", "--profile", "jetson-tx2", "--json", "--data"])
            .arg(&data)
            .arg("--policy")
            .arg(&v2)
            .arg("--policy")
            .arg(shared_policy("sb3-rc-ppo-m4a1.onnx"))
            .args(extra)
            .output()
            .unwrap()
    };
    for (extra, profile) in [
        (&["--network", "4g"][..], "jetson-tx2 on 4g"),
        (&["--costs", "raspberry-pi-5"][..], "jetson-tx2 with the costs of raspberry-pi-5"),
    ] {
        let out = eval(extra);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["profile"], profile);
        let rows = report["rows"].as_array().unwrap();
        let row = |name: &str| {
            rows.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("{name}: {report}"))
        };
        assert_eq!(row("default.onnx")["over_budget"], 0, "the v2 default holds the budgets: {report}");
        assert!(row("sb3-rc-ppo-m4a1.onnx")["mean_reward"].is_f64());
        assert_eq!(row("default.onnx")["dialogues"], 80);
    }
    let out = eval(&["--network", "3g"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wired, wifi, 5g, 4g"));
}

//! `tmoctl fleet`: exit codes and messages, keygen, and a push/status/collect round against a
//! real Mosquitto.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tmo_protocol::testing::MosquittoBroker;

fn tmoctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tmoctl"))
        .args(args)
        .env_remove("TMO_MQTT_PASSWORD")
        .output()
        .expect("tmoctl runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write_policy(dir: &Path) -> String {
    let path = dir.join("policy.onnx");
    std::fs::write(&path, policy_onnx::DEFAULT_POLICY).unwrap();
    path.display().to_string()
}

#[test]
fn fleet_cli_keygen_writes_a_key_pair_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("fleet.key");
    let key_arg = key.display().to_string();
    let o = tmoctl(&["fleet", "keygen", "--out", &key_arg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let public = std::fs::read_to_string(dir.path().join("fleet.key.pub")).unwrap();
    assert!(stdout(&o).contains(public.trim()), "{}", stdout(&o));
    let o = tmoctl(&["fleet", "keygen", "--out", &key_arg]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("refusing to overwrite"), "{}", stderr(&o));
}

#[test]
fn fleet_cli_bad_arguments_exit_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path());
    // A missing key file: named, before any connection is tried.
    let o = tmoctl(&[
        "fleet",
        "push",
        "--group",
        "pilot",
        "--policy",
        &policy,
        "--key",
        "/nonexistent/fleet.key",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("loading the signing key") && e.contains("/nonexistent/fleet.key"), "{e}");
    // A broker address that is not HOST:PORT: a usage error.
    let o = tmoctl(&["fleet", "status", "--broker", "localhost"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is not HOST:PORT"), "{}", stderr(&o));
    // A group name with an MQTT wildcard, a canary share out of range.
    let o = tmoctl(&["fleet", "rollback", "--group", "pi/lot", "--key", "k"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not allowed in a topic level"), "{}", stderr(&o));
    let o = tmoctl(&["fleet", "push", "--group", "g", "--policy", &policy, "--key", "k", "--canary", "0"]);
    assert_eq!(o.status.code(), Some(2));
    // A broker nobody listens on: a timely, named failure.
    let port = tmo_protocol::testing::free_port().unwrap().to_string();
    let started = Instant::now();
    let o =
        tmoctl(&["fleet", "status", "--broker", &format!("127.0.0.1:{port}"), "--connect-timeout-ms", "700"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("no connection to the MQTT broker at 127.0.0.1:{port}")),
        "{}",
        stderr(&o)
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // A password without a user name.
    let o = Command::new(env!("CARGO_BIN_EXE_tmoctl"))
        .args(["fleet", "status", "--broker", "127.0.0.1:1883"])
        .env("TMO_MQTT_PASSWORD", "secret")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--username is not"), "{}", stderr(&o));
}

#[test]
fn fleet_cli_push_rollback_status_and_collect_against_mosquitto() {
    let broker = MosquittoBroker::start().unwrap();
    let addr = format!("127.0.0.1:{}", broker.port());
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("fleet.key").display().to_string();
    assert!(tmoctl(&["fleet", "keygen", "--out", &key]).status.success());
    let policy = write_policy(dir.path());

    let history = dir.path().join("pushes").display().to_string();
    let push = |version: &str, canary: &str| {
        tmoctl(&[
            "fleet",
            "push",
            "--broker",
            &addr,
            "--group",
            "pilot",
            "--policy",
            &policy,
            "--key",
            &key,
            "--canary",
            canary,
            "--version",
            version,
            "--history",
            &history,
        ])
    };
    // Nothing pushed yet: nothing to roll back to, said before connecting.
    let rollback = || {
        tmoctl(&[
            "fleet",
            "rollback",
            "--broker",
            &addr,
            "--group",
            "pilot",
            "--key",
            &key,
            "--history",
            &history,
        ])
    };
    let o = rollback();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no push to group pilot is recorded"), "{}", stderr(&o));
    let o = push("p-1", "100");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = push("p-2", "10");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("pushed policy p-2 to group pilot") && out.contains("canary 10%"), "{out}");
    assert!(out.contains("sequence ") && out.contains("recorded in"), "{out}");

    // The rollback signs p-1 again, for every device, under a newer sequence.
    let o = rollback();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("rollback: pushed policy p-1 to group pilot") && out.contains("canary all"),
        "{out}"
    );
    assert_eq!(std::fs::read_dir(dir.path().join("pushes/pilot")).unwrap().count(), 3);

    let o = tmoctl(&["fleet", "status", "--broker", &addr, "--wait-ms", "300"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("no device has published"), "{}", stdout(&o));

    // The collector runs until SIGTERM and prints its counters.
    let out = dir.path().join("dataset");
    let child = Command::new(env!("CARGO_BIN_EXE_tmoctl"))
        .args(["fleet", "collect", "--broker", &addr, "--out", &out.display().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out.is_dir() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("batches 0 rows_written 0"), "{}", stdout(&o));
}

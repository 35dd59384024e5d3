//! `tmod` as systemd and integrators run it.

use std::process::Command;

fn tmod() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tmod"))
}

#[test]
fn version_names_the_binary_and_version() {
    let out = tmod().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), format!("tmod {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn validate_accepts_every_shipped_profile() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../device-profiles");
    for name in device_profiles::BUILTIN.iter().map(|(n, _)| n) {
        let out =
            tmod().args(["validate", "--profile"]).arg(dir.join(format!("{name}.toml"))).output().unwrap();
        assert!(out.status.success(), "{name}: {out:?}");
    }
}

#[test]
fn validate_takes_several_profiles_after_one_flag() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../device-profiles");
    let out = tmod()
        .args(["validate", "--profile"])
        .arg(dir.join("jetson-tx2.toml"))
        .arg(dir.join("x86-dev.toml"))
        .arg("rk3588")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 3);
}

#[test]
fn validate_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let good = device_profiles::BUILTIN[0].1;
    std::fs::write(&path, good.replace("latency_secs = 30.0", "latency_secs = 0.0")).unwrap();
    let out = tmod().args(["validate", "--profile"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("budgets.latency_secs"), "{err}");
}

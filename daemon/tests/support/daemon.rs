//! A `tmod run` process for the serving tests and the serving bench (each uses part of it).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tmod_api::{Client, Endpoint};

/// A running `tmod run` with its own state directory; killed when dropped.
pub struct Daemon {
    child: Child,
    socket: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    pub fn config(state: &Path, extra: &str) -> PathBuf {
        Self::config_as(state, "test-device", extra)
    }

    /// A configuration for device `device_id`.
    pub fn config_as(state: &Path, device_id: &str, extra: &str) -> PathBuf {
        let path = state.join("tmod.toml");
        let text = format!("state_dir = {state:?}\ndevice_id = \"{device_id}\"\n{extra}\n");
        let mut file = std::fs::File::create(&path).expect("config");
        file.write_all(text.as_bytes()).expect("write config");
        path
    }

    pub fn start(state: &Path, extra: &str) -> Daemon {
        Self::start_as(state, "test-device", extra)
    }

    /// Starts device `device_id` with its state in `state`.
    pub fn start_as(state: &Path, device_id: &str, extra: &str) -> Daemon {
        Self::start_with_env(state, device_id, extra, &[])
    }

    /// Starts device `device_id` with `env` added to its environment.
    pub fn start_with_env(state: &Path, device_id: &str, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let config = Self::config_as(state, device_id, extra);
        let socket = state.join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_tmod"))
            .args(["run", "--config"])
            .arg(&config)
            .envs(env.iter().copied())
            .env("TMOD_API_SOCKET", &socket)
            .env("CANDLE_NUM_THREADS", "2")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // ALSA's C library writes to stderr on every retry of a missing sound card.
            .stderr(std::fs::File::create(state.join("tmod.stderr")).expect("stderr file"))
            .spawn()
            .expect("spawn tmod");
        let mut daemon = Daemon { child, socket, stderr: state.join("tmod.stderr") };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(120) {
            if let Ok(Some(status)) = self.child.try_wait() {
                let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
                panic!("tmod exited before it was ready: {status}\n{stderr}");
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("tmod not ready after 120 s");
    }

    pub fn client(&self) -> Client {
        Client::new(Endpoint::Unix(self.socket.clone())).with_timeout(Duration::from_secs(120))
    }

    /// The API's Unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit by itself; its status and stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<(std::process::ExitStatus, String)> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some((status, std::fs::read_to_string(&self.stderr).unwrap_or_default()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

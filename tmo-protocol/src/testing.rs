//! A real Mosquitto broker for tests (feature `testing`): Debian's `/usr/sbin/mosquitto`
//! started on a free loopback port with a generated configuration in a temporary directory,
//! killed when dropped. `stop` and `restart` simulate the broker going away and coming back on
//! the same port. [`ShapedProxy`] puts a delay and rate limits between a client and a server.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod shaped;
pub use shaped::{ProxyError, ShapedProxy};

/// Where Debian installs the broker; `MOSQUITTO` in the environment overrides it.
pub const DEFAULT_MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// The broker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// An I/O error (temporary directory, configuration file, spawning).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The broker exited while starting (another process took its port, for example).
    #[error("mosquitto exited while starting on port {port}; its log:\n{log}")]
    Exited {
        /// The port.
        port: u16,
        /// The broker's log.
        log: String,
    },
    /// The broker did not accept connections in time.
    #[error("mosquitto did not listen on port {port} within {waited:?}; its log:\n{log}")]
    NotListening {
        /// The port.
        port: u16,
        /// How long we waited.
        waited: Duration,
        /// The broker's log.
        log: String,
    },
}

/// PEM files for a TLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate that signed the server's and the clients' certificates.
    pub ca_file: PathBuf,
    /// Server certificate.
    pub cert_file: PathBuf,
    /// Server key.
    pub key_file: PathBuf,
    /// Ask clients for a certificate signed by the CA.
    pub require_client_certificate: bool,
}

/// How to start the broker.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// `max_packet_size` of the broker (0 or None: Mosquitto's default, no limit).
    pub max_packet_bytes: Option<u32>,
    /// Serve TLS instead of plain TCP.
    pub tls: Option<TlsFiles>,
    /// Only these subscription filters are allowed (Mosquitto's dynamic-security plugin, which
    /// refuses others in the SUBACK with "not authorized"; its plain `acl_file` would filter
    /// deliveries instead). `None`: every subscription is allowed.
    pub allowed_subscriptions: Option<Vec<String>>,
}

/// Where Debian installs Mosquitto's dynamic-security plugin.
const DYNAMIC_SECURITY_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so";

/// The dynamic-security configuration that lets anonymous clients publish and receive
/// anything, and subscribe to `allowed` only.
fn dynamic_security_json(allowed: &[String]) -> String {
    let acls: Vec<String> = allowed
        .iter()
        .map(|f| format!(r#"{{"acltype": "subscribePattern", "topic": {f:?}, "allow": true}}"#))
        .collect();
    format!(
        r#"{{"defaultACLAccess": {{"publishClientSend": true, "publishClientReceive": true, "subscribe": false, "unsubscribe": true}},
"clients": [], "groups": [{{"groupname": "anonymous", "roles": [{{"rolename": "anonymous"}}]}}],
"roles": [{{"rolename": "anonymous", "acls": [{}]}}], "anonymousGroup": "anonymous"}}"#,
        acls.join(", ")
    )
}

/// A running (or stopped) Mosquitto.
#[derive(Debug)]
pub struct MosquittoBroker {
    port: u16,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    child: Option<Child>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BrokerError {
    let what = what.into();
    move |source| BrokerError::Io { what, source }
}

/// A port free on 127.0.0.1 now (the OS picks it).
pub fn free_port() -> Result<u16, BrokerError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_err("binding a free port"))?;
    let port = listener.local_addr().map_err(io_err("reading the free port"))?.port();
    Ok(port)
}

impl MosquittoBroker {
    /// Starts a plain broker (anonymous, no persistence) on a free loopback port.
    pub fn start() -> Result<Self, BrokerError> {
        Self::start_with(BrokerOptions::default())
    }

    /// Starts a broker with `options`. The free port is free only until another process binds
    /// it (tests in one binary start brokers side by side): a broker that finds its port taken
    /// is started again on another one.
    pub fn start_with(options: BrokerOptions) -> Result<Self, BrokerError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Self::start_once(&options) {
                Err(BrokerError::Exited { log, .. })
                    if attempts < 8 && log.contains("Address already in use") => {}
                started => return started,
            }
        }
    }

    fn start_once(options: &BrokerOptions) -> Result<Self, BrokerError> {
        let dir = tempfile::tempdir().map_err(io_err("creating the broker's directory"))?;
        let port = free_port()?;
        let config_path = dir.path().join("mosquitto.conf");
        // `user root`: run as root, Mosquitto would otherwise switch to the `mosquitto` user,
        // which cannot read the temporary directory (ignored when not run as root).
        // set_tcp_nodelay: without it Mosquitto's Nagle plus the client's delayed ACK add
        // about 40 ms to every chunked round trip (measured by benches/loopback.rs).
        let mut conf = format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\n\
             set_tcp_nodelay true\nuser root\n\
             log_dest file {}\nlog_type all\nlistener {port} 127.0.0.1\n",
            dir.path().join("mosquitto.log").display()
        );
        if let Some(max) = options.max_packet_bytes {
            conf.push_str(&format!("max_packet_size {max}\n"));
        }
        if let Some(allowed) = &options.allowed_subscriptions {
            let path = dir.path().join("dynamic-security.json");
            std::fs::write(&path, dynamic_security_json(allowed)).map_err(io_err("writing the ACL"))?;
            conf.push_str(&format!(
                "plugin {DYNAMIC_SECURITY_PLUGIN}\nplugin_opt_config_file {}\n",
                path.display()
            ));
        }
        if let Some(tls) = &options.tls {
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}\n",
                tls.ca_file.display(),
                tls.cert_file.display(),
                tls.key_file.display(),
                tls.require_client_certificate
            ));
        }
        let mut file = std::fs::File::create(&config_path).map_err(io_err("writing mosquitto.conf"))?;
        file.write_all(conf.as_bytes()).map_err(io_err("writing mosquitto.conf"))?;
        let mut broker = Self { port, dir, config_path, child: None };
        broker.restart()?;
        Ok(broker)
    }

    /// The port it listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its temporary directory (configuration and log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Allows `filters` only (for a broker started with
    /// [`BrokerOptions::allowed_subscriptions`]), from the next [`MosquittoBroker::restart`].
    pub fn set_allowed_subscriptions(&self, filters: &[&str]) -> Result<(), BrokerError> {
        let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
        std::fs::write(self.dir.path().join("dynamic-security.json"), dynamic_security_json(&filters))
            .map_err(io_err("writing the ACL"))
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("mosquitto.stderr"), read("mosquitto.log"))
    }

    /// Kills the broker (SIGKILL: clients see their connection drop) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port (after [`MosquittoBroker::stop`]); waits until
    /// it says in its own log that it runs and accepts connections (a connection alone could
    /// reach another broker on the port).
    pub fn restart(&mut self) -> Result<(), BrokerError> {
        self.stop();
        let log_path = self.dir.path().join("mosquitto.log");
        let logged_before = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
        let running = || {
            std::fs::read(&log_path).is_ok_and(|log| {
                log.get(logged_before..).is_some_and(|new| String::from_utf8_lossy(new).contains(" running"))
            })
        };
        let binary = std::env::var("MOSQUITTO").unwrap_or_else(|_| DEFAULT_MOSQUITTO.to_owned());
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(match std::fs::File::create(self.dir.path().join("mosquitto.stderr")) {
                Ok(f) => Stdio::from(f),
                Err(_) => Stdio::null(),
            })
            .spawn()
            .map_err(io_err(format!("spawning {binary}")))?;
        self.child = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let started = Instant::now();
        let waited = Duration::from_secs(10);
        while started.elapsed() < waited {
            if let Some(child) = &mut self.child
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return Err(BrokerError::Exited { port: self.port, log: self.log() });
            }
            if running() && TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(BrokerError::NotListening { port: self.port, waited, log: self.log() })
    }
}

impl Drop for MosquittoBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

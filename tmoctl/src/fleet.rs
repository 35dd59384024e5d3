//! `tmoctl fleet`: keys, signed policy pushes, rollback, the outcome collector and the fleet
//! status table. The work is in the `fleet` crate; this module parses arguments and prints.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use fleet::push::BundleSpec;
use fleet::{AbortRules, Collector, CollectorConfig, FleetView, PushHistory, Rollout, keys};
use outcome_log::dataset::TimeWindow;
use tmo_protocol::link::{Link, LinkConfig};
use tmo_protocol::{DeviceId, GroupName, PolicyBundle, PolicyManifest, ShareGroup};

/// The environment variable holding the MQTT password (never a command-line argument).
pub const PASSWORD_ENV: &str = "TMO_MQTT_PASSWORD";

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Make an Ed25519 signing key: KEY (hex seed, mode 0600) and KEY.pub (hex public key, for
    /// tmod's trust list). Refuses to overwrite.
    Keygen {
        /// The secret key file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a policy for a device group and publish it retained (recorded in the push history).
    Push(Box<PushArgs>),
    /// Sign the group's earlier policy again under a newer sequence and publish it retained,
    /// replacing the latest bundle: it holds across the devices' reconnects and restarts.
    Rollback(RollbackArgs),
    /// Collect outcome batches into a dataset directory until SIGINT/SIGTERM.
    Collect(CollectArgs),
    /// The fleet's devices: online, policy, last update, outcomes, requests, cloud share, reward.
    Status(StatusArgs),
}

/// A broker address, `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    host: String,
    port: u16,
}

impl FromStr for BrokerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        let port = port.parse::<u16>().map_err(|_| format!("{port:?} is not a port number (1-65535)"))?;
        if port == 0 {
            return Err("port 0 is not a broker port".into());
        }
        Ok(BrokerAddr { host: host.to_owned(), port })
    }
}

/// How to reach the broker (shared by every fleet command that connects).
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// The MQTT broker, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: BrokerAddr,
    /// MQTT client id (default: tmoctl-<command>-<pid>).
    #[arg(long)]
    client_id: Option<String>,
    /// MQTT user name; the password comes from the environment variable TMO_MQTT_PASSWORD.
    #[arg(long)]
    username: Option<String>,
    /// PEM CA certificate of the broker; turns TLS on.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --key-file and --ca-file).
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// PEM private key of --cert-file.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Largest MQTT packet, bytes (a policy bundle must fit one; the broker's limit also applies).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_packet_bytes: u32,
    /// How long to wait for the connection (and for the broker's acknowledgement), ms.
    #[arg(long, default_value_t = 10_000)]
    connect_timeout_ms: u64,
}

impl BrokerArgs {
    fn link_config(&self, command: &str) -> anyhow::Result<LinkConfig> {
        let client_id =
            self.client_id.clone().unwrap_or_else(|| format!("tmoctl-{command}-{}", std::process::id()));
        let mut config = LinkConfig::new(self.broker.host.clone(), self.broker.port, client_id);
        config.username = self.username.clone();
        config.password = match std::env::var(PASSWORD_ENV) {
            Ok(p) if self.username.is_some() => Some(p),
            Ok(_) => bail!("{PASSWORD_ENV} is set but --username is not"),
            Err(_) => None,
        };
        config.ca_file = self.ca_file.clone();
        config.cert_file = self.cert_file.clone();
        config.key_file = self.key_file.clone();
        config.max_packet_bytes = self.max_packet_bytes;
        config.validate().context("broker settings")?;
        Ok(config)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }
}

#[derive(Debug, Args)]
pub struct PushArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// The device group.
    #[arg(long)]
    group: GroupName,
    /// The policy (ONNX, contract v1).
    #[arg(long)]
    policy: PathBuf,
    /// The secret key file (from `tmoctl fleet keygen`).
    #[arg(long)]
    key: PathBuf,
    /// Only this share of the group's devices (chosen stably by device id) takes it, 1-100.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    canary: Option<u8>,
    /// The policy version (default: the ONNX's own manifest version, else its sha256 prefix).
    #[arg(long)]
    version: Option<String>,
    /// The training data (a file or a dataset directory); its sha256 goes into the manifest.
    #[arg(long)]
    training_data: Option<PathBuf>,
    /// Oldest tmod version that may load it (default: this tmoctl's version).
    #[arg(long)]
    min_daemon_version: Option<String>,
    /// Only these devices of the group (comma-separated ids; default: all of them).
    #[arg(long, value_delimiter = ',')]
    devices: Vec<DeviceId>,
    #[command(flatten)]
    bundle: BundleArgs,
    #[command(flatten)]
    abort: AbortArgs,
}

/// A staged rollout that stops itself: with any `--abort-*` rule, the push watches the group's
/// statuses for `--watch-secs` and, when a rule breaks, signs the group's earlier push again
/// (as `fleet rollback` does), says why and exits non-zero.
#[derive(Debug, Args)]
pub struct AbortArgs {
    /// Roll back when more than this many devices refuse the bundle (another canary share's
    /// refusal does not count).
    #[arg(long)]
    abort_refusals: Option<u64>,
    /// Roll back when the new policy fails more than this many decisions over the group.
    #[arg(long)]
    abort_decision_failures: Option<u64>,
    /// Roll back when more than this share (0-1) of the new policy's cloud turns fall back to
    /// local answers, over at least --min-answers cloud turns.
    #[arg(long, value_parser = share)]
    abort_fallback_rate: Option<f64>,
    /// Roll back when the new policy's mean score is more than this below the previous
    /// policy's, each over at least --min-answers scored answers.
    #[arg(long, value_parser = share)]
    abort_score_drop: Option<f64>,
    /// Answers (scored, or cloud turns) needed before the score and fallback rules judge.
    #[arg(long, default_value_t = 20)]
    min_answers: u64,
    /// How long to watch the rollout, seconds.
    #[arg(long, default_value_t = 600)]
    watch_secs: u64,
}

impl AbortArgs {
    fn rules(&self) -> AbortRules {
        AbortRules {
            max_refusals: self.abort_refusals,
            max_decision_failures: self.abort_decision_failures,
            max_fallback_rate: self.abort_fallback_rate,
            max_score_drop: self.abort_score_drop,
            min_answers: self.min_answers,
        }
    }
}

fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("expected a number from 0 to 1, found {text:?}")),
    }
}

/// What every signed bundle takes: its validity and where pushes are recorded.
#[derive(Debug, Args)]
pub struct BundleArgs {
    /// Days devices take the bundle for; one that comes back later refuses it as expired until
    /// the group is pushed again.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=3650))]
    expires_days: u32,
    /// The push history: every bundle pushed, per group, for rollbacks and rising sequences
    /// (default: $TMO_FLEET_HISTORY, else $XDG_STATE_HOME/tmo-edge/pushes, else
    /// ~/.local/state/tmo-edge/pushes).
    #[arg(long)]
    history: Option<PathBuf>,
}

impl BundleArgs {
    fn history(&self) -> anyhow::Result<PushHistory> {
        let dir = self.history.clone().or_else(PushHistory::default_dir).context(
            "no push history directory: give --history, or set TMO_FLEET_HISTORY, XDG_STATE_HOME or HOME",
        )?;
        Ok(PushHistory::open(dir))
    }

    /// A spec for `group` made now: the next sequence of its history, the expiry from now.
    fn spec(&self, group: &GroupName, history: &PushHistory) -> anyhow::Result<BundleSpec> {
        let mut spec = BundleSpec::new(group.clone());
        spec.sequence = history
            .next_sequence(group, spec.created_unix_ms)
            .with_context(|| format!("reading the push history in {}", history.dir().display()))?;
        spec.expires_unix_ms = spec.created_unix_ms + u64::from(self.expires_days) * 24 * 3600 * 1000;
        Ok(spec)
    }
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// The device group.
    #[arg(long)]
    group: GroupName,
    /// The secret key file (from `tmoctl fleet keygen`).
    #[arg(long)]
    key: PathBuf,
    /// Go back to this version's latest push instead of the push before the latest one.
    #[arg(long = "to")]
    to_version: Option<String>,
    #[command(flatten)]
    bundle: BundleArgs,
}

#[derive(Debug, Args)]
pub struct CollectArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// The dataset directory (created if missing): Parquet files in DIR/day=YYYY-MM-DD/; several
    /// collectors may write one directory.
    #[arg(long)]
    out: PathBuf,
    /// The shared-subscription group: collectors with the same name split the batches.
    #[arg(long, default_value = fleet::DEFAULT_SHARE)]
    share: ShareGroup,
    /// Oldest row taken, in days before its receipt (older rows are rejected with the reason
    /// and set aside on their device), so that devices cannot choose partitions.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3650))]
    max_age_days: u32,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Keep the table live (redrawn as messages arrive) until interrupted.
    #[arg(long)]
    watch: bool,
    /// Print once no retained message arrived for this long, ms.
    #[arg(long, default_value_t = 500)]
    wait_ms: u64,
}

pub fn run(command: FleetCommand) -> anyhow::Result<()> {
    match command {
        FleetCommand::Keygen { out } => keygen(&out),
        FleetCommand::Push(args) => crate::runtime()?.block_on(push(*args)),
        FleetCommand::Rollback(args) => crate::runtime()?.block_on(rollback(args)),
        FleetCommand::Collect(args) => crate::runtime()?.block_on(collect(args)),
        FleetCommand::Status(args) => crate::runtime()?.block_on(status(args)),
    }
}

fn keygen(out: &std::path::Path) -> anyhow::Result<()> {
    let key = keys::generate(out).context("making a signing key")?;
    let public = keys::public_key_hex(&key.verifying_key());
    println!("secret key: {} (mode 0600; keep it off the devices)", out.display());
    println!("public key: {} ({})", keys::public_key_path(out).display(), public);
    println!("add {public} to the trusted keys of tmod's configuration");
    Ok(())
}

async fn push(args: PushArgs) -> anyhow::Result<()> {
    let key = keys::load_signing_key(&args.key).context("loading the signing key")?;
    let config = args.broker.link_config("push")?;
    let training_data_sha256 = match &args.training_data {
        Some(path) => Some(fleet::push::training_data_sha256(path).context("hashing the training data")?),
        None => None,
    };
    let history = args.bundle.history()?;
    let mut spec = BundleSpec {
        version: args.version.clone(),
        canary_percent: args.canary,
        training_data_sha256,
        devices: args.devices.clone(),
        ..args.bundle.spec(&args.group, &history)?
    };
    if let Some(v) = &args.min_daemon_version {
        spec.min_daemon_version = v.clone();
    }
    let bundle = fleet::build_bundle_from_file(&args.policy, &spec, &key)
        .with_context(|| format!("building the bundle of {}", args.policy.display()))?;
    let signer = keys::public_key_hex(&key.verifying_key());
    let rules = args.abort.rules();
    if !rules.any() {
        return publish(&config, &args.broker, &args.group, &bundle, &history, &signer, "pushed").await;
    }
    // What a rollback would go back to, known before anything goes out.
    let version =
        fleet::push::manifest_of(&bundle).context("the manifest just signed does not decode")?.version;
    let earlier = history.rollback_target_from(&args.group, &version).with_context(|| {
        format!("--abort-* rules need an earlier push of group {} to go back to", args.group)
    })?;
    // Statuses are watched from before the push, so that no report is missed.
    let mut link = fleet::net::connect(&config, FleetView::subscriptions(), args.broker.timeout()).await?;
    let rollout = Rollout {
        group: args.group.clone(),
        version,
        previous: earlier.manifest.version.clone(),
        pushed_unix_ms: fleet::unix_ms_now(),
        rules,
    };
    publish(&config, &args.broker, &args.group, &bundle, &history, &signer, "pushed").await?;
    let watched = watch_rollout(&mut link, &rollout, Duration::from_secs(args.abort.watch_secs)).await;
    link.shutdown(Duration::from_secs(2)).await;
    let Some(reason) = watched else { return Ok(()) };
    println!("rollout of {} stopped: {reason}", rollout.version);
    let to = Rollback { broker: &args.broker, group: &args.group, bundle: &args.bundle, key: &key };
    to.publish(&config, &history, &earlier).await?;
    anyhow::bail!(
        "the rollout of {} to group {} was stopped and rolled back to {}: {reason}",
        rollout.version,
        args.group,
        rollout.previous
    )
}

/// Judges `rollout` on every status until `watch` has passed: the reason to roll back, or
/// `None` when it stayed healthy (its figures printed as they change).
async fn watch_rollout(link: &mut Link, rollout: &Rollout, watch: Duration) -> Option<String> {
    let mut view = FleetView::new();
    let deadline = tokio::time::Instant::now() + watch;
    let mut shown = None;
    loop {
        let figures = rollout.figures(&view);
        if let Some(reason) = rollout.broken_rule(&figures) {
            println!("rollout of {}: {figures}", rollout.version);
            return Some(reason);
        }
        if shown.as_ref() != Some(&figures) {
            println!("rollout of {}: {figures}", rollout.version);
            shown = Some(figures);
        }
        match tokio::time::timeout_at(deadline, link.incoming.recv()).await {
            Ok(Some(incoming)) => fleet::status::apply_logged(&mut view, &incoming),
            Ok(None) => {
                println!("rollout of {}: the broker went away; no longer watched", rollout.version);
                return None;
            }
            Err(_) => {
                println!("rollout of {} healthy after {} s", rollout.version, watch.as_secs());
                return None;
            }
        }
    }
}

/// Publishes a signed bundle retained, records it in the history and prints what went out.
async fn publish(
    config: &LinkConfig,
    broker: &BrokerArgs,
    group: &GroupName,
    bundle: &PolicyBundle,
    history: &PushHistory,
    signer: &str,
    what: &str,
) -> anyhow::Result<()> {
    let manifest: PolicyManifest =
        fleet::push::manifest_of(bundle).context("the manifest just signed does not decode")?;
    let sent = fleet::push_bundle(config, group, bundle, broker.timeout())
        .await
        .with_context(|| format!("pushing to group {group}"))?;
    println!(
        "{what} policy {} to group {group} ({}): schema {}, {} bytes, sha256 {}, opset {}, canary {}, devices {}, \
         min tmod {}, sequence {}, expires {} (unix ms)",
        manifest.version,
        sent.topic,
        manifest.schema,
        manifest.onnx_size_bytes,
        manifest.onnx_sha256,
        manifest.opset.map_or_else(|| "-".into(), |o| o.to_string()),
        manifest.canary_percent.map_or_else(|| "all".into(), |p| format!("{p}%")),
        if manifest.devices.is_empty() { "all".to_owned() } else { manifest.devices.join(",") },
        manifest.min_daemon_version,
        manifest.sequence,
        manifest.expires_unix_ms,
    );
    println!("signed by {signer} ({} bytes retained on the broker)", sent.payload_bytes);
    let recorded = history.record(group, bundle).with_context(|| {
        format!("the bundle went out, but the push history in {} was not written", history.dir().display())
    })?;
    println!("recorded in {}", recorded.display());
    Ok(())
}

async fn rollback(args: RollbackArgs) -> anyhow::Result<()> {
    let key = keys::load_signing_key(&args.key).context("loading the signing key")?;
    let config = args.broker.link_config("rollback")?;
    let history = args.bundle.history()?;
    let target = history.rollback_target(&args.group, args.to_version.as_deref())?;
    let to = Rollback { broker: &args.broker, group: &args.group, bundle: &args.bundle, key: &key };
    to.publish(&config, &history, &target).await
}

/// A rollback of a group: an earlier push signed again under a newer sequence, published.
struct Rollback<'a> {
    broker: &'a BrokerArgs,
    group: &'a GroupName,
    bundle: &'a BundleArgs,
    key: &'a keys::SigningKey,
}

impl Rollback<'_> {
    async fn publish(
        &self,
        config: &LinkConfig,
        history: &PushHistory,
        earlier: &fleet::Pushed,
    ) -> anyhow::Result<()> {
        let spec = self.bundle.spec(self.group, history)?;
        let bundle = fleet::rebundle(earlier, &spec, self.key)
            .with_context(|| format!("signing {} again", earlier.manifest.version))?;
        let signer = keys::public_key_hex(&self.key.verifying_key());
        publish(config, self.broker, self.group, &bundle, history, &signer, "rollback: pushed").await
    }
}

async fn collect(args: CollectArgs) -> anyhow::Result<()> {
    let config = args.broker.link_config("collect")?;
    let settings = CollectorConfig {
        window: TimeWindow::days(args.max_age_days),
        ..CollectorConfig::new(args.share.clone(), &args.out)
    };
    let collector = Collector::start_with(&config, settings)
        .await
        .with_context(|| format!("starting the collector on {}", args.out.display()))?;
    if collector.wait_connected(args.broker.timeout()).await {
        eprintln!(
            "collecting outcome batches from {}:{} (share group {}) into {}; SIGINT or SIGTERM stops",
            config.host,
            config.port,
            args.share,
            args.out.display()
        );
    } else {
        eprintln!(
            "not connected to {}:{} yet; retrying in the background (SIGINT or SIGTERM stops)",
            config.host, config.port
        );
    }
    wait_for_signal().await?;
    let stats = collector.shutdown(Duration::from_secs(10)).await;
    println!(
        "batches {} rows_written {} rejected_rows {} malformed {} refused_batches {} \
         write_groups {} write_errors {} acks {} ack_failures {} dropped_queue_full {}",
        stats.batches,
        stats.rows_written,
        stats.rejected_rows,
        stats.malformed,
        stats.refused_batches,
        stats.write_groups,
        stats.write_errors,
        stats.acks_published,
        stats.ack_failures,
        stats.dropped_queue_full
    );
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let config = args.broker.link_config("status")?;
    let quiet = Duration::from_millis(args.wait_ms.max(1));
    if !args.watch {
        let view = fleet::status::snapshot(&config, args.broker.timeout(), quiet).await?;
        print_view(&view, false);
        return Ok(());
    }
    let mut link = fleet::net::connect(&config, FleetView::subscriptions(), args.broker.timeout()).await?;
    let mut view = FleetView::new();
    fleet::status::collect_until_quiet(&mut link, &mut view, quiet).await;
    print_view(&view, true);
    // Redrawn every second: ages move on even without messages.
    let mut redraw = tokio::time::interval(Duration::from_secs(1));
    let signal = wait_for_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            r = &mut signal => { r?; break; }
            incoming = link.incoming.recv() => {
                let Some(incoming) = incoming else { break };
                fleet::status::apply_logged(&mut view, &incoming);
            }
            _ = redraw.tick() => print_view(&view, true),
        }
    }
    link.shutdown(Duration::from_secs(2)).await;
    Ok(())
}

fn print_view(view: &FleetView, clear: bool) {
    if clear {
        // Clear the screen and go home, then draw.
        print!("\x1b[2J\x1b[H");
    }
    if view.devices().is_empty() {
        println!("no device has published a status or availability message");
    } else {
        print!("{}", view.render(fleet::unix_ms_now()));
    }
    if view.refused() > 0 {
        println!("({} malformed status messages ignored)", view.refused());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse_or_say_why_not() {
        assert_eq!("broker.local:8883".parse(), Ok(BrokerAddr { host: "broker.local".into(), port: 8883 }));
        assert_eq!("[::1]:1883".parse(), Ok(BrokerAddr { host: "::1".into(), port: 1883 }));
        assert!("nohost".parse::<BrokerAddr>().unwrap_err().contains("HOST:PORT"));
        assert!("h:99999".parse::<BrokerAddr>().unwrap_err().contains("port"));
        assert!(":1883".parse::<BrokerAddr>().unwrap_err().contains("no host"));
    }
}

//! `tmod run`: load everything, listen on the API socket (and the optional loopback port),
//! tell systemd when ready and feed its watchdog while the model thread, the outcome writer and
//! the API make progress, exit when one of them has stopped, stop cleanly on SIGTERM or SIGINT.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use sd_notify::NotifyState;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::service::Service;

/// Runs the daemon until a termination signal.
pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tmod-io")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The service starts its tasks (the MQTT link, judge scores) on the runtime.
    let (service, sensing) = {
        let _entered = runtime.enter();
        Service::start(config.clone())?
    };
    let result = runtime.block_on(serve(service, &config));
    sensing.shutdown(Duration::from_secs(2));
    result
}

async fn serve(service: Arc<Service>, config: &Config) -> anyhow::Result<()> {
    let file = &config.file;
    let router = crate::api::router(service.clone(), file.api.max_body_bytes, file.api.max_chat_body_bytes);
    let stop = CancellationToken::new();

    let limits = crate::http::ConnectionLimits {
        max_connections: file.api.max_connections,
        header_timeout: Duration::from_secs_f64(file.api.header_timeout_secs),
        idle_timeout: Duration::from_secs_f64(file.api.idle_timeout_secs),
    };
    let unix = bind_unix(&file.api.socket)?;
    tracing::info!(socket = %file.api.socket.display(), "API listening");
    let mut servers = tokio::task::JoinSet::new();
    let (app, token) = (router.clone(), stop.clone());
    servers.spawn(async move {
        crate::http::serve(unix, app, limits, token, DRAIN).await;
        anyhow::Ok(())
    });
    if let Some(addr) = config.api_tcp().map_err(anyhow::Error::msg)? {
        let app = match crate::api::read_token(&file.api.tcp_token_file).context("api.tcp_token_file")? {
            Some(token) => crate::api::require_bearer(router, token),
            None => {
                tracing::warn!(%addr, "the TCP API takes requests without a token (api.tcp_token_file)");
                router
            }
        };
        let tcp = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        // Streamed tokens are small writes: each goes out at once, not after the previous
        // one's ACK (Nagle with the client's delayed ACK holds them up to 40 ms).
        let tcp = axum::serve::ListenerExt::tap_io(tcp, |stream| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY not set: {e}");
            }
        });
        tracing::info!(%addr, "API listening on TCP");
        let token = stop.clone();
        servers.spawn(async move {
            crate::http::serve(tcp, app, limits, token, DRAIN).await;
            anyhow::Ok(())
        });
    }

    // Idle dialogues expire even when nobody asks.
    let expiry_service = service.clone();
    let expiry_stop = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = expiry_stop.cancelled() => break,
                _ = tick.tick() => expiry_service.expire_dialogues(),
            }
        }
    });

    notify_systemd(&[NotifyState::Ready, NotifyState::Status("serving")]);
    let (stopped_tx, mut stopped_rx) = tokio::sync::mpsc::channel::<String>(1);
    let health =
        tokio::spawn(watch_health(service.clone(), sd_notify::watchdog_enabled(), stopped_tx, stop.clone()));

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    let mut stopped_part = None;
    let failed = tokio::select! {
        _ = terminate.recv() => None,
        _ = tokio::signal::ctrl_c() => None,
        Some(done) = servers.join_next() => Some(done),
        Some(part) = stopped_rx.recv() => {
            stopped_part = Some(part);
            None
        }
    };
    tracing::info!("stopping");
    notify_systemd(&[NotifyState::Stopping]);
    stop.cancel();
    health.abort();
    // Streams in flight get a moment to finish; their turns are logged as they end.
    let drained = tokio::time::timeout(DRAIN + Duration::from_secs(1), async {
        while let Some(done) = servers.join_next().await {
            if let Ok(Err(e)) = done {
                tracing::warn!("{e:#}");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("requests still in flight after 10 s; stopping anyway");
    }
    let _ = std::fs::remove_file(&file.api.socket);
    service.shutdown_cloud().await;
    if stopped_part.is_none() && failed.is_none() {
        // Stopped by a signal: a policy on trial goes on with its trial at the next start.
        crate::fleet::FleetHost::note_clean_stop(&*service);
    }
    if let Some(part) = stopped_part {
        bail!("{part} has stopped: exiting so that systemd restarts tmod");
    }
    match failed {
        Some(Ok(Err(e))) => Err(e),
        Some(Err(e)) => Err(anyhow::anyhow!("API server task failed: {e}")),
        _ => Ok(()),
    }
}

/// How long requests in flight may take to finish once tmod stops.
const DRAIN: Duration = Duration::from_secs(10);

/// How often the parts are checked without a watchdog (with one: twice per period, at most
/// this).
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// Checks the parts that must run ([`Service::health`]) and feeds systemd's watchdog only
/// while all of them run and answer (this task itself runs on the runtime that serves the
/// API): a part that hangs starves the watchdog, and systemd kills and restarts tmod. A part
/// whose thread ended is reported (log, systemd status, `stopped`) at once, for tmod to exit
/// and be restarted rather than answer every request with an error.
async fn watch_health(
    service: Arc<Service>,
    watchdog: Option<Duration>,
    stopped: tokio::sync::mpsc::Sender<String>,
    stop: CancellationToken,
) {
    let every = watchdog.map_or(HEALTH_INTERVAL, |period| (period / 2).min(HEALTH_INTERVAL));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let health = service.health(every).await;
        let dead = health.stopped();
        if !dead.is_empty() {
            let parts = dead.join(" and ");
            tracing::error!("{parts} stopped: not feeding the watchdog; exiting for a restart");
            notify_systemd(&[NotifyState::Status(&format!("{parts} stopped"))]);
            let _ = stopped.send(parts).await;
            return;
        }
        if health.serving() {
            if watchdog.is_some() {
                notify_systemd(&[NotifyState::Watchdog]);
            }
        } else {
            tracing::warn!(?health, "a part does not answer: the watchdog is not fed");
        }
    }
}

/// Binds the API socket, replacing a stale socket file left by a previous run (never another
/// kind of file), readable and writable by the daemon's user and group.
fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket: refusing to replace it", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by another running tmod", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    Ok(listener)
}

fn notify_systemd(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

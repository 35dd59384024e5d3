//! A TCP proxy on a free loopback port that shapes the traffic it forwards, for tests of how the
//! device follows its link: an added one-way delay in each direction and a rate limit per
//! direction, changeable while connections are open.
//!
//! Each direction of a connection is a reader and a writer joined by a bounded queue: the reader
//! takes a chunk from its socket, paces it to the direction's rate (a chunk is at most 50 ms of
//! it, so a new rate applies within 50 ms), stamps it with its release time (now + the delay
//! then) and queues it; the writer writes the chunks in order, each at its release time or
//! later. A full queue stops the reader, so the sender's socket buffers fill as on a slow link.
//! Dropping the proxy aborts its accept task, whose task set aborts every connection.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Largest chunk read at once.
const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks in flight per direction (bounded memory: at most this many chunks).
const QUEUE_CHUNKS: usize = 256;
/// A paced chunk is at most this share of a second of the rate (50 ms).
const CHUNKS_PER_SEC: u64 = 20;

/// The proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Binding or reading the listening socket.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// [`ShapedProxy::start`] was called outside a tokio runtime.
    #[error("the shaped proxy needs a tokio runtime")]
    NoRuntime,
}

/// The shaping applied now (0 = none).
#[derive(Debug, Default)]
struct Shaping {
    delay_ns: AtomicU64,
    upload_rate: AtomicU64,
    download_rate: AtomicU64,
}

impl Shaping {
    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed))
    }
}

/// Which way the bytes go.
#[derive(Debug, Clone, Copy)]
enum Direction {
    /// Client to target.
    Upload,
    /// Target to client.
    Download,
}

impl Direction {
    fn rate(self, shaping: &Shaping) -> Option<u64> {
        let rate = match self {
            Direction::Upload => &shaping.upload_rate,
            Direction::Download => &shaping.download_rate,
        };
        Some(rate.load(Ordering::Relaxed)).filter(|&r| r > 0)
    }
}

/// A shaping TCP proxy on 127.0.0.1 (see the module's documentation). Stops when dropped.
#[derive(Debug)]
pub struct ShapedProxy {
    addr: SocketAddr,
    shaping: Arc<Shaping>,
    accept: JoinHandle<()>,
}

impl ShapedProxy {
    /// Listens on a free loopback port and forwards every connection to `target`, unshaped
    /// until told otherwise. Must be called inside a tokio runtime, which runs the proxy.
    pub fn start(target: SocketAddr) -> Result<Self, ProxyError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| ProxyError::NoRuntime)?;
        let io = |what| move |source| ProxyError::Io { what, source };
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("binding"))?;
        listener.set_nonblocking(true).map_err(io("setting non-blocking"))?;
        let addr = listener.local_addr().map_err(io("reading the address"))?;
        let listener = {
            let _entered = handle.enter();
            TcpListener::from_std(listener).map_err(io("registering the listener"))?
        };
        let shaping = Arc::new(Shaping::default());
        let accept = handle.spawn(accept_loop(listener, target, Arc::clone(&shaping)));
        Ok(Self { addr, shaping, accept })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The one-way delay added in each direction (a round trip gains twice this).
    pub fn set_delay(&self, one_way: Duration) {
        let ns = u64::try_from(one_way.as_nanos()).unwrap_or(u64::MAX);
        self.shaping.delay_ns.store(ns, Ordering::Relaxed);
    }

    /// The client-to-target rate in bytes per second (`None`: unlimited).
    pub fn set_upload_rate(&self, bytes_per_sec: Option<u64>) {
        self.shaping.upload_rate.store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
    }

    /// The target-to-client rate in bytes per second (`None`: unlimited).
    pub fn set_download_rate(&self, bytes_per_sec: Option<u64>) {
        self.shaping.download_rate.store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
    }
}

impl Drop for ShapedProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shaping: Arc<Shaping>) {
    // Dropped with this task: aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    connections.spawn(connection(client, target, Arc::clone(&shaping)));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "shaped proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn connection(client: TcpStream, target: SocketAddr, shaping: Arc<Shaping>) {
    let server = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, %target, "shaped proxy: target refused");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pipe(client_read, server_write, Direction::Upload, &shaping),
        pipe(server_read, client_write, Direction::Download, &shaping),
    );
}

/// Forwards one direction until end of file or an error, then shuts the writing side down.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, direction: Direction, shaping: &Shaping) {
    let (queue, mut queued) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let reader = async move {
        let mut next_free = Instant::now();
        loop {
            let max = direction
                .rate(shaping)
                .map_or(CHUNK_BYTES, |r| (r / CHUNKS_PER_SEC).clamp(1, CHUNK_BYTES as u64) as usize);
            let mut chunk = vec![0; max];
            let n = match from.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            chunk.truncate(n);
            // The rate now: it may have changed while the read waited.
            if let Some(rate) = direction.rate(shaping) {
                next_free = next_free.max(Instant::now()) + Duration::from_secs_f64(n as f64 / rate as f64);
                tokio::time::sleep_until(next_free).await;
            }
            if queue.send((Instant::now() + shaping.delay(), chunk)).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((release, chunk)) = queued.recv().await {
            tokio::time::sleep_until(release).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

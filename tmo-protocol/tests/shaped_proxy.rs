//! `testing::ShapedProxy` in front of a real loopback echo server: the delay, the upload rate,
//! live changes and stopping on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tmo_protocol::testing::ShapedProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on a free loopback port (runs until the test's runtime ends).
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            stream.set_nodelay(true).expect("nodelay");
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn connect(proxy: &ShapedProxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.addr()).await.expect("connect to the proxy");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// Sends one byte and waits for its echo.
async fn round_trip(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    stream.write_all(b"x").await.expect("write");
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await.expect("echo");
    started.elapsed()
}

/// Sends `bytes` and waits for all of them to come back; `midway` runs after `after`.
async fn transfer(stream: &mut TcpStream, bytes: usize, after: Duration, midway: impl FnOnce()) -> Duration {
    let started = Instant::now();
    let (mut r, mut w) = stream.split();
    let data = vec![7u8; bytes];
    let send = async {
        w.write_all(&data).await.expect("write");
    };
    let receive = async {
        let mut got = vec![0u8; bytes];
        r.read_exact(&mut got).await.expect("echo");
        assert!(got.iter().all(|&b| b == 7));
    };
    let change = async {
        tokio::time::sleep(after).await;
        midway();
    };
    tokio::join!(send, receive, change);
    started.elapsed()
}

#[tokio::test]
async fn delay_adds_to_each_round_trip_and_changes_live() {
    let proxy = ShapedProxy::start(echo_server().await).expect("proxy");
    let mut stream = connect(&proxy).await;
    let plain = round_trip(&mut stream).await;
    assert!(plain < Duration::from_millis(100), "{plain:?}");
    proxy.set_delay(Duration::from_millis(100));
    let delayed = round_trip(&mut stream).await;
    assert!(delayed >= Duration::from_millis(200) && delayed < Duration::from_millis(600), "{delayed:?}");
    proxy.set_delay(Duration::ZERO);
    let back = round_trip(&mut stream).await;
    assert!(back < Duration::from_millis(100), "{back:?}");
}

#[tokio::test]
async fn the_upload_rate_limits_and_changes_mid_transfer() {
    let proxy = ShapedProxy::start(echo_server().await).expect("proxy");
    let mut stream = connect(&proxy).await;
    proxy.set_upload_rate(Some(100_000));
    let limited = transfer(&mut stream, 200_000, Duration::ZERO, || ()).await;
    assert!(limited >= Duration::from_millis(1_900) && limited < Duration::from_secs(4), "{limited:?}");
    // The same connection: lifted after 300 ms, the rest goes at once.
    let lifted =
        transfer(&mut stream, 200_000, Duration::from_millis(300), || proxy.set_upload_rate(None)).await;
    assert!(lifted >= Duration::from_millis(300) && lifted < Duration::from_millis(1_000), "{lifted:?}");
    // The download direction has its own limit.
    proxy.set_download_rate(Some(200_000));
    let down = transfer(&mut stream, 100_000, Duration::ZERO, || ()).await;
    assert!(down >= Duration::from_millis(450) && down < Duration::from_secs(2), "{down:?}");
}

#[tokio::test]
async fn dropping_the_proxy_stops_it() {
    let proxy = ShapedProxy::start(echo_server().await).expect("proxy");
    let addr = proxy.addr();
    let mut stream = connect(&proxy).await;
    round_trip(&mut stream).await;
    drop(proxy);
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the open connection is closed: {read:?}");
    // The listener is gone too (give the runtime a moment to drop the aborted task).
    let mut refused = false;
    for _ in 0..50 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "nothing listens on {addr} any more");
}

#[test]
fn outside_a_runtime_it_refuses_to_start() {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
    assert!(matches!(ShapedProxy::start(addr), Err(tmo_protocol::testing::ProxyError::NoRuntime)));
}

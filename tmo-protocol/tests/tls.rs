//! Mutual TLS against Mosquitto with a CA and certificates made by `openssl` for the test.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tmo_protocol::link::{Delivered, Link, LinkConfig, LinkSetup, Message, QoS, Subscription};
use tmo_protocol::testing::{BrokerOptions, MosquittoBroker, TlsFiles};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all P-256.
fn make_pki(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tmo test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "/CN=127.0.0.1"), ("client", "/CN=kitchen-1")] {
        let mut req = vec!["req"];
        req.extend(ec);
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let ext = format!("{name}.ext");
        req.extend(["-keyout", &key, "-out", &csr, "-subj", cn]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

#[tokio::test]
async fn mutual_tls_connects_with_a_client_certificate_and_not_without() {
    let pki = tempfile::tempdir().unwrap();
    let dir = pki.path();
    make_pki(dir);
    let broker = MosquittoBroker::start_with(BrokerOptions {
        max_packet_bytes: None,
        tls: Some(TlsFiles {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
            require_client_certificate: true,
        }),
        ..BrokerOptions::default()
    })
    .unwrap();

    let mut config = LinkConfig::new("127.0.0.1", broker.port(), "kitchen-1");
    config.ca_file = Some(dir.join("ca.pem"));
    config.cert_file = Some(dir.join("client.pem"));
    config.key_file = Some(dir.join("client.key"));
    config.reconnect_initial_ms = 100;
    let mut link = Link::start(
        &config,
        LinkSetup {
            availability_topic: None,
            subscriptions: vec![Subscription::new("tls/echo", QoS::AtLeastOnce)],
        },
    )
    .unwrap();
    assert!(link.wait_connected(Duration::from_secs(10)).await, "log:\n{}", broker.log());
    let d = link.publisher().publish(Message::new("tls/echo", QoS::AtLeastOnce, "secret")).await.unwrap();
    assert!(matches!(d.confirmed().await.unwrap(), Delivered::Acknowledged { .. }));
    let m = tokio::time::timeout(Duration::from_secs(10), link.incoming.recv()).await.unwrap().unwrap();
    assert_eq!(&m.payload[..], b"secret");

    // Without a client certificate the broker refuses the handshake; the link keeps retrying.
    let mut anonymous = config.clone();
    anonymous.client_id = "intruder".into();
    anonymous.cert_file = None;
    anonymous.key_file = None;
    let intruder = Link::start(&anonymous, LinkSetup::default()).unwrap();
    assert!(!intruder.wait_connected(Duration::from_millis(1500)).await);
    assert!(intruder.stats().connection_errors >= 1, "{:?}", intruder.stats());
    assert_eq!(intruder.stats().connections, 0);
}

//! Policy pushes, rollbacks and the status table against a real Mosquitto.

use std::time::{Duration, Instant};

use fleet::push::{BundleSpec, PushError};
use fleet::{FleetView, PushHistory, keys};
use tmo_protocol::codec::CborMessage;
use tmo_protocol::link::{Link, LinkConfig, LinkSetup, Message, QoS, Subscription};
use tmo_protocol::testing::MosquittoBroker;
use tmo_protocol::{BundleError, GroupName, Inbox, PolicyBundle, ReassemblyLimits, Topic};

const WAIT: Duration = Duration::from_secs(10);

async fn subscriber(port: u16, id: &str, filter: String) -> Link {
    let mut config = LinkConfig::new("127.0.0.1", port, id);
    config.max_packet_bytes = 1 << 20;
    let link = Link::start(
        &config,
        LinkSetup {
            availability_topic: None,
            subscriptions: vec![Subscription::new(filter, QoS::AtLeastOnce)],
        },
    )
    .unwrap();
    assert!(link.wait_connected(WAIT).await);
    link
}

async fn retained_bundle(link: &mut Link) -> PolicyBundle {
    let incoming = tokio::time::timeout(WAIT, link.incoming.recv()).await.expect("retained bundle").unwrap();
    assert!(incoming.retain, "the bundle must come from the broker's retained store");
    let mut inbox = Inbox::new(ReassemblyLimits::default());
    inbox
        .receive::<PolicyBundle>(&incoming.topic, &incoming.payload, Instant::now())
        .expect("one whole frame")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_push_publishes_a_retained_signed_bundle_that_a_late_subscriber_verifies() {
    let broker = MosquittoBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("fleet.key");
    keys::generate(&key_file).unwrap();
    let key = keys::load_signing_key(&key_file).unwrap();
    let group = GroupName::new("pilot").unwrap();
    let spec = BundleSpec {
        version: Some("p-9".into()),
        canary_percent: Some(50),
        ..BundleSpec::new(group.clone())
    };
    let bundle = fleet::build_bundle(policy_onnx::DEFAULT_POLICY.to_vec(), &spec, &key).unwrap();
    let config = LinkConfig::new("127.0.0.1", broker.port(), "fleet-cli");
    let sent = fleet::push_bundle(&config, &group, &bundle, WAIT).await.unwrap();
    assert_eq!(sent.topic, "tmo/v1/group/pilot/policy");

    // A device that connects afterwards gets it from the retained store, and it verifies with
    // the public key file (what tmod's trust list holds).
    let mut late = subscriber(broker.port(), "late-device", Topic::Policy(group.clone()).name()).await;
    let received = retained_bundle(&mut late).await;
    assert_eq!(received, bundle);
    let public = keys::load_public_key(&keys::public_key_path(&key_file)).unwrap();
    let manifest = received.verify(&[public]).unwrap();
    assert_eq!((manifest.version.as_str(), manifest.schema.as_str()), ("p-9", "v2"));
    assert_eq!(manifest.canary_percent, Some(50));
    assert_eq!(manifest.onnx_size_bytes, policy_onnx::DEFAULT_POLICY.len() as u64);

    // An arbitrary (here tampered) bundle is published as it is and replaces the retained one.
    let mut flipped = bundle.clone();
    flipped.onnx[100] ^= 1;
    fleet::push_bundle(&config, &group, &flipped, WAIT).await.unwrap();
    let mut later = subscriber(broker.port(), "later-device", Topic::Policy(group).name()).await;
    let received = retained_bundle(&mut later).await;
    assert!(matches!(received.verify(&[public]), Err(BundleError::HashMismatch { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_push_refuses_a_bundle_larger_than_one_packet() {
    let broker = MosquittoBroker::start().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let group = GroupName::new("pilot").unwrap();
    let bundle =
        fleet::build_bundle(policy_onnx::DEFAULT_POLICY.to_vec(), &BundleSpec::new(group.clone()), &key)
            .unwrap();
    let mut config = LinkConfig::new("127.0.0.1", broker.port(), "fleet-cli");
    config.max_packet_bytes = (bundle.to_cbor().unwrap().len() / 2).max(1024) as u32;
    let err = fleet::push_bundle(&config, &group, &bundle, WAIT).await.unwrap_err();
    assert!(matches!(err, PushError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("cannot be chunked"), "{err}");
    // Nothing was retained.
    let mut link = subscriber(broker.port(), "device", Topic::Policy(group).name()).await;
    assert!(tokio::time::timeout(Duration::from_millis(500), link.incoming.recv()).await.is_err());
}

/// A rollback as `tmoctl fleet rollback` makes it: the push before the latest, from the
/// history, signed again under a newer sequence, replaces the retained bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_rollback_replaces_the_retained_bundle_with_the_earlier_policy_signed_newer() {
    let broker = MosquittoBroker::start().unwrap();
    let config = LinkConfig::new("127.0.0.1", broker.port(), "fleet-cli");
    let group = GroupName::new("pilot").unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
    let dir = tempfile::tempdir().unwrap();
    let history = PushHistory::open(dir.path());
    let mut sequences = Vec::new();
    for version in ["p-1", "p-2"] {
        let sequence = history.next_sequence(&group, fleet::unix_ms_now()).unwrap();
        let spec = BundleSpec { version: Some(version.into()), sequence, ..BundleSpec::new(group.clone()) };
        let bundle = fleet::build_bundle(policy_onnx::DEFAULT_POLICY.to_vec(), &spec, &key).unwrap();
        fleet::push_bundle(&config, &group, &bundle, WAIT).await.unwrap();
        history.record(&group, &bundle).unwrap();
        sequences.push(sequence);
    }
    assert!(sequences[1] > sequences[0], "{sequences:?}");
    let target = history.rollback_target(&group, None).unwrap();
    let spec = BundleSpec {
        sequence: history.next_sequence(&group, fleet::unix_ms_now()).unwrap(),
        ..BundleSpec::new(group.clone())
    };
    let rollback = fleet::rebundle(&target, &spec, &key).unwrap();
    fleet::push_bundle(&config, &group, &rollback, WAIT).await.unwrap();

    let mut device = subscriber(broker.port(), "device", Topic::Policy(group).name()).await;
    let received = retained_bundle(&mut device).await;
    let manifest = received.verify(&[key.verifying_key()]).unwrap();
    assert_eq!(manifest.version, "p-1");
    assert!(manifest.sequence > sequences[1], "{} after {sequences:?}", manifest.sequence);
    assert_eq!(received.onnx, policy_onnx::DEFAULT_POLICY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_status_table_comes_from_retained_messages() {
    let broker = MosquittoBroker::start().unwrap();
    // Device a: connected, with availability (retained online) and a status.
    let a_config = LinkConfig::new("127.0.0.1", broker.port(), "dev-a");
    let a = Link::start(
        &a_config,
        LinkSetup {
            availability_topic: Some(Topic::Availability("dev-a".parse().unwrap()).name()),
            subscriptions: vec![],
        },
    )
    .unwrap();
    assert!(a.wait_connected(WAIT).await);
    let status = format!(
        r#"{{"v":1,"device_id":"dev-a","online":true,"daemon_version":"0.1.0","group":"pilot",
        "policy_version":"p-5","previous_policy_version":"p-4",
        "last_policy_update":{{"version":"p-6","accepted":false,"reason":"signed by an unknown key","unix_ms":{now}}},
        "counters":{{"requests":20,"local_answers":15,"cloud_answers":5,"outcomes_logged":20,"outcomes_uploaded":18,
        "mean_reward":0.75,"energy_joules":300.0,"last_outcome_unix_ms":{now}}},"updated_unix_ms":{now}}}"#,
        now = fleet::unix_ms_now()
    );
    let message =
        Message::new(Topic::Status("dev-a".parse().unwrap()).name(), QoS::AtLeastOnce, status.into_bytes())
            .retained(true);
    a.publisher().publish(message).await.unwrap().confirmed().await.unwrap();
    // Device b: was online, then died (its last will publishes offline).
    let b_config = LinkConfig::new("127.0.0.1", broker.port(), "dev-b");
    let b = Link::start(
        &b_config,
        LinkSetup {
            availability_topic: Some(Topic::Availability("dev-b".parse().unwrap()).name()),
            subscriptions: vec![],
        },
    )
    .unwrap();
    assert!(b.wait_connected(WAIT).await);
    b.abort().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let config = LinkConfig::new("127.0.0.1", broker.port(), "fleet-status");
    let view: FleetView = fleet::status::snapshot(&config, WAIT, Duration::from_millis(500)).await.unwrap();
    assert_eq!(view.devices().len(), 2, "{view:?}");
    let table = view.render(fleet::unix_ms_now());
    let row_a = table.lines().find(|l| l.contains("dev-a")).expect("row of dev-a");
    for expected in [
        "yes",
        "p-5",
        "p-4",
        "p-6 rejected",
        "signed by an unknown key",
        "20",
        "25%",
        "0.750",
        "300.0",
        "18/20",
    ] {
        assert!(row_a.contains(expected), "{expected:?} missing from {row_a:?}\n{table}");
    }
    let row_b = table.lines().find(|l| l.contains("dev-b")).expect("row of dev-b");
    assert!(row_b.contains("| no "), "{row_b}");
    a.shutdown(WAIT).await;
}

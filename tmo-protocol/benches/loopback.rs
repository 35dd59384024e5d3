//! Round trip through a real Mosquitto on loopback, as the cloud path will do it: a device link
//! publishes a cloud request with three 100 KB frames (one packet, QoS 1, as the device sends it:
//! chunks are refused on the request topic), an
//! echo link (standing in for the bridge's transport, no backend) reassembles, decodes and
//! publishes a reply, and the device reassembles and decodes the reply. Prints percentiles.
//!
//! Run: `cargo bench -p tmo-protocol --bench loopback` (needs /usr/sbin/mosquitto).

use std::time::{Duration, Instant};

use tmo_protocol::link::{Link, LinkConfig, LinkSetup, Message, QoS, Subscription};
use tmo_protocol::testing::MosquittoBroker;
use tmo_protocol::topic::filter;
use tmo_protocol::{
    Attachment, CborMessage, CloudAnswer, CloudReply, CloudRequest, DeviceId, MediaType, Reassembler,
    ReassemblyLimits, ReplyResult, ReplyRoute, RequestId, ShareGroup, Topic,
};

const ROUNDS: usize = 300;

fn link(port: u16, id: &str, subscription: &str) -> Link {
    let mut c = LinkConfig::new("127.0.0.1", port, id);
    c.max_packet_bytes = 1 << 20;
    Link::start(
        &c,
        LinkSetup {
            availability_topic: None,
            subscriptions: vec![Subscription::new(subscription, QoS::AtLeastOnce)],
        },
    )
    .expect("link starts")
}

async fn next_body(link: &mut Link, r: &mut Reassembler) -> (tmo_protocol::link::Incoming, Vec<u8>) {
    loop {
        let m = link.incoming.recv().await.expect("link open");
        if let Ok(Some(body)) = r.accept(&m.topic, &m.payload, Instant::now()) {
            return (m, body);
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let broker = MosquittoBroker::start().expect("mosquitto starts");
    let device = DeviceId::new("kitchen-1").expect("valid id");
    let reply_topic = Topic::CloudReply(device.clone()).name();
    let mut device_link = link(broker.port(), "kitchen-1", &reply_topic);
    let share = ShareGroup::new("bridges").expect("valid share");
    let mut echo = link(broker.port(), "echo", &filter::cloud_requests_shared(&share));
    assert!(device_link.wait_connected(Duration::from_secs(10)).await);
    assert!(echo.wait_connected(Duration::from_secs(10)).await);
    let echo_publisher = echo.publisher();
    tokio::spawn(async move {
        let mut r = Reassembler::new(ReassemblyLimits::default());
        loop {
            let (m, body) = next_body(&mut echo, &mut r).await;
            let req = CloudRequest::from_cbor(&body, 1 << 20).expect("request decodes");
            let route = ReplyRoute::for_request(
                &req,
                &m.topic,
                m.response_topic.as_deref(),
                m.correlation_data.as_deref(),
            )
            .expect("route");
            let reply = CloudReply {
                request_id: req.request_id,
                backend_latency_ms: 0,
                bridge_latency_ms: 0,
                result: ReplyResult::Answer(CloudAnswer {
                    answer: "ok".into(),
                    model: "echo".into(),
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    cost_usd: 0.0,
                }),
            };
            let template = Message {
                correlation_data: route.correlation_data,
                ..Message::new(route.topic, QoS::AtLeastOnce, Vec::new())
            };
            let _ = echo_publisher.publish_body(&template, &reply.to_cbor().expect("encodes")).await;
        }
    });
    let attachments: Vec<Attachment> = (0..3u8)
        .map(|i| Attachment {
            modality: i,
            name: format!("camera-{i}"),
            media_type: MediaType::ImageJpeg,
            data: (0..100_000u32).map(|j| (j.wrapping_mul(2_654_435_761) >> 24) as u8 ^ i).collect(),
        })
        .collect();
    let publisher = device_link.publisher();
    let mut r = Reassembler::new(ReassemblyLimits::default());
    let mut samples = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS + 20 {
        let req = CloudRequest {
            request_id: RequestId::generate(),
            device_id: device.clone(),
            dialogue_id: "bench".into(),
            turn: round as u32,
            task: "Query".into(),
            question: "What is on the counter?".into(),
            history: Vec::new(),
            attachments: attachments.clone(),
            deadline_unix_ms: u64::MAX,
            max_tokens: 64,
            stream: false,
        };
        let started = Instant::now();
        let template = Message {
            response_topic: Some(reply_topic.clone()),
            correlation_data: Some(req.request_id.to_correlation_data()),
            ..Message::new(req.topic().name(), QoS::AtLeastOnce, Vec::new())
        };
        publisher.publish_body(&template, &req.to_cbor().expect("encodes")).await.expect("published");
        let (_, body) = next_body(&mut device_link, &mut r).await;
        let reply = CloudReply::from_cbor(&body, 1 << 20).expect("reply decodes");
        assert_eq!(reply.request_id, req.request_id);
        if round >= 20 {
            samples.push(started.elapsed());
        }
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "loopback round trip, request with 3 x 100 kB frames in one packet, {ROUNDS} rounds: \
         median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.9).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3,
    );
}

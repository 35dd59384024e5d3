//! Encoding and chunking throughput: a cloud request with three 100 KB frames, encoded to CBOR,
//! split into 16 KiB frames and reassembled (with the sha256 check) as chunks on a reply topic
//! (requests themselves travel as one packet), and decoded.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tmo_protocol::chunk::new_message_id;
use tmo_protocol::{
    Attachment, CborMessage, CloudRequest, DeviceId, MediaType, Reassembler, ReassemblyLimits, RequestId,
    split,
};

fn request() -> CloudRequest {
    CloudRequest {
        request_id: RequestId(1),
        device_id: DeviceId::new("kitchen-1").expect("valid id"),
        dialogue_id: "d".into(),
        turn: 0,
        task: "Query".into(),
        question: "What is in the pan?".into(),
        history: Vec::new(),
        attachments: (0..3u8)
            .map(|i| Attachment {
                modality: i,
                name: format!("camera-{i}"),
                media_type: MediaType::ImageJpeg,
                data: (0..100_000u32).map(|j| (j.wrapping_mul(2_654_435_761) >> 24) as u8).collect(),
            })
            .collect(),
        deadline_unix_ms: u64::MAX,
        max_tokens: 64,
        stream: false,
    }
}

fn bench(c: &mut Criterion) {
    let req = request();
    let body = req.to_cbor().expect("encodes");
    let frames = split(&body, 16 * 1024, 1).expect("splits");
    let mut group = c.benchmark_group("request_300kB");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("encode_cbor", |b| b.iter(|| black_box(&req).to_cbor()));
    group.bench_function("decode_cbor", |b| b.iter(|| CloudRequest::from_cbor(black_box(&body), 1 << 20)));
    group.bench_function("split_16k", |b| b.iter(|| split(black_box(&body), 16 * 1024, new_message_id())));
    group.bench_function("reassemble_16k", |b| {
        let mut r = Reassembler::new(ReassemblyLimits::default());
        b.iter(|| {
            let now = Instant::now();
            let mut out = None;
            for f in &frames {
                out = r.accept("tmo/v1/dev/kitchen-1/cloud/reply", f, now).expect("accepts");
            }
            out.expect("complete")
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Writes the seed corpora of the fuzz targets into `fuzz/corpus/<target>/`: real messages made
//! with the crates' own types (as the daemon, bridge, collector and fleet tools send them),
//! small GGUF models written here, the shipped ONNX policy. Run from `fuzz/`:
//! `cargo run --example make_corpus --features heavy`.

use std::path::Path;

// Built with the fuzz targets' flags (scripts/fuzz), so that it reuses their build: the
// coverage instrumentation needs libFuzzer's runtime linked.
use libfuzzer_sys as _;

use ed25519_dalek::SigningKey;
use tmo_protocol::messages::*;
use tmo_protocol::{CborMessage, DeviceId, JsonMessage, PolicyBundle, PolicyManifest, Topic, split};
use tmod_api::{AskRequest, FeedbackRequest};

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

fn device() -> DeviceId {
    DeviceId::new("kitchen-a").expect("device id")
}

fn request() -> CloudRequest {
    CloudRequest {
        request_id: RequestId(0xfeed_beef),
        device_id: device(),
        dialogue_id: "d-7f3a".into(),
        turn: 2,
        task: "Recommendation".into(),
        question: "What can I cook with leeks and potatoes?".into(),
        history: vec![HistoryTurn { question: "Hi".into(), answer: "Hello, how can I help?".into() }],
        attachments: vec![Attachment {
            modality: 0,
            name: "camera-top".into(),
            media_type: MediaType::ImageJpeg,
            data: vec![0xff, 0xd8, 0xff, 0xe0, 0, 16, b'J', b'F', b'I', b'F', 0, 1, 0xff, 0xd9],
        }],
        deadline_unix_ms: 1_790_078_400_000,
        max_tokens: 256,
        stream: false,
    }
}

fn reply() -> CloudReply {
    CloudReply {
        request_id: RequestId(0xfeed_beef),
        backend_latency_ms: 812,
        bridge_latency_ms: 815,
        result: ReplyResult::Answer(CloudAnswer {
            answer: "Leek and potato soup.".into(),
            model: "gpt-4o-mini".into(),
            prompt_tokens: 1200,
            completion_tokens: 40,
            cost_usd: 0.000_204,
        }),
    }
}

fn batch() -> OutcomeBatch {
    let rows = (0..2)
        .map(|turn| {
            let row = tmo_edge_fuzz::sample_row("d-7f3a", turn, 1_790_078_400_000 + i64::from(turn));
            OutcomeRow {
                key: OutcomeKey { dialogue_id: row.dialogue_id.clone(), turn },
                row: serde_json::to_value(&row).expect("row as JSON"),
            }
        })
        .collect();
    OutcomeBatch { device_id: device(), batch_id: 17, rows }
}

fn manifest(onnx: &[u8]) -> PolicyManifest {
    PolicyManifest {
        version: "2026-09-22.1".into(),
        schema: "tmo-obs-v1".into(),
        onnx_sha256: String::new(),
        onnx_size_bytes: 0,
        opset: Some(17),
        training_data_sha256: Some("cd".repeat(32)),
        min_daemon_version: "0.2.0".into(),
        created_unix_ms: 1_790_000_000_000,
        canary_percent: Some(20),
        group: "kitchens".into(),
        devices: vec!["kitchen-a".into(), "kitchen-b".into()],
        sequence: 1_790_000_000_000,
        expires_unix_ms: 1_800_000_000_000,
    }
    .describe(onnx)
}

fn cbor_messages() {
    put("cbor_messages", "cloud-request", &request().to_cbor().unwrap());
    put("cbor_messages", "cloud-reply", &reply().to_cbor().unwrap());
    let error = CloudReply {
        result: ReplyResult::Error(CloudError { kind: CloudErrorKind::RateLimited, message: "429".into() }),
        ..reply()
    };
    put("cbor_messages", "cloud-reply-error", &error.to_cbor().unwrap());
    put("cbor_messages", "outcome-batch", &batch().to_cbor().unwrap());
    let piece =
        CloudChunk { request_id: RequestId(0x0123_4567_89ab_cdef), seq: 3, text: "Stir the soup ".into() };
    put("cbor_messages", "cloud-chunk", &piece.to_cbor().unwrap());
    let cancel = CloudCancel { request_id: RequestId(0x0123_4567_89ab_cdef) };
    put("cbor_messages", "cloud-cancel", &cancel.to_cbor().unwrap());
    let ack = OutcomeAck {
        batch_id: 17,
        accepted: vec![OutcomeKey { dialogue_id: "d-7f3a".into(), turn: 0 }],
        rejected: vec![RejectedRow {
            key: OutcomeKey { dialogue_id: "d-7f3a".into(), turn: 1 },
            reason: "propensity 0 is outside (0, 1]".into(),
        }],
    };
    put("cbor_messages", "outcome-ack", &ack.to_cbor().unwrap());
    let onnx = b"\x08\x08\x12\x0ctmo-edge-fuzz".to_vec();
    let bundle = PolicyBundle::sign(&manifest(&onnx), onnx, &SigningKey::from_bytes(&[7; 32])).unwrap();
    put("cbor_messages", "policy-bundle", &bundle.to_cbor().unwrap());
}

fn json_messages() {
    let status = DeviceStatus {
        v: 1,
        device_id: device(),
        online: true,
        daemon_version: "0.2.0".into(),
        group: Some("kitchens".parse().unwrap()),
        policy_version: Some("2026-09-22.1".into()),
        previous_policy_version: Some("2026-09-01.3".into()),
        policy_stats: vec![tmo_protocol::PolicyStats {
            version: "2026-09-22.1".into(),
            committed: true,
            decisions: 40,
            decision_failures: 0,
            cloud_attempts: 12,
            cloud_fallbacks: 1,
            scored: 9,
            score_sum: 7.5,
        }],
        last_policy_update: Some(PolicyUpdateReport {
            version: "2026-09-22.1".into(),
            accepted: true,
            reason: None,
            unix_ms: 1_790_000_000_000,
        }),
        counters: StatusCounters {
            requests: 120,
            local_answers: 80,
            cloud_answers: 38,
            cloud_fallbacks: 2,
            outcomes_logged: 120,
            outcomes_uploaded: 117,
            outcomes_upload_refused: 1,
            mean_reward: Some(0.71),
            energy_joules: Some(5021.5),
            last_outcome_unix_ms: Some(1_790_078_000_000),
        },
        updated_unix_ms: 1_790_078_400_000,
        extra: serde_json::from_str(r#"{"board":"rpi5","uptime_secs":86400}"#).unwrap(),
    };
    put("json_messages", "device-status", &status.to_json().unwrap());
    let score = JudgeScore {
        v: 1,
        request_id: RequestId(0xfeed_beef),
        dialogue_id: "d-7f3a".into(),
        turn: 2,
        score: 0.75,
        judge_model: "gpt-4o".into(),
    };
    put("json_messages", "judge-score", &score.to_json().unwrap());
}

fn topics() {
    let d = device();
    let g = "kitchens".parse().unwrap();
    let all = [
        Topic::CloudRequest(d.clone()),
        Topic::CloudReply(d.clone()),
        Topic::Score(d.clone()),
        Topic::Availability(d.clone()),
        Topic::Status(d.clone()),
        Topic::Outcomes(d.clone()),
        Topic::OutcomeAck(d.clone()),
        Topic::LinkProbe(d.clone()),
        Topic::Policy(g),
        Topic::CloudStream(d.clone()),
        Topic::CloudCancel(d),
    ];
    for (i, t) in all.iter().enumerate() {
        put("topic_parse", &format!("topic-{i}"), t.name().as_bytes());
    }
    put("topic_parse", "share-filter", b"$share/bridges/tmo/v1/dev/+/cloud/req");
}

fn reassembler() {
    let body = reply().to_cbor().unwrap();
    // Mode 0: body split into 60-byte data chunks, rotated by 3.
    let mut seed = vec![0, 0, 60, 3];
    seed.extend(&body);
    put("reassembler", "round-trip-reply", &seed);
    // Operations: the chunks of the reply on the reply topic, 30 ms apart, then a whole frame.
    let mut ops = vec![1];
    for frame in split(&body, 100, 0x1234).unwrap() {
        ops.extend([0, 1, frame.len() as u8]);
        ops.extend(&frame);
    }
    let whole =
        &split(&OutcomeAck { batch_id: 1, accepted: vec![], rejected: vec![] }.to_cbor().unwrap(), 200, 1)
            .unwrap()[0];
    ops.extend([1, 0, whole.len() as u8]);
    ops.extend(whole);
    put("reassembler", "ops-chunks-then-whole", &ops);
    // A chunk on the outcomes topic (refused) and a repeated chunk.
    let frames = split(&request().to_cbor().unwrap(), 120, 9).unwrap();
    let mut ops = vec![1];
    for (source, frame) in [(2u8, &frames[0]), (0, &frames[0]), (0, &frames[0]), (0, &frames[1])] {
        ops.extend([source, 200, frame.len() as u8]);
        ops.extend(frame);
    }
    put("reassembler", "ops-refused-and-duplicate", &ops);
}

fn bundles() {
    let onnx: Vec<u8> = std::fs::read("../policy-onnx/policies/default.onnx").unwrap()[..600].to_vec();
    let key = SigningKey::from_bytes(&[7; 32]);
    let bundle = PolicyBundle::sign(&manifest(&onnx), onnx.clone(), &key).unwrap();
    let mut seed = vec![0];
    seed.extend(bundle.to_cbor().unwrap());
    put("bundle_verify", "signed-bundle", &seed);
    let mut seed = vec![1];
    seed.extend((bundle.manifest.len() as u16).to_be_bytes());
    seed.extend(&bundle.manifest);
    seed.extend(&onnx);
    put("bundle_verify", "manifest-and-onnx", &seed);
    let untrusted = PolicyBundle::sign(&manifest(&onnx), onnx, &SigningKey::from_bytes(&[9; 32])).unwrap();
    let mut seed = vec![0];
    seed.extend(untrusted.to_cbor().unwrap());
    put("bundle_verify", "untrusted-bundle", &seed);
}

fn api() {
    let ask = AskRequest::new(Some("d-7f3a"), "What can I cook with leeks?");
    put("api_request", "ask", &serde_json::to_vec(&ask).unwrap());
    let ask =
        AskRequest { task: Some("Recommendation".into()), stream: false, ..AskRequest::new(None, "Soup?") };
    put("api_request", "ask-task-no-stream", &serde_json::to_vec(&ask).unwrap());
    let feedback = FeedbackRequest { dialogue_id: "d-7f3a".into(), turn: 2, score: 0.8 };
    put("api_request", "feedback", &serde_json::to_vec(&feedback).unwrap());
    put("api_request", "ask-escapes", br#"{"text":"caf\u00e9 \ud83c\udf72 \"soup\"\n","dialogue_id":null}"#);
}

fn policies() {
    let default = std::fs::read("../policy-onnx/policies/default.onnx").unwrap();
    put("policy_from_bytes", "default.onnx", &default);
}

fn dataset() {
    let line = |turn: u32| {
        let row = tmo_edge_fuzz::sample_row("d-7f3a", turn, 1_790_078_400_000 + i64::from(turn));
        let record = outcome_log::dataset::DatasetRecord {
            device_id: "kitchen-a".into(),
            received_unix_ms: 1_790_078_401_000,
            outcome: row,
        };
        let mut line = serde_json::to_vec(&record).unwrap();
        line.push(b'\n');
        line
    };
    put("dataset_lines", "one-row.jsonl", &line(0));
    let mut torn = [line(0), line(1)].concat();
    torn.extend(&line(2)[..200]);
    put("dataset_lines", "two-rows-and-a-torn-tail.jsonl", &torn);
    let mut damaged = line(0);
    damaged
        .extend(b"{\"device_id\":\"kitchen-b\",\"outcome\":{\"dialogue_id\":\"x\",\"turn\":1}}\nnot json\n");
    damaged.extend(line(1));
    put("dataset_lines", "damaged-middle.jsonl", &damaged);
}

/// A GGUF v3 file: metadata, then F32 tensors (dims innermost first, as GGUF stores them).
fn gguf(metadata: &[(&str, Value)], tensors: &[(&str, Vec<u64>)]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        string(&mut out, key);
        match value {
            Value::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Value::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            Value::Strs(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for s in items {
                    string(&mut out, s);
                }
            }
        }
    }
    let mut offset = 0u64;
    let mut sizes = Vec::new();
    for (name, dims) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(0u32.to_le_bytes()); // F32
        out.extend(offset.to_le_bytes());
        let bytes = dims.iter().product::<u64>() * 4;
        sizes.push(bytes);
        offset += bytes.div_ceil(32) * 32;
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    for (i, bytes) in sizes.iter().enumerate() {
        let values = (0..bytes / 4).map(|k| ((k + i as u64) % 7) as f32 * 0.01 - 0.03);
        let mut data: Vec<u8> = values.flat_map(f32::to_le_bytes).collect();
        data.resize((*bytes).div_ceil(32) as usize * 32, 0);
        out.extend(data);
    }
    out
}

enum Value {
    U32(u32),
    Str(&'static str),
    Strs(Vec<&'static str>),
}

fn gguf_models() {
    let tokens =
        vec!["<|im_start|>", "<|im_end|>", "H", "e", "l", "o", "Ġ", "w", "r", "d", "He", "ll", "llo"];
    let vocab = tokens.len() as u64;
    let (hidden, ffn) = (8u64, 16u64);
    let metadata = vec![
        ("general.architecture", Value::Str("llama")),
        ("general.name", Value::Str("tiny fuzz llama")),
        ("llama.context_length", Value::U32(64)),
        ("llama.embedding_length", Value::U32(hidden as u32)),
        ("llama.block_count", Value::U32(1)),
        ("llama.feed_forward_length", Value::U32(ffn as u32)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("tokenizer.ggml.model", Value::Str("gpt2")),
        ("tokenizer.ggml.pre", Value::Str("smollm")),
        ("tokenizer.ggml.tokens", Value::Strs(tokens)),
        ("tokenizer.ggml.merges", Value::Strs(vec!["H e", "l l", "ll o"])),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
    ];
    let head_dim = hidden / 2;
    let tensors = vec![
        ("token_embd.weight", vec![hidden, vocab]),
        ("output_norm.weight", vec![hidden]),
        ("blk.0.attn_norm.weight", vec![hidden]),
        ("blk.0.attn_q.weight", vec![hidden, hidden]),
        ("blk.0.attn_k.weight", vec![hidden, head_dim]),
        ("blk.0.attn_v.weight", vec![hidden, head_dim]),
        ("blk.0.attn_output.weight", vec![hidden, hidden]),
        ("blk.0.ffn_norm.weight", vec![hidden]),
        ("blk.0.ffn_gate.weight", vec![hidden, ffn]),
        ("blk.0.ffn_up.weight", vec![hidden, ffn]),
        ("blk.0.ffn_down.weight", vec![ffn, hidden]),
    ];
    put("gguf_load", "tiny-llama.gguf", &gguf(&metadata, &tensors));
    put("gguf_load", "header-only.gguf", &gguf(&metadata, &[]));
    // The start of a real model's header (magic, counts, the first metadata), cut short.
    for (name, file) in [
        ("smollm2-head.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ("gemma3-head.gguf", "gemma-3-270m-q4_k_m.gguf"),
    ] {
        let Ok(dir) = llm_engine::default_model_dir() else { return };
        let path = dir.join(file);
        if let Ok(bytes) = std::fs::read(&path) {
            put("gguf_load", name, &bytes[..2048]);
        }
    }
}

fn main() {
    cbor_messages();
    json_messages();
    topics();
    reassembler();
    bundles();
    api();
    policies();
    dataset();
    gguf_models();
    println!("corpora written under fuzz/corpus/");
}

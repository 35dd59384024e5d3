//! tmod's OpenAI-compatible API (`/v1/chat/completions`, `/v1/models`) against the official
//! `openai` Python package (PyPI; `scripts/setup` installs it), over loopback TCP with a real
//! `tmod run`: models listed, a plain and a streamed completion, a two-turn conversation kept
//! as one dialogue, errors as OpenAI's. Test names hold `serving`, as the other API tests.

use std::process::Command;

#[path = "support/daemon.rs"]
mod daemon;

use daemon::Daemon;

fn tcp_daemon(state: &std::path::Path) -> (Daemon, u16) {
    let port = tmo_protocol::testing::free_port().expect("port");
    let daemon =
        Daemon::start(state, &format!("[model]\nmax_tokens = 24\n[api]\ntcp = \"127.0.0.1:{port}\"\n"));
    (daemon, port)
}

#[test]
fn serving_openai_sdk_lists_models_completes_streams_and_keeps_a_conversation_as_one_dialogue() {
    let probe = Command::new("python3").args(["-c", "import openai"]).output().expect("python3 runs");
    assert!(
        probe.status.success(),
        "the `openai` Python package is missing (scripts/setup installs it): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let state = tempfile::tempdir().expect("tempdir");
    let (_daemon, port) = tcp_daemon(state.path());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/openai_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .output()
        .expect("python3 runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the openai client failed:\n{stdout}\n{stderr}");
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("the client's summary");
    assert_eq!(seen["first"]["model"], "smollm2-135m", "{seen}");
    assert_eq!(seen["second"]["dialogue_id"], seen["first"]["dialogue_id"]);

    // Every completion was a logged turn of a device dialogue: two of the conversation, one
    // streamed, one forced local (logged as forced, so off-policy estimates leave it out).
    let db = rusqlite::Connection::open(state.path().join("outcomes.sqlite")).expect("log");
    let turns: Vec<(String, u32, bool)> = db
        .prepare("SELECT dialogue_id, turn, forced FROM outcomes ORDER BY created_at_ms")
        .expect("query")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows");
    let dialogue = seen["first"]["dialogue_id"].as_str().expect("id");
    assert_eq!(turns.len(), 4, "{turns:?}");
    assert_eq!(turns[..2], [(dialogue.to_owned(), 0, false), (dialogue.to_owned(), 1, false)]);
    assert!(turns[2].0 != dialogue && !turns[2].2, "a new conversation is a new dialogue");
    assert_eq!(turns[3], (seen["forced"]["dialogue_id"].as_str().expect("id").to_owned(), 0, true));
}

#[test]
fn serving_openai_stop_sequences_cut_the_answer_and_bad_requests_get_openai_errors() {
    let state = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(state.path(), "[model]\nmax_tokens = 24\n");
    let client = daemon.client();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let post = |body: Vec<u8>| {
            let client = client.clone();
            async move {
                let (status, bytes) =
                    client.raw(hyper::Method::POST, "/v1/chat/completions", Some(body)).await.expect("request");
                (status.as_u16(), serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default())
            }
        };
        let json = |v: serde_json::Value| v.to_string().into_bytes();
        // Greedy, so the same question gives the same answer: cut it at its second word.
        let question = serde_json::json!([{ "role": "user", "content": "Say a short sentence about bread." }]);
        let plain = post(json(serde_json::json!({ "model": "tmo", "messages": question, "max_tokens": 12 }))).await;
        assert_eq!(plain.0, 200, "{}", plain.1);
        let full = plain.1["choices"][0]["message"]["content"].as_str().expect("content").to_owned();
        let word = full.split_whitespace().nth(1).expect("two words").to_owned();
        let body = serde_json::json!({ "model": "tmo", "messages": question, "max_tokens": 12, "stop": [word] });
        let cut = post(json(body)).await;
        assert_eq!(cut.0, 200, "{}", cut.1);
        let content = cut.1["choices"][0]["message"]["content"].as_str().expect("content");
        assert_eq!(content, &full[..full.find(&word).expect("word")], "{}", cut.1);
        assert_eq!(cut.1["choices"][0]["finish_reason"], "stop");

        for (body, status, param) in [
            (serde_json::json!({ "model": "tmo", "messages": [] }), 400, "messages"),
            (serde_json::json!({ "model": "tmo", "messages": question, "temperature": 3 }), 400, "temperature"),
            (serde_json::json!({ "model": "tmo", "messages": question, "tools": [{ "type": "function" }] }), 400, "tools"),
            (serde_json::json!({ "model": "tmo", "messages": question, "stop": ["a", "b", "c", "d", "e"] }), 400, "stop"),
            (serde_json::json!({ "model": "other", "messages": question }), 404, "model"),
        ] {
            let (got, error) = post(json(body.clone())).await;
            assert_eq!(got, status, "{body}: {error}");
            assert_eq!(error["error"]["param"], param, "{error}");
            assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        }
        let (got, error) = post(b"{not json".to_vec()).await;
        assert_eq!(got, 400, "{error}");
        assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("could not parse")), "{error}");
    });
}

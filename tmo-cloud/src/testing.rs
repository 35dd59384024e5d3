//! For tests and benches (feature `testing`): an OpenAI-compatible chat-completions server on a
//! free loopback port that answers in words at a set pace, streamed as server-sent events when
//! asked (`stream: true`, with the usage chunk of `stream_options.include_usage`) or whole, and
//! records what it served: when each request's first word went out, how many went, and whether
//! the client read the stream to its end or dropped it.
//!
//! The first word of the question picks the answer: `long` answers [`LONG_WORDS`] words,
//! `refuse-images` answers a request with images as llama.cpp's text-only server does (HTTP 500
//! "image input is not supported"), anything else [`SHORT_WORDS`] words. Word `i` is `w{i} `.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio_stream::StreamExt as _;

/// Words of a `long` answer.
pub const LONG_WORDS: usize = 400;
/// Words of any other answer.
pub const SHORT_WORDS: usize = 8;

/// How a request's answer ended at the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every word and the end of the stream went out.
    Completed,
    /// The client closed the stream before its end.
    Dropped,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Served {
    /// The last user message's text.
    pub question: String,
    /// Whether the answer was streamed.
    pub stream: bool,
    /// When the request arrived.
    pub arrived: Instant,
    /// When each word went out (streamed answers).
    pub word_times: Vec<Instant>,
    /// How it ended (`None` while it streams).
    pub ended: Option<Ended>,
}

/// The answer of `words` words: `w0 w1 ...`, each word with its space.
pub fn answer_text(words: usize) -> String {
    (0..words).map(word).collect()
}

fn word(i: usize) -> String {
    format!("w{i} ")
}

#[derive(Debug, Default)]
struct Book {
    served: Mutex<Vec<Served>>,
}

impl Book {
    fn update(&self, index: usize, f: impl FnOnce(&mut Served)) {
        f(&mut self.served.lock().unwrap_or_else(PoisonError::into_inner)[index]);
    }
}

/// The server; it stops with the runtime that started it.
#[derive(Debug)]
pub struct ChatServer {
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    book: Arc<Book>,
}

impl ChatServer {
    /// Starts a server whose words go out `pace` apart.
    pub async fn start(pace: Duration) -> std::io::Result<Self> {
        let book = Arc::new(Book::default());
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(completions))
            .with_state((book.clone(), pace));
        use axum::serve::ListenerExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        // Each word goes out as it is written, as servers that stream do.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { base_url, book })
    }

    /// Every request so far, oldest first.
    pub fn served(&self) -> Vec<Served> {
        self.book.served.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Waits at most `timeout` for the request whose question starts with `prefix` to end.
    pub async fn wait_ended(&self, prefix: &str, timeout: Duration) -> Option<Served> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            let found =
                self.served().into_iter().find(|s| s.question.starts_with(prefix) && s.ended.is_some());
            if found.is_some() {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

/// The text of the last user message (a string or its text parts), and its image parts.
fn question_of(body: &Value) -> (String, usize) {
    let last = body["messages"].as_array().and_then(|m| m.last()).cloned().unwrap_or(Value::Null);
    match &last["content"] {
        Value::String(s) => (s.clone(), 0),
        Value::Array(parts) => {
            let text = parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(" ");
            (text, parts.iter().filter(|p| p["type"] == "image_url").count())
        }
        _ => (String::new(), 0),
    }
}

async fn completions(State((book, pace)): State<(Arc<Book>, Duration)>, Json(body): Json<Value>) -> Response {
    let (question, images) = question_of(&body);
    let stream = body["stream"] == true;
    let model = body["model"].as_str().unwrap_or("test-model").to_owned();
    let scenario = question.split_whitespace().next().unwrap_or_default().to_owned();
    if scenario == "refuse-images" && images > 0 {
        let error = json!({"error": {"code": 500, "message": "image input is not supported", "type": "server_error"}});
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(error)).into_response();
    }
    let words = if scenario == "long" { LONG_WORDS } else { SHORT_WORDS };
    let index = {
        let mut served = book.served.lock().unwrap_or_else(PoisonError::into_inner);
        served.push(Served {
            question,
            stream,
            arrived: Instant::now(),
            word_times: Vec::new(),
            ended: None,
        });
        served.len() - 1
    };
    let usage = json!({"prompt_tokens": 100, "completion_tokens": words, "total_tokens": 100 + words});
    if !stream {
        tokio::time::sleep(pace * words as u32).await;
        book.update(index, |s| s.ended = Some(Ended::Completed));
        return Json(json!({
            "id": "chatcmpl-test", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer_text(words)}, "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    let (events, sent) = tokio::sync::mpsc::channel::<String>(1);
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let mut ended = Ended::Completed;
        let mut frames = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null).to_string()];
        for i in 0..words {
            frames.push(chunk(json!({"content": word(i)}), Value::Null).to_string());
        }
        frames.push(chunk(json!({}), json!("stop")).to_string());
        frames
            .push(json!({"id": "chatcmpl-test", "model": model, "choices": [], "usage": usage}).to_string());
        frames.push("[DONE]".into());
        for (n, frame) in frames.into_iter().enumerate() {
            let is_word = (1..=words).contains(&n);
            if is_word {
                tokio::time::sleep(pace).await;
            }
            if events.send(format!("data: {frame}\n\n")).await.is_err() {
                ended = Ended::Dropped;
                break;
            }
            if is_word {
                book.update(index, |s| s.word_times.push(Instant::now()));
            }
        }
        if ended == Ended::Completed {
            // The stream ends when the sender goes; a client gone meanwhile is not seen.
            drop(events);
        }
        book.update(index, |s| s.ended = Some(ended));
    });
    let body = tokio_stream::wrappers::ReceiverStream::new(sent).map(|e| Ok::<_, Infallible>(Bytes::from(e)));
    ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(body)).into_response()
}

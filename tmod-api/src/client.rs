//! A client of tmod's API: one HTTP/1.1 connection per call, over a Unix socket or TCP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{AskEvent, AskRequest, AskResponse, DialogueCreated, ErrorBody, FeedbackRequest};

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "http://{addr}"),
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to tmod at {endpoint}: {source}")]
    Connect { endpoint: Endpoint, source: std::io::Error },
    #[error("HTTP error talking to tmod: {0}")]
    Http(#[from] hyper::Error),
    #[error("tmod answered {status}: {message}")]
    Status { status: StatusCode, message: String, retry_after_secs: Option<u64> },
    #[error("tmod sent a body this client does not understand: {0}")]
    Body(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// A client of one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    timeout: Duration,
}

impl Client {
    /// A client of the daemon at `endpoint`; calls time out after 10 minutes by default.
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint, timeout: Duration::from_secs(600) }
    }

    /// Sets the time limit of every call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Asks a question, calling `on_event` for every event as it arrives. Returns the final
    /// outcome (or the error event as [`ClientError::Status`]).
    pub async fn ask(
        &self,
        request: &AskRequest,
        mut on_event: impl FnMut(&AskEvent),
    ) -> Result<AskResponse, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Body(e.to_string()))?;
        let run = async {
            let response = self.send(Method::POST, "/v1/ask", Some(body)).await?;
            let mut response = check_status(response).await?;
            if !request.stream {
                return parse_json(&response.into_body().collect().await?.to_bytes());
            }
            let mut parser = SseParser::default();
            let mut decision = None;
            while let Some(frame) = response.body_mut().frame().await {
                let Ok(data) = frame?.into_data() else { continue };
                for (name, data) in parser.push(&data) {
                    let event = parse_event(&name, &data)?;
                    on_event(&event);
                    match event {
                        AskEvent::Decision(d) => decision = Some(d),
                        AskEvent::Outcome(outcome) => {
                            let decision = decision
                                .take()
                                .ok_or_else(|| ClientError::Body("outcome before decision".into()))?;
                            return Ok(AskResponse { decision, outcome });
                        }
                        AskEvent::Error(message) => {
                            return Err(ClientError::Status {
                                status: StatusCode::INTERNAL_SERVER_ERROR,
                                message,
                                retry_after_secs: None,
                            });
                        }
                        AskEvent::Token(_) => {}
                    }
                }
            }
            Err(ClientError::Body("the event stream ended without an outcome".into()))
        };
        self.timed(run).await
    }

    /// Starts a dialogue.
    pub async fn new_dialogue(&self) -> Result<DialogueCreated, ClientError> {
        self.timed(async {
            parse_json(&self.call(Method::POST, "/v1/dialogues", Some(b"{}".to_vec())).await?)
        })
        .await
    }

    /// Scores turn `turn` of a dialogue.
    pub async fn feedback(&self, request: &FeedbackRequest) -> Result<serde_json::Value, ClientError> {
        self.post_json("/v1/feedback", request).await
    }

    /// The daemon's status report.
    pub async fn status(&self) -> Result<serde_json::Value, ClientError> {
        self.timed(async { parse_json(&self.call(Method::GET, "/v1/status", None).await?) }).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        self.timed(async {
            let bytes = self.call(Method::GET, "/metrics", None).await?;
            String::from_utf8(bytes.to_vec()).map_err(|e| ClientError::Body(e.to_string()))
        })
        .await
    }

    /// Sends `body` as it is (for tests of malformed requests) and returns status and body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.timed(async {
            let response = self.send(method, path, body).await?;
            let status = response.status();
            Ok((status, response.into_body().collect().await?.to_bytes()))
        })
        .await
    }

    async fn post_json<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<R, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Body(e.to_string()))?;
        self.timed(async { parse_json(&self.call(Method::POST, path, Some(body)).await?) }).await
    }

    async fn timed<T>(&self, call: impl Future<Output = Result<T, ClientError>>) -> Result<T, ClientError> {
        tokio::time::timeout(self.timeout, call).await.map_err(|_| ClientError::Timeout(self.timeout))?
    }

    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes, ClientError> {
        let response = check_status(self.send(method, path, body).await?).await?;
        Ok(response.into_body().collect().await?.to_bytes())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>, ClientError> {
        let connect_error = |source| ClientError::Connect { endpoint: self.endpoint.clone(), source };
        let mut sender = match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(connect_error)?;
                handshake(stream).await?
            }
            Endpoint::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr).await.map_err(connect_error)?;
                handshake(stream).await?
            }
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "tmod")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Body(e.to_string()))?;
        Ok(sender.send_request(request).await?)
    }
}

async fn handshake<S>(stream: S) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // The connection ends with the response; its error, if any, surfaced through the sender.
        let _ = connection.await;
    });
    Ok(sender)
}

async fn check_status(response: Response<Incoming>) -> Result<Response<Incoming>, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after_secs = response
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let bytes = response.into_body().collect().await?.to_bytes();
    let message = serde_json::from_slice::<ErrorBody>(&bytes)
        .map(|b| b.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
    Err(ClientError::Status { status, message, retry_after_secs })
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|e| ClientError::Body(e.to_string()))
}

fn parse_event(name: &str, data: &str) -> Result<AskEvent, ClientError> {
    let bad = |e: serde_json::Error| ClientError::Body(format!("{name} event: {e}"));
    Ok(match name {
        "decision" => AskEvent::Decision(serde_json::from_str(data).map_err(bad)?),
        "token" => AskEvent::Token(serde_json::from_str(data).map_err(bad)?),
        "outcome" => AskEvent::Outcome(serde_json::from_str(data).map_err(bad)?),
        "error" => AskEvent::Error(serde_json::from_str::<ErrorBody>(data).map_err(bad)?.error),
        other => return Err(ClientError::Body(format!("unknown event {other:?}"))),
    })
}

/// Splits a server-sent event stream into (event name, data) pairs as bytes arrive.
#[derive(Debug, Default)]
struct SseParser {
    pending: Vec<u8>,
    name: String,
    data: String,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() || !self.name.is_empty() {
                    let name = if self.name.is_empty() {
                        "message".to_owned()
                    } else {
                        std::mem::take(&mut self.name)
                    };
                    events.push((name, std::mem::take(&mut self.data)));
                }
            } else if let Some(value) = line.strip_prefix("event:") {
                self.name = value.trim_start().to_owned();
            } else if let Some(value) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value.strip_prefix(' ').unwrap_or(value));
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_chunks() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"event: token\nda").is_empty());
        let events = parser.push(b"ta: \"a\\nb\"\n\n: comment\nevent: outcome\ndata: {}\n\n");
        assert_eq!(
            events,
            vec![("token".to_owned(), "\"a\\nb\"".to_owned()), ("outcome".to_owned(), "{}".to_owned())]
        );
    }

    #[test]
    fn ask_request_defaults_to_streaming() {
        let request: AskRequest = serde_json::from_str(r#"{"text": "hi"}"#).expect("parse");
        assert!(request.stream);
        assert_eq!(request.dialogue_id, None);
        assert!(serde_json::from_str::<AskRequest>(r#"{"text": "hi", "colour": 1}"#).is_err());
    }
}

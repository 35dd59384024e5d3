//! Backends: what answers a cloud request.

use std::time::Instant;

use tmo_protocol::{CloudErrorKind, CloudRequest, MediaType};

use crate::candle::CandleBackend;
use crate::openai::OpenAiBackend;

/// Where a backend sends the text of an answer as it is generated (pieces in order; their
/// concatenation is the answer's text). A closed receiver means nobody reads them any more.
pub type Pieces = tokio::sync::mpsc::UnboundedSender<String>;

/// What a backend answered.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendAnswer {
    /// The answer text.
    pub text: String,
    /// The model that answered (as the backend names it).
    pub model: String,
    /// Prompt tokens billed.
    pub prompt_tokens: u32,
    /// Completion tokens billed.
    pub completion_tokens: u32,
    /// Images sent to the model (billed by the price table's `per_image_usd`).
    pub images_sent: u32,
    /// HTTP attempts (1 without retries; 1 for the candle backend).
    pub attempts: u32,
}

/// Why a backend did not answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The deadline passed first.
    #[error("deadline passed after {attempts} attempt(s){}", last.as_ref().map(|l| format!(" (last: {l})")).unwrap_or_default())]
    Deadline {
        /// Attempts made.
        attempts: u32,
        /// The last failure before the deadline, if any.
        last: Option<String>,
    },
    /// HTTP 429 on every attempt.
    #[error("rate limited (HTTP 429) after {attempts} attempt(s)")]
    RateLimited {
        /// Attempts made.
        attempts: u32,
    },
    /// HTTP 5xx on every attempt, or the server could not be reached.
    #[error("backend failed after {attempts} attempt(s): {detail}")]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        detail: String,
    },
    /// The server answered 2xx with a body that is not a chat completion.
    #[error("malformed chat completion: {0}")]
    Malformed(String),
    /// The server refused the request (HTTP 4xx other than 429).
    #[error("request refused with HTTP {status}: {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The request cannot be sent (e.g. nothing left after dropping attachments).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The local engine failed.
    #[error("engine: {0}")]
    Engine(String),
    /// The local engine's queue is full.
    #[error("engine queue full")]
    Overloaded,
}

impl BackendError {
    /// The protocol's error kind for this failure.
    pub fn kind(&self) -> CloudErrorKind {
        match self {
            Self::Deadline { .. } => CloudErrorKind::DeadlineExceeded,
            Self::RateLimited { .. } => CloudErrorKind::RateLimited,
            Self::Unavailable { .. } | Self::Malformed(_) | Self::Engine(_) => CloudErrorKind::Backend,
            Self::Refused { .. } | Self::BadRequest(_) => CloudErrorKind::BadRequest,
            Self::Overloaded => CloudErrorKind::Overloaded,
        }
    }
}

/// The configured backend.
#[derive(Debug)]
pub enum Backend {
    /// An OpenAI-compatible endpoint.
    OpenAi(Box<OpenAiBackend>),
    /// The candle engine on its thread.
    Candle(CandleBackend),
}

impl Backend {
    /// Answers `request` before `deadline` (the caller also enforces it), sending the text to
    /// `pieces` as it is generated when given. Dropping the future stops the backend call: the
    /// HTTP stream is closed, the candle engine stops generating.
    pub async fn answer(
        &self,
        request: &CloudRequest,
        system_prompt: &str,
        deadline: Instant,
        pieces: Option<&Pieces>,
    ) -> Result<BackendAnswer, BackendError> {
        match self {
            Self::OpenAi(b) => b.answer(request, system_prompt, deadline, pieces).await,
            Self::Candle(b) => b.answer(request, system_prompt, deadline, pieces).await,
        }
    }

    /// The configured model name.
    pub fn model(&self) -> &str {
        match self {
            Self::OpenAi(b) => b.model(),
            Self::Candle(b) => b.model(),
        }
    }
}

/// How many camera views and audio clips a request carries.
pub(crate) fn count_media(request: &CloudRequest) -> (usize, usize) {
    let images = request.attachments.iter().filter(|a| a.media_type == MediaType::ImageJpeg).count();
    (images, request.attachments.len() - images)
}

/// The text describing attachments a model does not receive, appended to the question.
pub(crate) fn describe_attachments(images: usize, audio: usize) -> Option<String> {
    let mut parts = Vec::new();
    if images > 0 {
        parts.push(format!("[{images} camera view{} attached]", if images == 1 { "" } else { "s" }));
    }
    if audio > 0 {
        parts.push(format!("[{audio} audio clip{} attached]", if audio == 1 { "" } else { "s" }));
    }
    (!parts.is_empty()).then(|| parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachments_are_described() {
        assert_eq!(describe_attachments(0, 0), None);
        assert_eq!(describe_attachments(3, 0).as_deref(), Some("[3 camera views attached]"));
        assert_eq!(
            describe_attachments(1, 1).as_deref(),
            Some("[1 camera view attached] [1 audio clip attached]")
        );
    }

    #[test]
    fn errors_map_to_protocol_kinds() {
        assert_eq!(BackendError::RateLimited { attempts: 3 }.kind(), CloudErrorKind::RateLimited);
        assert_eq!(BackendError::Malformed("x".into()).kind(), CloudErrorKind::Backend);
        assert_eq!(
            BackendError::Deadline { attempts: 1, last: None }.kind(),
            CloudErrorKind::DeadlineExceeded
        );
        assert_eq!(
            BackendError::Refused { status: 400, body: String::new() }.kind(),
            CloudErrorKind::BadRequest
        );
    }
}

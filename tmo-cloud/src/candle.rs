//! The candle backend: a local GGUF (llm-engine) on a dedicated thread, for a self-hosted
//! text-only cloud. Attachments are described in the prompt (`[3 camera views attached]`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Instant;

use llm_engine::{ChatMessage, Engine, EngineConfig, GenerationParams, resolve_model};
use tmo_protocol::CloudRequest;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::backend::{BackendAnswer, BackendError, Pieces, count_media, describe_attachments};
use crate::config::CandleConfig;

/// The engine could not be started.
#[derive(Debug, thiserror::Error)]
pub enum CandleSetupError {
    /// The model could not be found or loaded.
    #[error("backend.model {model:?}: {source}")]
    Model {
        /// The configured model.
        model: String,
        /// The engine's error.
        source: llm_engine::EngineError,
    },
    /// The engine thread could not be spawned.
    #[error("spawning the engine thread: {0}")]
    Thread(std::io::Error),
}

struct Job {
    messages: Vec<ChatMessage>,
    max_tokens: u32,
    deadline: Instant,
    pieces: Option<Pieces>,
    /// Set when the caller no longer waits (its future dropped): a queued job is skipped, a
    /// running one stops at its next token.
    cancel: Arc<AtomicBool>,
    reply: oneshot::Sender<Result<BackendAnswer, BackendError>>,
}

/// Sets the flag when dropped: the answer's future went away.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A GGUF model answering on its own thread, one request at a time.
#[derive(Debug)]
pub struct CandleBackend {
    jobs: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    model: String,
}

impl CandleBackend {
    /// Loads the model (blocking: call before serving) and starts its thread.
    pub fn start(config: &CandleConfig) -> Result<Self, CandleSetupError> {
        let model_err = |source| CandleSetupError::Model { model: config.model.clone(), source };
        let path = resolve_model(&config.model).map_err(model_err)?;
        let engine_config =
            EngineConfig { threads: config.threads, max_context_tokens: config.max_context_tokens };
        let engine = Engine::load(&path, &engine_config).map_err(model_err)?;
        info!(
            model = %config.model,
            path = %path.display(),
            load_ms = engine.info().load_time.as_millis() as u64,
            context = engine.info().context_len,
            "candle model loaded"
        );
        let (tx, rx) = sync_channel::<Job>(config.queue_capacity);
        let model = config.model.clone();
        let thread_model = model.clone();
        let thread = std::thread::Builder::new()
            .name("tmo-cloud-candle".into())
            .spawn(move || {
                let mut engine = engine;
                while let Ok(job) = rx.recv() {
                    let result = run_job(&mut engine, &thread_model, &job);
                    let _ = job.reply.send(result);
                }
            })
            .map_err(CandleSetupError::Thread)?;
        Ok(Self { jobs: Some(tx), thread: Some(thread), model })
    }

    /// The configured model.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Answers `request` on the engine thread before `deadline`, each token's text to `pieces`
    /// when given. Dropping the future stops the generation at its next token.
    pub async fn answer(
        &self,
        request: &CloudRequest,
        system_prompt: &str,
        deadline: Instant,
        pieces: Option<&Pieces>,
    ) -> Result<BackendAnswer, BackendError> {
        let (reply, answer) = oneshot::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let _stop_when_dropped = CancelOnDrop(cancel.clone());
        let job = Job {
            messages: chat_messages(request, system_prompt),
            max_tokens: request.max_tokens,
            deadline,
            pieces: pieces.cloned(),
            cancel,
            reply,
        };
        let jobs = self.jobs.as_ref().ok_or_else(|| BackendError::Engine("engine stopped".into()))?;
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(BackendError::Overloaded),
            Err(TrySendError::Disconnected(_)) => {
                return Err(BackendError::Engine("engine thread ended".into()));
            }
        }
        answer.await.map_err(|_| BackendError::Engine("engine thread ended".into()))?
    }
}

impl Drop for CandleBackend {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("engine thread panicked");
        }
    }
}

fn run_job(engine: &mut Engine, model: &str, job: &Job) -> Result<BackendAnswer, BackendError> {
    if job.cancel.load(Ordering::Relaxed) {
        return Err(BackendError::Engine("cancelled in the engine queue".into()));
    }
    if Instant::now() >= job.deadline {
        return Err(BackendError::Deadline { attempts: 0, last: Some("expired in the engine queue".into()) });
    }
    let params = GenerationParams {
        max_tokens: job.max_tokens as usize,
        deadline: Some(job.deadline),
        ..GenerationParams::default()
    };
    let mut on_text = |piece: &str| {
        if let Some(pieces) = &job.pieces {
            let _ = pieces.send(piece.to_owned());
        }
    };
    let generation = engine
        .chat(&job.messages, &params, Some(&job.cancel), &mut on_text)
        .map_err(|e| BackendError::Engine(e.to_string()))?;
    match generation.report.finish {
        llm_engine::FinishReason::Deadline => {
            return Err(BackendError::Deadline {
                attempts: 1,
                last: Some("generation cut at the deadline".into()),
            });
        }
        llm_engine::FinishReason::Cancelled => {
            info!(generated = generation.report.generated_tokens, "generation cancelled");
            return Err(BackendError::Engine("cancelled".into()));
        }
        _ => {}
    }
    Ok(BackendAnswer {
        // A streamed answer is exactly its pieces, which the device has shown already.
        text: if job.pieces.is_some() { generation.text } else { generation.text.trim().to_owned() },
        model: model.to_owned(),
        prompt_tokens: u32::try_from(generation.report.prompt_tokens).unwrap_or(u32::MAX),
        completion_tokens: u32::try_from(generation.report.generated_tokens).unwrap_or(u32::MAX),
        images_sent: 0,
        attempts: 1,
    })
}

/// The dialogue as chat messages: system prompt, history, then the question with its
/// attachments described.
pub fn chat_messages(request: &CloudRequest, system_prompt: &str) -> Vec<ChatMessage> {
    let mut messages = vec![ChatMessage::system(system_prompt)];
    for turn in &request.history {
        messages.push(ChatMessage::user(turn.question.clone()));
        messages.push(ChatMessage::assistant(turn.answer.clone()));
    }
    let (images, audio) = count_media(request);
    let question = match describe_attachments(images, audio) {
        Some(d) => format!("{}\n\n{d}", request.question),
        None => request.question.clone(),
    };
    messages.push(ChatMessage::user(question));
    messages
}

#[cfg(test)]
mod tests {
    use super::*;
    use tmo_protocol::{Attachment, DeviceId, HistoryTurn, MediaType, RequestId};

    #[test]
    fn prompt_describes_camera_views() {
        let request = CloudRequest {
            request_id: RequestId(1),
            device_id: DeviceId::new("d").unwrap(),
            dialogue_id: "x".into(),
            turn: 1,
            task: "Query".into(),
            question: "Is the pan hot?".into(),
            history: vec![HistoryTurn { question: "Hi".into(), answer: "Hello".into() }],
            attachments: (0..3)
                .map(|i| Attachment {
                    modality: i,
                    name: format!("cam-{i}"),
                    media_type: MediaType::ImageJpeg,
                    data: vec![0; 10],
                })
                .collect(),
            deadline_unix_ms: 0,
            max_tokens: 8,
            stream: false,
        };
        let m = chat_messages(&request, "sys");
        assert_eq!(m.len(), 4);
        assert_eq!(m[3].content, "Is the pan hot?\n\n[3 camera views attached]");
    }
}

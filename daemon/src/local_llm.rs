//! The local model on its own thread: one generation at a time, a bounded queue in front
//! (a full queue is refused at once, so the API can answer 503), tokens streamed back to the
//! request as they come, cancellation when the requester goes away.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use llm_engine::{Conversation, Engine, EngineConfig, EngineError, Generation, GenerationParams, ModelInfo};
use tokio::sync::{mpsc, oneshot};

/// One question for the local model.
#[derive(Debug)]
pub struct LocalJob {
    pub conversation: Conversation,
    pub question: String,
    pub params: GenerationParams,
    /// Text pieces as they are generated; a closed receiver cancels the generation.
    pub tokens: mpsc::UnboundedSender<String>,
    pub done: oneshot::Sender<LocalAnswer>,
    pub enqueued: Instant,
}

/// What came back: the conversation (extended by the turn on success) and the generation.
#[derive(Debug)]
pub struct LocalAnswer {
    pub conversation: Conversation,
    pub generation: Result<Generation, EngineError>,
    pub queue_time: Duration,
    /// The dialogue no longer fit in the context, so the model's view restarted from this turn.
    pub context_restarted: bool,
}

/// Why a job was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full: the API answers 503.
    #[error("the local model is busy: {waiting} requests already waiting")]
    Full { waiting: usize },
    /// The model thread has ended (a panic): nothing will answer until tmod restarts.
    #[error("the local model's thread has stopped")]
    Stopped,
}

/// A handle on the model thread.
#[derive(Debug, Clone)]
pub struct LocalLlm {
    jobs: SyncSender<LocalJob>,
    waiting: Arc<AtomicUsize>,
    info: Arc<ModelInfo>,
    thread: Arc<std::thread::JoinHandle<()>>,
}

impl LocalLlm {
    /// Loads the model on a new thread and waits until it is ready.
    pub fn start(
        model: &Path,
        config: EngineConfig,
        queue_limit: usize,
        system_prompt: &str,
    ) -> Result<Self, EngineError> {
        let (jobs, queue) = sync_channel::<LocalJob>(queue_limit);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let model = model.to_owned();
        let system_prompt = system_prompt.to_owned();
        let thread_waiting = waiting.clone();
        let thread = std::thread::Builder::new()
            .name("local-llm".into())
            .spawn(move || {
                let mut engine = match Engine::load(&model, &config) {
                    Ok(engine) => {
                        let _ = ready_tx.send(Ok(engine.info().clone()));
                        engine
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = queue.recv() {
                    thread_waiting.fetch_sub(1, Ordering::Relaxed);
                    fail::fail_point!("local-llm-job");
                    run_job(&mut engine, job, &system_prompt);
                }
            })
            .map_err(|e| EngineError::InvalidParams(format!("cannot start the model thread: {e}")))?;
        let info = ready_rx
            .recv()
            .map_err(|_| EngineError::InvalidParams("the model thread ended while loading".into()))??;
        Ok(Self { jobs, waiting, info: Arc::new(info), thread: Arc::new(thread) })
    }

    /// Queues a job, or refuses it at once when the queue is full or the thread has stopped.
    pub fn submit(&self, job: LocalJob) -> Result<(), SubmitError> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let refused = match self.jobs.try_send(job) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(_)) => None,
            Err(TrySendError::Disconnected(_)) => Some(SubmitError::Stopped),
        };
        let waiting = self.waiting.fetch_sub(1, Ordering::Relaxed) - 1;
        Err(refused.unwrap_or(SubmitError::Full { waiting }))
    }

    /// Whether the model thread still runs (a panic in a generation ends it).
    pub fn running(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Requests waiting for the model (not counting the one it runs).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
}

fn run_job(engine: &mut Engine, job: LocalJob, system_prompt: &str) {
    let queue_time = job.enqueued.elapsed();
    let LocalJob { mut conversation, question, params, tokens, done, .. } = job;
    if done.is_closed() {
        return;
    }
    let cancel = AtomicBool::new(false);
    let mut on_text = |piece: &str| {
        if tokens.send(piece.to_owned()).is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
    };
    let mut generation = conversation.send(engine, &question, &params, Some(&cancel), &mut on_text);
    let mut context_restarted = false;
    if matches!(generation, Err(EngineError::ContextOverflow { .. })) {
        conversation = Conversation::new(Some(system_prompt));
        context_restarted = true;
        generation = conversation.send(engine, &question, &params, Some(&cancel), &mut on_text);
    }
    let _ = done.send(LocalAnswer { conversation, generation, queue_time, context_restarted });
}

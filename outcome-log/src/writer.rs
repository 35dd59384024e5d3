//! Group commit: one thread owns the log; rows queued while a commit runs go into the next one.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{
    LogStats, LoggedOutcome, OutcomeLog, OutcomeLogConfig, OutcomeLogError, RowId, ScoreSource, ScoreUpdate,
    TurnOutcome,
};

/// Called once with a row's result, on the writer thread, after its transaction committed (or
/// failed). Keep it short: send it somewhere (a tokio oneshot, a channel).
pub type AppendCallback = Box<dyn FnOnce(Result<RowId, OutcomeLogError>) + Send>;

/// Runs with the log, or with the reason it is unavailable.
type Job = Box<dyn FnOnce(Result<&mut OutcomeLog, OutcomeLogError>) + Send>;

/// Rows held in memory while the log cannot be opened ([`OutcomeWriter::open_retrying`]).
pub const MAX_HELD_ROWS: usize = 10_000;

enum Request {
    Append { outcome: Box<TurnOutcome>, done: AppendCallback },
    Run(Job),
}

/// Settings of the writer thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterConfig {
    /// Requests that may wait in the queue; `append` blocks and `try_append` fails beyond it.
    pub queue_capacity: usize,
    /// Most rows committed in one transaction.
    pub max_batch: usize,
}

impl Default for WriterConfig {
    /// 4096 queued requests, batches of up to 1024 rows.
    fn default() -> Self {
        WriterConfig { queue_capacity: 4096, max_batch: 1024 }
    }
}

/// The result of a request to the writer, delivered once the writer has carried it out.
///
/// Not tied to an async runtime: block with [`Pending::wait`], poll with [`Pending::try_wait`],
/// or `.await` it from any executor (it is a `std::future::Future`, woken by the writer thread).
#[derive(Debug)]
pub struct Pending<T> {
    slot: Arc<Slot<T>>,
}

#[derive(Debug)]
struct Slot<T> {
    state: Mutex<SlotState<T>>,
    filled: Condvar,
}

#[derive(Debug)]
struct SlotState<T> {
    value: Option<Result<T, OutcomeLogError>>,
    /// True once the completer has sent its value or was dropped without one.
    closed: bool,
    waker: Option<Waker>,
}

/// The writer's end of a [`Pending`]: completes it once; dropped unused, it reports
/// [`OutcomeLogError::WriterStopped`].
#[derive(Debug)]
struct Completer<T> {
    slot: Arc<Slot<T>>,
}

fn pending<T>() -> (Completer<T>, Pending<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(SlotState { value: None, closed: false, waker: None }),
        filled: Condvar::new(),
    });
    (Completer { slot: Arc::clone(&slot) }, Pending { slot })
}

impl<T> Slot<T> {
    fn lock(&self) -> MutexGuard<'_, SlotState<T>> {
        // A panic while holding this lock cannot leave the state half-written: recover it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> SlotState<T> {
    fn take(&mut self) -> Option<Result<T, OutcomeLogError>> {
        match self.value.take() {
            Some(v) => Some(v),
            None if self.closed => Some(Err(OutcomeLogError::WriterStopped)),
            None => None,
        }
    }
}

impl<T> Completer<T> {
    fn complete(self, value: Result<T, OutcomeLogError>) {
        self.close(Some(value));
    }

    fn close(&self, value: Option<Result<T, OutcomeLogError>>) {
        let waker = {
            let mut state = self.slot.lock();
            if state.closed {
                return;
            }
            state.value = value;
            state.closed = true;
            state.waker.take()
        };
        self.slot.filled.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        self.close(None);
    }
}

impl<T> Pending<T> {
    /// A result that is there already (a request that could not be queued).
    fn ready(value: Result<T, OutcomeLogError>) -> Self {
        let (completer, pending) = pending();
        completer.complete(value);
        pending
    }

    /// Blocks until the result is there.
    pub fn wait(self) -> Result<T, OutcomeLogError> {
        let mut state = self.slot.lock();
        loop {
            if let Some(v) = state.take() {
                return v;
            }
            state = self.slot.filled.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Blocks for at most `timeout`; `None` when the result is not there yet.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<T, OutcomeLogError>> {
        let state = self.slot.lock();
        let (mut state, _) = self
            .slot
            .filled
            .wait_timeout_while(state, timeout, |s| !s.closed)
            .unwrap_or_else(PoisonError::into_inner);
        state.take()
    }

    /// The result if it is there, without blocking.
    pub fn try_wait(&self) -> Option<Result<T, OutcomeLogError>> {
        self.slot.lock().take()
    }
}

impl<T> Future for Pending<T> {
    type Output = Result<T, OutcomeLogError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.slot.lock();
        match state.take() {
            Some(v) => Poll::Ready(v),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// The log's single writer: a thread named `outcome-writer` that owns the [`OutcomeLog`].
///
/// Appends queued while a transaction commits are committed together in the next one (group
/// commit): with [`crate::Durability::PowerLoss`] a row is acknowledged after the fsync that
/// made it durable, and one fsync serves the whole batch. Other requests (scores, upload marks,
/// reads) run in order between batches.
///
/// `OutcomeWriter` is `Send + Sync`: share it behind an `Arc`. From tokio (or any executor),
/// `writer.append(outcome).await` waits without blocking a worker thread; only `append`'s queueing
/// blocks, and only while the queue is full (use [`OutcomeWriter::try_append`] to fail instead).
/// Dropping it (or [`OutcomeWriter::close`]) finishes the queued requests, then stops the thread.
#[derive(Debug)]
pub struct OutcomeWriter {
    tx: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<Option<OutcomeLog>>>,
    capacity: usize,
    /// Why the log cannot be opened, while it cannot.
    unavailable: Arc<Mutex<Option<String>>>,
}

impl OutcomeWriter {
    /// Starts the writer thread with `log`.
    pub fn spawn(log: OutcomeLog, config: WriterConfig) -> Result<Self, OutcomeLogError> {
        Self::start(config, Arc::new(Mutex::new(None)), move |rx, max_batch| Some(run(log, rx, max_batch)))
    }

    /// Starts the writer with the log at `path`, opened on the writer thread and, while it
    /// cannot be (a read-only or full state directory, a missing mount), opened again every
    /// `retry`. Meanwhile every request fails at once with [`OutcomeLogError::Unavailable`]
    /// (the daemon serves on, degraded), and appended rows are held in memory, up to
    /// [`MAX_HELD_ROWS`], to be written once the log opens.
    pub fn open_retrying(
        path: impl AsRef<Path>,
        log_config: OutcomeLogConfig,
        config: WriterConfig,
        retry: Duration,
    ) -> Result<Self, OutcomeLogError> {
        let path = path.as_ref().to_path_buf();
        let unavailable = Arc::new(Mutex::new(None));
        let state = unavailable.clone();
        Self::start(config, unavailable, move |rx, max_batch| {
            let log = open_when_possible(&path, &log_config, &rx, max_batch, retry, &state)?;
            Some(run(log, rx, max_batch))
        })
    }

    /// Starts the thread named `outcome-writer` running `body` on the request queue.
    fn start(
        config: WriterConfig,
        unavailable: Arc<Mutex<Option<String>>>,
        body: impl FnOnce(Receiver<Request>, usize) -> Option<OutcomeLog> + Send + 'static,
    ) -> Result<Self, OutcomeLogError> {
        if config.queue_capacity == 0 || config.max_batch == 0 {
            return Err(OutcomeLogError::InvalidConfig(format!(
                "the writer needs a queue and batches of at least one (queue_capacity {}, max_batch {})",
                config.queue_capacity, config.max_batch
            )));
        }
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity);
        let max_batch = config.max_batch;
        let thread = std::thread::Builder::new()
            .name("outcome-writer".into())
            .spawn(move || body(rx, max_batch))
            .map_err(|e| OutcomeLogError::InvalidConfig(format!("cannot start the writer thread: {e}")))?;
        Ok(OutcomeWriter { tx: Some(tx), thread: Some(thread), capacity: config.queue_capacity, unavailable })
    }

    /// Why the log cannot be opened, while it cannot (see [`OutcomeWriter::open_retrying`]).
    pub fn unavailable(&self) -> Option<String> {
        self.unavailable.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether the writer thread still runs (it ends only when the writer is closed, or on a
    /// panic).
    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Opens the log at `path` ([`OutcomeLog::open`]) and starts its writer with the default
    /// [`WriterConfig`].
    pub fn open(path: impl AsRef<Path>, config: OutcomeLogConfig) -> Result<Self, OutcomeLogError> {
        OutcomeWriter::spawn(OutcomeLog::open(path, config)?, WriterConfig::default())
    }

    fn sender(&self) -> Result<&SyncSender<Request>, OutcomeLogError> {
        self.tx.as_ref().ok_or(OutcomeLogError::WriterStopped)
    }

    /// Queues a row; `done` is called with its id once its transaction has committed. Blocks
    /// while the queue is full.
    pub fn append_then(
        &self,
        outcome: TurnOutcome,
        done: impl FnOnce(Result<RowId, OutcomeLogError>) + Send + 'static,
    ) -> Result<(), OutcomeLogError> {
        let request = Request::Append { outcome: Box::new(outcome), done: Box::new(done) };
        self.sender()?.send(request).map_err(|_| OutcomeLogError::WriterStopped)
    }

    /// Queues a row; the returned [`Pending`] resolves once its transaction has committed
    /// (`.wait()` it, or `.await` it). Blocks while the queue is full.
    pub fn append(&self, outcome: TurnOutcome) -> Pending<RowId> {
        let (completer, pending) = pending();
        match self.append_then(outcome, move |r| completer.complete(r)) {
            Ok(()) => pending,
            Err(e) => Pending::ready(Err(e)),
        }
    }

    /// Like [`OutcomeWriter::append`], but fails with [`OutcomeLogError::QueueFull`] at once
    /// instead of blocking when the queue is full.
    pub fn try_append(&self, outcome: TurnOutcome) -> Pending<RowId> {
        let (completer, pending) = pending();
        let done: AppendCallback = Box::new(move |r| completer.complete(r));
        let sender = match self.sender() {
            Ok(s) => s,
            Err(e) => return Pending::ready(Err(e)),
        };
        match sender.try_send(Request::Append { outcome: Box::new(outcome), done }) {
            Ok(()) => pending,
            Err(TrySendError::Full(_)) => {
                Pending::ready(Err(OutcomeLogError::QueueFull { capacity: self.capacity }))
            }
            Err(TrySendError::Disconnected(_)) => Pending::ready(Err(OutcomeLogError::WriterStopped)),
        }
    }

    /// Appends a row and blocks until it is durable.
    pub fn append_durable(&self, outcome: TurnOutcome) -> Result<RowId, OutcomeLogError> {
        self.append(outcome).wait()
    }

    /// Runs `job` on the writer thread, between batches.
    fn run_job<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut OutcomeLog) -> Result<T, OutcomeLogError> + Send + 'static,
    ) -> Pending<T> {
        let (completer, pending) = pending();
        let job: Job = Box::new(move |log| completer.complete(log.and_then(job)));
        match self
            .sender()
            .and_then(|s| s.send(Request::Run(job)).map_err(|_| OutcomeLogError::WriterStopped))
        {
            Ok(()) => pending,
            Err(e) => Pending::ready(Err(e)),
        }
    }

    /// [`OutcomeLog::set_judge_score`] on the writer thread.
    pub fn set_judge_score(
        &self,
        dialogue: impl Into<String>,
        turn: u32,
        score: f64,
    ) -> Pending<ScoreUpdate> {
        let dialogue = dialogue.into();
        self.run_job(move |log| log.set_judge_score(&dialogue, turn, score))
    }

    /// [`OutcomeLog::set_score`] on the writer thread.
    pub fn set_score(
        &self,
        dialogue: impl Into<String>,
        turn: u32,
        score: f64,
        source: ScoreSource,
    ) -> Pending<ScoreUpdate> {
        let dialogue = dialogue.into();
        self.run_job(move |log| log.set_score(&dialogue, turn, score, source))
    }

    /// [`OutcomeLog::rows_pending_upload`] on the writer thread.
    pub fn rows_pending_upload(&self, limit: usize) -> Pending<Vec<LoggedOutcome>> {
        self.run_job(move |log| log.rows_pending_upload(limit))
    }

    /// [`OutcomeLog::mark_uploaded`] on the writer thread.
    pub fn mark_uploaded(&self, ids: Vec<RowId>) -> Pending<usize> {
        self.run_job(move |log| log.mark_uploaded(&ids))
    }

    /// [`OutcomeLog::mark_upload_refused`] on the writer thread.
    pub fn mark_upload_refused(&self, rows: Vec<(RowId, String)>) -> Pending<usize> {
        self.run_job(move |log| log.mark_upload_refused(&rows))
    }

    /// [`OutcomeLog::stats`] on the writer thread.
    pub fn stats(&self) -> Pending<LogStats> {
        self.run_job(|log| log.stats())
    }

    /// Finishes every queued request, stops the thread and hands the log back.
    pub fn close(mut self) -> Result<OutcomeLog, OutcomeLogError> {
        self.stop().ok_or(OutcomeLogError::WriterStopped)
    }

    fn stop(&mut self) -> Option<OutcomeLog> {
        drop(self.tx.take());
        self.thread.take().and_then(|t| t.join().ok()).flatten()
    }
}

impl Drop for OutcomeWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens the log, serving requests with [`OutcomeLogError::Unavailable`] and holding appended
/// rows while it cannot, trying again every `retry`; writes the held rows once it opens.
/// `None` when the writer is dropped before.
fn open_when_possible(
    path: &Path,
    config: &OutcomeLogConfig,
    rx: &Receiver<Request>,
    max_batch: usize,
    retry: Duration,
    unavailable: &Mutex<Option<String>>,
) -> Option<OutcomeLog> {
    let mut held: Vec<TurnOutcome> = Vec::new();
    loop {
        let reason = match OutcomeLog::open(path, config.clone()) {
            Ok(mut log) => {
                for batch in held.chunks(max_batch) {
                    let failed = log.append_batch(batch).into_iter().filter(Result::is_err).count();
                    if failed > 0 {
                        tracing::error!(
                            failed,
                            "rows held while the outcome log was unavailable not written"
                        );
                    }
                }
                if !held.is_empty() {
                    tracing::info!(
                        rows = held.len(),
                        "outcome log open: the rows held in memory are written"
                    );
                }
                *unavailable.lock().unwrap_or_else(PoisonError::into_inner) = None;
                return Some(log);
            }
            Err(e) => e.to_string(),
        };
        tracing::warn!(path = %path.display(), "outcome log unavailable ({reason}); trying again in {retry:?}");
        *unavailable.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.clone());
        let until = std::time::Instant::now() + retry;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let request = match rx.recv_timeout(left) {
                Ok(request) => request,
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            };
            match request {
                Request::Append { outcome, done } => {
                    let fate = if held.len() < MAX_HELD_ROWS {
                        held.push(*outcome);
                        "the row is held in memory and written once the log opens"
                    } else {
                        "the row is lost: the rows held in memory reached their bound"
                    };
                    done(Err(OutcomeLogError::Unavailable { reason: reason.clone(), fate }));
                }
                Request::Run(job) => job(Err(OutcomeLogError::Unavailable {
                    reason: reason.clone(),
                    fate: "nothing was done",
                })),
            }
        }
    }
}

/// The writer thread: wait for a request, take whatever else is queued, commit appends in
/// batches, run other requests in order.
fn run(mut log: OutcomeLog, rx: Receiver<Request>, max_batch: usize) -> OutcomeLog {
    let mut outcomes: Vec<TurnOutcome> = Vec::with_capacity(max_batch);
    let mut callbacks: Vec<AppendCallback> = Vec::with_capacity(max_batch);
    let mut next: Option<Request> = None;
    loop {
        let request = match next.take() {
            Some(r) => r,
            None => match rx.recv() {
                Ok(r) => r,
                Err(_) => return log,
            },
        };
        match request {
            Request::Run(job) => job(Ok(&mut log)),
            Request::Append { outcome, done } => {
                fail::fail_point!("outcome-writer-append");
                outcomes.push(*outcome);
                callbacks.push(done);
                while outcomes.len() < max_batch {
                    match rx.try_recv() {
                        Ok(Request::Append { outcome, done }) => {
                            outcomes.push(*outcome);
                            callbacks.push(done);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let results = log.append_batch(&outcomes);
                for (done, result) in callbacks.drain(..).zip(results) {
                    done(result);
                }
                outcomes.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::task::Wake;

    use super::*;
    use crate::outcome::tests::sample;

    fn writer(dir: &tempfile::TempDir, config: WriterConfig) -> OutcomeWriter {
        let log = OutcomeLog::open(dir.path().join("o.db"), OutcomeLogConfig::default()).unwrap();
        OutcomeWriter::spawn(log, config).unwrap()
    }

    /// Wakes the thread that polls, so that a future can be driven without a runtime.
    struct Unpark(std::thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }

    #[test]
    fn concurrent_appends_are_all_acknowledged_and_present() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Arc::new(writer(&dir, WriterConfig::default()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = Arc::clone(&writer);
                std::thread::spawn(move || {
                    let pending: Vec<Pending<RowId>> =
                        (0..50).map(|turn| writer.append(sample(&format!("t{t}"), turn))).collect();
                    pending.into_iter().map(|p| p.wait().unwrap()).collect::<Vec<RowId>>()
                })
            })
            .collect();
        let mut ids: Vec<RowId> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 200);
        let stats = writer.stats().wait().unwrap();
        assert_eq!((stats.rows, stats.pending_upload), (200, 200));

        let (tx, rx) = mpsc::channel();
        writer.append_then(sample("cb", 0), move |r| tx.send(r).unwrap()).unwrap();
        let id = rx.recv().unwrap().unwrap();
        let err = writer.append_durable(sample("cb", 0)).unwrap_err();
        assert!(matches!(err, OutcomeLogError::DuplicateTurn { .. }), "{err}");

        assert_eq!(
            writer.set_score("cb", 0, 1.0, ScoreSource::Feedback).wait().unwrap(),
            ScoreUpdate::Updated { policy_version: "2026-11-20.1".into() }
        );
        let err = writer.set_score("cb", 9, 1.0, ScoreSource::Feedback).wait().unwrap_err();
        assert!(matches!(err, OutcomeLogError::UnknownTurn { turn: 9, .. }), "{err}");
        let pending = writer.rows_pending_upload(1000).wait().unwrap();
        assert_eq!(pending.len(), 201);
        assert_eq!(writer.mark_uploaded(vec![id]).wait().unwrap(), 1);

        let writer = Arc::try_unwrap(writer).unwrap();
        let log = writer.close().unwrap();
        let stats = log.stats().unwrap();
        assert_eq!((stats.rows, stats.uploaded), (201, 1));
        log.integrity_check().unwrap();
    }

    /// `Pending` is a plain `Future`: awaited without any runtime, woken by the writer thread.
    #[test]
    fn pending_results_can_be_awaited() {
        let dir = tempfile::tempdir().unwrap();
        let writer = OutcomeWriter::open(dir.path().join("a.db"), OutcomeLogConfig::default()).unwrap();
        let (first, second) = block_on(async {
            let first = writer.append(sample("a", 0)).await;
            let second = writer.append(sample("a", 1)).await;
            (first, second)
        });
        assert_eq!((first.unwrap(), second.unwrap()), (RowId(1), RowId(2)));
        let stats = block_on(writer.stats()).unwrap();
        assert_eq!(stats.rows, 2);
        let slow = writer.append(sample("a", 2));
        assert!(slow.wait_timeout(Duration::from_secs(10)).is_some_and(|r| r.is_ok()));
    }

    #[test]
    fn a_full_queue_is_reported_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer(&dir, WriterConfig { queue_capacity: 1, max_batch: 8 });
        // Hold the writer thread inside a job until the queue has been seen full.
        let gate = Arc::new(Barrier::new(2));
        let held = Arc::clone(&gate);
        let blocked = writer.run_job(move |_| {
            held.wait();
            Ok(())
        });
        let first = loop {
            // The job may still be in the queue: then the queue is full already.
            let p = writer.try_append(sample("q", 0));
            match p.try_wait() {
                Some(Err(OutcomeLogError::QueueFull { .. })) => std::thread::yield_now(),
                Some(other) => panic!("{other:?}"),
                None => break p,
            }
        };
        let err = writer.try_append(sample("q", 1)).wait().unwrap_err();
        assert!(matches!(err, OutcomeLogError::QueueFull { capacity: 1 }), "{err}");
        gate.wait();
        blocked.wait().unwrap();
        first.wait().unwrap();
        let log = writer.close().unwrap();
        assert!(matches!(
            OutcomeWriter::spawn(log, WriterConfig { queue_capacity: 0, max_batch: 1 }),
            Err(OutcomeLogError::InvalidConfig(_))
        ));
    }
}

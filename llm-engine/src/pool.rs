//! The engine's compute threads: a fixed set that runs one job at a time, the calling thread
//! taking part. Between the rounds of a forward pass (five per layer, microseconds apart) the
//! helpers spin instead of sleeping, so a round starts without a wake-up system call; after
//! about a millisecond without work they park, so an idle engine costs no CPU.
//!
//! rayon, used before, put a scheduler round trip and, between tokens, a sleep and wake-up on
//! each of those rounds: about a tenth of the decode time for SmolLM2.
#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Spins before a helper parks (each a `spin_loop` hint: tens of cycles).
const SPINS_BEFORE_PARKING: u32 = 1 << 15;

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Incremented to start a round.
    round: AtomicU64,
    /// The round's job, valid from the increment of `round` until `pending` is back to 0.
    job: UnsafeCell<Option<*const Job>>,
    /// Helpers still running the round's job.
    pending: AtomicUsize,
    /// A helper's job panicked this round.
    panicked: AtomicBool,
    parked: AtomicUsize,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the caller of `ComputePool::run` while no helper reads it
// (between rounds), and read by helpers only during a round; the pointee is `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A fixed set of compute threads.
pub(crate) struct ComputePool {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ComputePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ComputePool({} threads)", self.threads())
    }
}

impl ComputePool {
    /// `threads` compute threads in all: the caller of `run` and `threads - 1` helpers.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            round: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = Self { shared, helpers: Vec::new() };
        for index in 1..threads.max(1) {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("llm-{index}"))
                .spawn(move || helper(&shared, index))?;
            pool.helpers.push(handle);
        }
        Ok(pool)
    }

    /// Compute threads, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `job(i)` once on each compute thread `i` (the caller is 0) and returns when all
    /// are done. A panic in any of them is raised here once all have stopped.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        if self.helpers.is_empty() {
            job(0);
            return;
        }
        let shared = &*self.shared;
        // SAFETY: no round is under way (the previous `run` waited for `pending == 0`), so
        // no helper reads `job`; the lifetime is erased only until this call returns, after
        // every helper is done with it.
        unsafe {
            *shared.job.get() = Some(std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(job));
        }
        shared.panicked.store(false, SeqCst);
        shared.pending.store(self.helpers.len(), SeqCst);
        shared.round.fetch_add(1, SeqCst);
        if shared.parked.load(SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            shared.wake.notify_all();
        }
        let own = catch_unwind(AssertUnwindSafe(|| job(0)));
        while shared.pending.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        if let Err(panic) = own {
            resume_unwind(panic);
        }
        if shared.panicked.load(SeqCst) {
            panic!("a compute thread of the LLM engine panicked");
        }
    }
}

impl ComputePool {
    /// Calls `f(i, chunk)` for every `chunk_len`-long chunk `i` of `data`, spread over the
    /// threads (each takes the next chunk when done with one).
    pub fn for_each_chunk<T: Send>(
        &self,
        data: &mut [T],
        chunk_len: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let chunks = data.len().div_ceil(chunk_len.max(1));
        let (base, len) = (SendPtr(data.as_mut_ptr()), data.len());
        let next = AtomicUsize::new(0);
        self.run(&|_| {
            let base = &base;
            loop {
                let i = next.fetch_add(1, SeqCst);
                if i >= chunks {
                    break;
                }
                let start = i * chunk_len;
                let end = (start + chunk_len).min(len);
                // SAFETY: chunk i is handed to exactly one thread (the counter) and lies
                // inside `data`, which is borrowed mutably for this whole call.
                let chunk = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
                f(i, chunk);
            }
        });
    }
}

/// A buffer several threads write at distinct indices.
pub(crate) struct SharedSlice<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: writes go to distinct indices (the caller's promise in `write`); `T: Send`.
unsafe impl<T: Send> Sync for SharedSlice<'_, T> {}

impl<'a, T> SharedSlice<'a, T> {
    pub fn new(data: &'a mut [T]) -> Self {
        Self { ptr: data.as_mut_ptr(), len: data.len(), _borrow: std::marker::PhantomData }
    }

    /// # Safety
    /// No other thread reads or writes index `i` meanwhile.
    pub unsafe fn write(&self, i: usize, value: T) {
        assert!(i < self.len, "index {i} outside {}", self.len);
        // SAFETY: in bounds (checked); exclusive by the caller's promise.
        unsafe { self.ptr.add(i).write(value) };
    }
}

/// A pointer into a buffer whose disjoint parts several threads write.
struct SendPtr<T>(*mut T);
// SAFETY: used only by `for_each_chunk`, which hands each part to one thread; `T: Send`.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl Drop for ComputePool {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.shared.wake.notify_all();
        }
        for handle in self.helpers.drain(..) {
            let _ = handle.join();
        }
    }
}

fn helper(shared: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        let mut spins = 0;
        loop {
            if shared.stop.load(SeqCst) {
                return;
            }
            let round = shared.round.load(SeqCst);
            if round != seen {
                seen = round;
                break;
            }
            spins += 1;
            if spins < SPINS_BEFORE_PARKING {
                std::hint::spin_loop();
                continue;
            }
            // Park. `run` bumps `round` before it reads `parked`, and this thread raises
            // `parked` before it reads `round` (all SeqCst): either it sees the new round, or
            // `run` sees it parked and notifies under the lock it holds until it waits.
            let mut guard = shared.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            shared.parked.fetch_add(1, SeqCst);
            while shared.round.load(SeqCst) == seen && !shared.stop.load(SeqCst) {
                guard = shared.wake.wait(guard).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            shared.parked.fetch_sub(1, SeqCst);
            drop(guard);
            spins = 0;
        }
        // SAFETY: set by `run` before it started this round; valid until `pending` is 0.
        let job = unsafe { (*shared.job.get()).map(|job| &*job) };
        if let Some(job) = job
            && catch_unwind(AssertUnwindSafe(|| job(index))).is_err()
        {
            shared.panicked.store(true, SeqCst);
        }
        shared.pending.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_thread_runs_each_round_once() {
        let pool = ComputePool::new(3).expect("threads");
        for round in 0..2000 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|i| {
                hits[i].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "round {round}");
            if round == 1000 {
                // Long enough for the helpers to park: they must wake for the next round.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }

    #[test]
    fn a_helper_panic_reaches_the_caller_and_the_pool_goes_on() {
        let pool = ComputePool::new(2).expect("threads");
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i| {
                if i == 1 {
                    panic!("helper fails");
                }
            })
        }));
        assert!(outcome.is_err());
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            count.fetch_add(1, SeqCst);
        });
        assert_eq!(count.load(SeqCst), 2);
    }
}

//! The one thread pool luong computes on.
//!
//! Sized from `LUONG_NUM_THREADS` when it holds a positive integer, else from the machine's
//! available parallelism; resized with [`set_num_threads`]. A dedicated pool (not rayon's global
//! one) so that luong's thread count never changes a host program's own rayon work. Results do
//! not depend on the size: each output row is computed by one thread in a fixed order.

use std::sync::{Arc, OnceLock, RwLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{AttentionError, Result};

/// The pool and the process that built it.
type Slot = RwLock<Option<(u32, Arc<ThreadPool>)>>;

fn slot() -> &'static Slot {
    static POOL: OnceLock<Slot> = OnceLock::new();
    POOL.get_or_init(|| RwLock::new(None))
}

fn default_threads() -> usize {
    std::env::var("LUONG_NUM_THREADS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn build(threads: usize) -> Result<Arc<ThreadPool>> {
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("luong-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| AttentionError::Config {
            arg: "num_threads",
            reason: format!("could not start {threads} threads: {e}"),
        })
}

/// The pool, built on first use, and built again in a child process after `fork`: the child
/// has none of the parent's worker threads, so handing work to the inherited pool would wait
/// forever. (The inherited pool is leaked, not dropped: its threads do not exist to be joined.)
pub(crate) fn pool() -> Result<Arc<ThreadPool>> {
    let pid = std::process::id();
    if let Some((owner, p)) = slot().read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        if *owner == pid {
            return Ok(Arc::clone(p));
        }
    }
    let mut w = slot().write().unwrap_or_else(|e| e.into_inner());
    match w.take() {
        Some((owner, p)) if owner == pid => *w = Some((owner, p)),
        Some((_, inherited)) => {
            let threads = inherited.current_num_threads();
            std::mem::forget(inherited);
            *w = Some((pid, build(threads)?));
        }
        None => *w = Some((pid, build(default_threads())?)),
    }
    Ok(Arc::clone(&w.as_ref().expect("just set").1))
}

/// Sets the number of worker threads (a new pool; calls already running finish on the old one).
///
/// # Errors
/// [`AttentionError::Config`] when `threads` is 0 or the threads cannot be started.
pub fn set_num_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        return Err(AttentionError::Config {
            arg: "num_threads",
            reason: "must be at least 1, received 0".into(),
        });
    }
    let pool = build(threads)?;
    *slot().write().unwrap_or_else(|e| e.into_inner()) = Some((std::process::id(), pool));
    Ok(())
}

/// The number of worker threads calls run on.
pub fn num_threads() -> usize {
    pool().map_or(1, |p| p.current_num_threads())
}

/// Runs `work(state, i)` for every `i` in `0..n`, on the calling thread and `threads - 1` of the
/// pool's workers (`state` is per thread, from `init`). Thread t starts at the front of its own
/// contiguous share of the indices, so neighbouring items (same batch element, same packed keys)
/// stay on one core; a thread that runs out takes the last index of the busiest share. The
/// caller starts at once and a parked worker joins when it wakes, so the wake-up (up to about
/// 0.5 ms on this VM after an idle or busy gap) overlaps work instead of preceding it, as it
/// does when the caller blocks in `install`. When the indices run out the caller waits only for
/// helpers that have started (spinning: they are finishing one item), never for one that has not
/// woken yet: that helper finds the call closed and returns without touching it. (A rayon scope
/// would make the caller sleep until every spawned helper had run, then wait to be woken.)
/// Which thread runs an index never changes what it computes. A panic in `work` on any thread
/// reaches the caller after every started helper has stopped.
pub(crate) fn run_indexed<S>(
    pool: &ThreadPool,
    n: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, usize) + Sync,
) {
    let threads = pool.current_num_threads().clamp(1, n.max(1));
    // Share t is `next..end` of `shares[t]`; a thread takes `next` of its own share, or `end - 1`
    // of the share with the most left.
    let shares: Vec<std::sync::Mutex<(usize, usize)>> = (0..threads)
        .map(|t| std::sync::Mutex::new((t * n / threads, (t + 1) * n / threads)))
        .collect();
    let take = |own: usize| -> Option<usize> {
        {
            let mut s = shares[own].lock().ok()?;
            if s.0 < s.1 {
                s.0 += 1;
                return Some(s.0 - 1);
            }
        }
        let mut best: Option<std::sync::MutexGuard<'_, (usize, usize)>> = None;
        for share in &shares {
            let s = share.lock().ok()?;
            if s.1 > s.0 && best.as_ref().is_none_or(|b| s.1 - s.0 > b.1 - b.0) {
                best = Some(s);
            }
        }
        best.map(|mut s| {
            s.1 -= 1;
            s.1
        })
    };
    let drain = |own: usize| {
        let mut state = init();
        while let Some(i) = take(own) {
            work(&mut state, i);
        }
    };
    if threads == 1 {
        return drain(0);
    }
    let gate = Arc::new(Gate::default());
    let task: &(dyn Fn(usize) + Sync) = &drain;
    // SAFETY (of the helpers' use of `task`): a helper calls it only after `Gate::enter`
    // succeeded, and `Closer` (below, also on unwind) closes the gate and then waits until every
    // helper that entered has left, so `task` and everything it borrows outlive every call.
    let task: *const (dyn Fn(usize) + Sync + '_) = task;
    // SAFETY: only the trait object's lifetime bound changes (same pointer, same vtable); the
    // comment above says why no use outlives the borrow.
    let task = Task(unsafe {
        std::mem::transmute::<
            *const (dyn Fn(usize) + Sync + '_),
            *const (dyn Fn(usize) + Sync + 'static),
        >(task)
    });
    for t in 1..threads {
        let gate = Arc::clone(&gate);
        pool.spawn(move || {
            let task = task;
            if !gate.enter() {
                return;
            }
            // SAFETY: entered before the gate closed, so the caller is still waiting in
            // `Closer::drop` and `task` is alive (see above).
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*task.0)(t) }));
            if let Err(payload) = result {
                *gate.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(payload);
            }
            gate.leave();
        });
    }
    let closer = Closer(&gate);
    drain(0);
    drop(closer);
    let payload = gate.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(payload) = payload {
        std::panic::resume_unwind(payload);
    }
}

/// `run_indexed`'s per-thread task, shared with helper jobs that must be `'static`.
#[derive(Clone, Copy)]
struct Task(*const (dyn Fn(usize) + Sync));
// SAFETY: the pointee is `Sync`, and `run_indexed` keeps it alive while any helper uses it.
unsafe impl Send for Task {}

/// Which helpers are inside a call: the count of those that entered, and a closed bit after
/// which none may enter.
#[derive(Default)]
struct Gate {
    state: std::sync::atomic::AtomicUsize,
    panic: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

const CLOSED: usize = 1 << (usize::BITS - 1);

impl Gate {
    fn enter(&self) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let mut s = self.state.load(Acquire);
        loop {
            if s & CLOSED != 0 {
                return false;
            }
            match self.state.compare_exchange_weak(s, s + 1, AcqRel, Acquire) {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
    }
    fn leave(&self) {
        self.state
            .fetch_sub(1, std::sync::atomic::Ordering::Release);
    }
}

/// Closes the gate and waits for the helpers inside, when the caller's share is done or unwinds.
struct Closer<'a>(&'a Gate);

impl Drop for Closer<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        self.0.state.fetch_or(CLOSED, AcqRel);
        // The helpers inside are finishing one item each: spin, then yield if it takes long.
        let mut spins = 0u32;
        while self.0.state.load(Acquire) & !CLOSED != 0 {
            if spins < 1 << 14 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every index runs exactly once, for any count (none, fewer than the threads, many), over
    /// many calls in a row (helpers of a finished call that wake late must do nothing).
    #[test]
    fn run_indexed_runs_each_index_once() {
        let pool = build(3).unwrap();
        for n in [0usize, 1, 2, 3, 5, 64, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                run_indexed(
                    &pool,
                    n,
                    || (),
                    |_, i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    },
                );
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "n = {n}: some index ran other than once"
                );
            }
        }
    }

    /// A panic in `work`, on whichever thread takes the index, reaches the caller.
    #[test]
    fn run_indexed_propagates_a_panic() {
        let pool = build(2).unwrap();
        for bad in [0usize, 9] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_indexed(
                    &pool,
                    10,
                    || (),
                    |_, i| {
                        if i == bad {
                            panic!("index {i}");
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    },
                )
            }));
            assert!(r.is_err(), "the panic at index {bad} was lost");
        }
    }
}

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
/// does when the caller blocks in `install`. Which thread runs an index never changes what it
/// computes.
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
    pool.in_place_scope(|scope| {
        for t in 1..threads {
            let drain = &drain;
            scope.spawn(move |_| drain(t));
        }
        drain(0);
    });
}

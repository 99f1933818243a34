//! The thread pool luong computes on, and the scheduler of every parallel step.
//!
//! Sized from `LUONG_NUM_THREADS` when it holds a positive integer, else from the machine's
//! available parallelism; resized with [`set_num_threads`]. A dedicated pool (not rayon's global
//! one) so that luong's thread count never changes a host program's own rayon work. Inside a host
//! whose OpenMP workers are running, a step runs on them instead ([`crate::openmp`]), with as
//! many threads. Results do not depend on the size: each output row is computed by one thread in
//! a fixed order.

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

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
/// When the calling thread's OpenMP team is running ([`crate::openmp::awake_team`]), the same
/// shares run as one OpenMP region of the pool's size on it instead (threads past the shares
/// only take from others). Which thread runs an index never changes what it computes. A panic
/// in `work` on any thread reaches the caller after every started helper has stopped.
pub(crate) fn run_indexed<S>(
    pool: &ThreadPool,
    n: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, usize) + Sync,
) {
    let threads = pool.current_num_threads().clamp(1, n.max(1));
    let gate = Arc::new(Gate::default());
    // Share t is `next..end` of `shares[t]`; a thread takes `next` of its own share, or `end - 1`
    // of the share with the most left. Nothing is taken once the call is closed (which on the
    // normal path happens only after every share is empty; on the caller's unwind it stops the
    // helpers after their current item). Locks are taken in index order, at most two at once.
    let shares: Vec<Mutex<(usize, usize)>> = (0..threads)
        .map(|t| Mutex::new((t * n / threads, (t + 1) * n / threads)))
        .collect();
    let lock = |t: usize| shares[t].lock().unwrap_or_else(|e| e.into_inner());
    let take = |own: usize| -> Option<usize> {
        if gate.is_closed() {
            return None;
        }
        if own < threads {
            let mut s = lock(own);
            if s.0 < s.1 {
                s.0 += 1;
                return Some(s.0 - 1);
            }
        }
        let mut best: Option<std::sync::MutexGuard<'_, (usize, usize)>> = None;
        for t in 0..threads {
            let s = lock(t);
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
    // The team always runs the pool's size, so that its workers are the same ones every call.
    let size = pool.current_num_threads();
    if let Some((team, learn)) = crate::openmp::awake_team(size) {
        let region = Region {
            drain: &drain,
            team,
            gate: &gate,
            workers: learn.then(|| Mutex::new(Vec::new())),
        };
        let data = &region as *const Region<'_> as *mut c_void;
        // SAFETY: `in_region` catches every panic, and `region` outlives the region, which
        // returns only when every thread of the team has left it.
        unsafe { team.run(size, in_region, data) };
        if let Some(workers) = region.workers {
            let tids = workers.into_inner().unwrap_or_else(|e| e.into_inner());
            crate::openmp::remember(size, &tids);
        }
        return resume_first_panic(&gate);
    }
    let task: &(dyn Fn(usize) + Sync) = &drain;
    let task: *const (dyn Fn(usize) + Sync + '_) = task;
    // SAFETY: only the trait object's lifetime bound changes (same pointer, same vtable). A
    // helper calls `task` only after `Gate::enter` succeeded, and `closer` (declared after
    // everything `task` borrows, so dropped first, also on unwind) closes the gate and waits
    // until every helper that entered has left: no use outlives the borrow.
    let task = Task(unsafe {
        std::mem::transmute::<
            *const (dyn Fn(usize) + Sync + '_),
            *const (dyn Fn(usize) + Sync + 'static),
        >(task)
    });
    let closer = Closer(&gate);
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
            // Drop a second panic's payload only after leaving (its Drop may panic too).
            let extra = result.err().and_then(|payload| gate.keep_panic(payload));
            gate.leave();
            drop(extra);
        });
    }
    drain(0);
    drop(closer);
    resume_first_panic(&gate)
}

/// What a thread of an OpenMP region needs: the per-thread loop, the team (for the thread's
/// number), the call's gate (for its panics) and, when the team is new to the caller, where the
/// workers note their thread ids.
struct Region<'a> {
    drain: &'a (dyn Fn(usize) + Sync + 'a),
    team: crate::openmp::Team,
    gate: &'a Gate,
    workers: Option<Mutex<Vec<i32>>>,
}

/// The OpenMP region's body: thread t drains share t, catching a panic (it must not unwind
/// into the OpenMP runtime) for the caller to resume.
extern "C" fn in_region(data: *mut c_void) {
    // SAFETY: `run_indexed` passes a `Region` that lives until the region has returned.
    let region = unsafe { &*(data as *const Region<'_>) };
    let t = region.team.thread_num();
    if let (Some(workers), true) = (&region.workers, t != 0) {
        let tid = crate::openmp::thread_id();
        workers.lock().unwrap_or_else(|e| e.into_inner()).push(tid);
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (region.drain)(t)));
    if let Err(payload) = result {
        // A second payload's Drop could panic too; outside the catch that would abort.
        let extra = region.gate.keep_panic(payload);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(extra)));
    }
}

/// Resumes the call's first panic, if any thread had one.
fn resume_first_panic(gate: &Gate) {
    let payload = gate.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(payload) = payload {
        std::panic::resume_unwind(payload);
    }
}

/// Runs `work(state, job)` once for every job and returns the results in the jobs' order: on
/// `pool` through [`run_indexed`] (its scheduling: contiguous shares, the caller starting at
/// once), or on the calling thread when `pool` is `None`. Every parallel step of luong's calls
/// (the forward's items, the backward's, the half-precision conversions) runs this way.
pub(crate) fn run_jobs<J: Send, S, R: Send>(
    pool: Option<&ThreadPool>,
    jobs: Vec<J>,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, J) -> R + Sync,
) -> Vec<R> {
    let Some(pool) = pool else {
        let mut state = init();
        return jobs.into_iter().map(|job| work(&mut state, job)).collect();
    };
    // Each slot's job is taken by the one thread `run_indexed` hands its index to.
    let slots: Vec<Mutex<(Option<J>, Option<R>)>> = jobs
        .into_iter()
        .map(|j| Mutex::new((Some(j), None)))
        .collect();
    let lock = |i: usize| slots[i].lock().unwrap_or_else(|e| e.into_inner());
    run_indexed(pool, slots.len(), init, |state, i| {
        let job = lock(i).0.take();
        if let Some(job) = job {
            let r = work(state, job);
            lock(i).1 = Some(r);
        }
    });
    slots
        .into_iter()
        .map(|m| {
            let (_, r) = m.into_inner().unwrap_or_else(|e| e.into_inner());
            r.expect("run_indexed runs every index once")
        })
        .collect()
}

/// Wakes the pool's sleeping workers without waiting for them, so they are up by the time the
/// call's first parallel step needs them: a worker woken by that step after the pool sat idle
/// (e.g. between a service's requests) joins late.
pub(crate) fn wake(pool: &ThreadPool) {
    if crate::openmp::awake_team(pool.current_num_threads()).is_some() {
        return; // the step will run on the host's OpenMP team (see `run_indexed`)
    }
    pool.spawn_broadcast(|_| {});
}

/// `run_indexed`'s per-thread task, shared with helper jobs that must be `'static`.
#[derive(Clone, Copy)]
struct Task(*const (dyn Fn(usize) + Sync));
// SAFETY: the pointee is `Sync`, and `run_indexed` keeps it alive while any helper uses it.
unsafe impl Send for Task {}

/// Which helpers are inside a call: the count of those that entered, and a closed bit after
/// which none may enter; the caller to wake when the last one leaves a closed call; the first
/// helper panic.
#[derive(Default)]
struct Gate {
    state: AtomicUsize,
    waiter: Mutex<Option<std::thread::Thread>>,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

const CLOSED: usize = 1 << (usize::BITS - 1);

impl Gate {
    fn is_closed(&self) -> bool {
        self.state.load(Ordering::Relaxed) & CLOSED != 0
    }
    fn enter(&self) -> bool {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if s & CLOSED != 0 {
                return false;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
    }
    fn leave(&self) {
        if self.state.fetch_sub(1, Ordering::Release) == CLOSED | 1 {
            // The last one out of a closed call: wake the caller if it went to sleep.
            if let Some(t) = self
                .waiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                t.unpark();
            }
        }
    }
    /// Keeps the call's first panic and closes the call, so that every thread stops after its
    /// current item; hands back a later panic's payload for the thread to drop.
    fn keep_panic(
        &self,
        payload: Box<dyn std::any::Any + Send>,
    ) -> Option<Box<dyn std::any::Any + Send>> {
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
        let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
        match *slot {
            None => {
                *slot = Some(payload);
                None
            }
            Some(_) => Some(payload),
        }
    }
    fn inside(&self) -> usize {
        self.state.load(Ordering::Acquire) & !CLOSED
    }
}

/// Closes the gate and waits for the helpers inside, when the caller's share is done or unwinds.
struct Closer<'a>(&'a Gate);

impl Drop for Closer<'_> {
    fn drop(&mut self) {
        let gate = self.0;
        gate.state.fetch_or(CLOSED, Ordering::AcqRel);
        // The helpers inside are finishing one item each (tens to hundreds of µs): spin for up
        // to 0.3 ms, since waking a parked thread costs tens of µs on this VM, then park until
        // the last one leaves. The count is checked again after registering, so a leave in
        // between is not missed; the timeout is a backstop.
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_micros(300) {
            for _ in 0..64 {
                if gate.inside() == 0 {
                    return;
                }
                std::hint::spin_loop();
            }
        }
        *gate.waiter.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current());
        while gate.inside() != 0 {
            std::thread::park_timeout(std::time::Duration::from_micros(200));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
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

    /// No `work` runs after `run_indexed` returns, however late a helper wakes: each call's
    /// items check a flag (owned, not borrowed) that the caller sets once the call returned.
    #[test]
    fn no_work_after_return() {
        let pool = build(2).unwrap();
        let late = Arc::new(AtomicUsize::new(0));
        let mut helped = 0;
        for call in 0..20_000usize {
            let returned = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (r, l) = (Arc::clone(&returned), Arc::clone(&late));
            let helper_items = AtomicUsize::new(0);
            run_indexed(
                &pool,
                1 + call % 4,
                || (),
                |_, _| {
                    // A few µs per item, so that helpers sometimes wake in time to take one.
                    let t = std::time::Instant::now();
                    while t.elapsed() < std::time::Duration::from_micros(3) {
                        std::hint::spin_loop();
                    }
                    if r.load(Ordering::SeqCst) {
                        l.fetch_add(1, Ordering::SeqCst);
                    }
                    if std::thread::current()
                        .name()
                        .is_some_and(|n| n.starts_with("luong-"))
                    {
                        helper_items.fetch_add(1, Ordering::Relaxed);
                    }
                },
            );
            returned.store(true, Ordering::SeqCst);
            helped += helper_items.load(Ordering::Relaxed);
        }
        std::thread::sleep(std::time::Duration::from_millis(20)); // let late helpers run
        assert_eq!(
            late.load(Ordering::SeqCst),
            0,
            "work ran after run_indexed returned"
        );
        assert!(
            helped > 0,
            "no helper ever took an item: the race was not exercised"
        );
    }

    /// Busy for `us` microseconds (a work item that takes time without sleeping).
    pub(crate) fn spin_for(us: u64) {
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_micros(us) {
            std::hint::spin_loop();
        }
    }

    /// Whether the calling thread is one of luong's pool threads.
    pub(crate) fn on_luong_pool() -> bool {
        std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("luong-"))
    }

    /// A pool of two threads for one test.
    pub(crate) fn two_threads() -> Arc<ThreadPool> {
        build(2).unwrap()
    }

    /// Loads GNU OpenMP into the process's global symbol scope, as PyTorch does, and lets this
    /// test's thread use its team as `how` says.
    #[cfg(target_os = "linux")]
    pub(crate) fn on_gnu_openmp(how: crate::openmp::InThisTest) -> crate::openmp::Team {
        // SAFETY: dlopen with a NUL-terminated name; libgomp's initialisers only read the
        // environment.
        let lib =
            unsafe { libc::dlopen(c"libgomp.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        assert!(
            !lib.is_null(),
            "this test needs libgomp.so.1 (Debian's libgomp1, which gcc depends on)"
        );
        crate::openmp::TEAM_IN_THIS_TEST.with(|t| t.set(how));
        crate::openmp::awake_team(2)
            .expect("the calling thread's team, once libgomp is loaded")
            .0
    }

    /// On a host's OpenMP team every index runs exactly once too, on the caller and the team's
    /// workers (never on luong's pool), over many calls in a row; also with fewer indices than
    /// the team has threads (a pool of 3, 2 indices: the third thread has no share of its own).
    #[cfg(target_os = "linux")]
    #[test]
    fn run_indexed_on_an_openmp_team_runs_each_index_once_on_its_threads() {
        let team = on_gnu_openmp(crate::openmp::InThisTest::Always);
        let on_worker = AtomicUsize::new(0);
        // Runs one call and returns how many of its items ran on luong's pool.
        let call = |pool: &ThreadPool, n: usize| {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            let on_pool = AtomicUsize::new(0);
            run_indexed(
                pool,
                n,
                || (),
                |_, i| {
                    spin_for(2);
                    hits[i].fetch_add(1, Ordering::Relaxed);
                    if team.thread_num() != 0 {
                        on_worker.fetch_add(1, Ordering::Relaxed);
                    }
                    if on_luong_pool() {
                        on_pool.fetch_add(1, Ordering::Relaxed);
                    }
                },
            );
            let threads = pool.current_num_threads();
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "{threads} threads, n = {n}: some index ran other than once"
            );
            on_pool.into_inner()
        };
        let pool = build(2).unwrap();
        for n in [1usize, 2, 3, 64, 1000] {
            for _ in 0..50 {
                assert_eq!(call(&pool, n), 0, "n = {n}: ran on luong's pool");
            }
        }
        assert!(
            on_worker.load(Ordering::Relaxed) > 0,
            "the team's worker never took an item"
        );
        let pool = build(3).unwrap();
        for _ in 0..50 {
            assert_eq!(call(&pool, 2), 0, "3 threads, n = 2: ran on luong's pool");
        }
    }

    /// Runs 2000 items of 1 ms on `pool`, panicking in the items where `here()` holds, and
    /// checks that the panic reaches the caller and stops the call early (2000 items would take
    /// a second; the panic hook's backtrace printing, during which other threads go on, takes
    /// far less).
    fn assert_a_panic_reaches_the_caller(
        pool: &ThreadPool,
        here: impl Fn() -> bool + Sync,
        what: &str,
    ) {
        let ran = AtomicUsize::new(0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_indexed(
                pool,
                2000,
                || (),
                |_, _| {
                    ran.fetch_add(1, Ordering::SeqCst);
                    if here() {
                        panic!("{what}");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                },
            )
        }));
        assert!(r.is_err(), "the panic ({what}) was lost");
        let ran = ran.load(Ordering::SeqCst);
        assert!(
            ran < 2000,
            "a panic ({what}) did not stop the call: {ran} items ran"
        );
    }

    /// A panic in `work` on the team's worker or on the caller reaches the caller (instead of
    /// unwinding into the OpenMP runtime, which would abort) and stops the call early.
    #[cfg(target_os = "linux")]
    #[test]
    fn run_indexed_on_an_openmp_team_propagates_a_panic() {
        let team = on_gnu_openmp(crate::openmp::InThisTest::Always);
        let pool = build(2).unwrap();
        for worker in [true, false] {
            let here = || (team.thread_num() != 0) == worker;
            assert_a_panic_reaches_the_caller(&pool, here, &format!("on the worker: {worker}"));
        }
    }

    /// A panic in `work` reaches the caller, from a helper thread and from the caller itself,
    /// and stops the call early.
    #[test]
    fn run_indexed_propagates_a_panic() {
        let pool = build(2).unwrap();
        for helper in [true, false] {
            let here = || on_luong_pool() == helper;
            assert_a_panic_reaches_the_caller(&pool, here, &format!("on a helper: {helper}"));
        }
    }
}

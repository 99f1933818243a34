//! The host program's OpenMP team, which luong's parallel steps join while its workers run.
//!
//! A host that computes with OpenMP (PyTorch's libgomp, MKL's libiomp5, LLVM's libomp) leaves
//! its team's workers spinning on their cores for milliseconds after each of its parallel regions
//! (libgomp's default wait policy). A luong helper woken then finds no free core and shares one
//! with the caller or a spinner, so a call between two torch ops runs at about one core's speed.
//! Those spinning workers take a new region at once: while they run, luong's items run as one
//! OpenMP region on the calling thread's team instead of on luong's pool. While they sleep, the
//! pool is the better choice: a region waits at its end for every worker, also one the kernel
//! queued behind the spinning caller (seen: 3.6 ms after a 20 ms pause), where the pool's caller
//! waits only for helpers that started. So the first region on a thread notes its workers'
//! thread ids, and each later call reads their state from `/proc` first (R: running).
//!
//! Nothing is linked: the runtime is looked up in the process's global symbol scope (where
//! PyTorch puts its libgomp) at each call until found, so `import luong` needs no OpenMP and a
//! runtime loaded later is found then. The team is not used off Linux, with `LUONG_OPENMP=0`,
//! inside an OpenMP region (a nested region would be one thread), when the host's OpenMP is held
//! to one thread (`omp_get_max_threads() == 1`, as PyTorch's DataLoader workers set it), or in a
//! process forked after luong was loaded (GNU OpenMP's team does not survive `fork`: its next
//! region waits forever for the parent's workers). Which thread runs an item never changes what
//! it computes.

use std::cell::RefCell;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, OnceLock};

/// A region's body: called once on every thread of the team with the region's data.
pub(crate) type Body = extern "C" fn(*mut c_void);

/// `GOMP_parallel(body, data, num_threads, flags)`.
type Parallel = unsafe extern "C" fn(Body, *mut c_void, c_uint, c_uint);
/// `omp_get_thread_num`, `omp_get_max_threads`, `omp_in_parallel`.
type Query = unsafe extern "C" fn() -> c_int;

/// The OpenMP entry points luong calls (the GNU ABI, which the three runtimes above export).
#[derive(Clone, Copy)]
pub(crate) struct Team {
    parallel: Parallel,
    thread_num: Query,
    max_threads: Query,
    in_parallel: Query,
}

impl Team {
    /// Runs `body(data)` on `threads` threads of the calling thread's team (the caller is thread
    /// 0) and returns when every one has returned (the region's closing barrier).
    ///
    /// # Safety
    /// `body` must not unwind, and `data` must be valid for it on every thread until this returns.
    pub(crate) unsafe fn run(&self, threads: usize, body: Body, data: *mut c_void) {
        let threads = c_uint::try_from(threads).unwrap_or(c_uint::MAX);
        // SAFETY: GOMP_parallel(fn, data, num_threads, flags) per the GNU ABI; the caller
        // vouches for `body` and `data`.
        unsafe { (self.parallel)(body, data, threads, 0) }
    }

    /// This thread's number in the running region (0 on the caller).
    pub(crate) fn thread_num(&self) -> usize {
        // SAFETY: omp_get_thread_num takes nothing and may be called from any thread.
        usize::try_from(unsafe { (self.thread_num)() }).unwrap_or(0)
    }
}

static FORKED: AtomicBool = AtomicBool::new(false);

#[cfg(target_os = "linux")]
extern "C" fn after_fork_in_child() {
    FORKED.store(true, Ordering::Relaxed);
}

/// Notes every later `fork` (in the child), so that a forked process keeps to luong's pool.
pub(crate) fn watch_forks() {
    static WATCH: Once = Once::new();
    WATCH.call_once(|| {
        #[cfg(target_os = "linux")]
        // SAFETY: registers a handler that only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
}

fn allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var("LUONG_OPENMP").map_or(true, |v| v.trim() != "0"))
}

#[cfg(target_os = "linux")]
fn lookup() -> Option<Team> {
    fn symbol(name: &std::ffi::CStr) -> Option<*mut c_void> {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only reads the loader's tables.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        (!p.is_null()).then_some(p)
    }
    static FOUND: OnceLock<Team> = OnceLock::new();
    if let Some(team) = FOUND.get() {
        return Some(*team);
    }
    let parallel = symbol(c"GOMP_parallel")?;
    let thread_num = symbol(c"omp_get_thread_num")?;
    let max_threads = symbol(c"omp_get_max_threads")?;
    let in_parallel = symbol(c"omp_in_parallel")?;
    // SAFETY: these symbols have these C signatures in every OpenMP runtime that exports them
    // (GOMP_parallel is the GNU ABI entry point, also provided by libiomp5 and libomp). A
    // runtime in the global scope is not unloaded while the process runs (PyTorch never is).
    let team = unsafe {
        Team {
            parallel: std::mem::transmute::<*mut c_void, Parallel>(parallel),
            thread_num: std::mem::transmute::<*mut c_void, Query>(thread_num),
            max_threads: std::mem::transmute::<*mut c_void, Query>(max_threads),
            in_parallel: std::mem::transmute::<*mut c_void, Query>(in_parallel),
        }
    };
    Some(*FOUND.get_or_init(|| team))
}

#[cfg(not(target_os = "linux"))]
fn lookup() -> Option<Team> {
    None
}

/// What a unit test lets its thread do with the team.
#[cfg(test)]
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum InThisTest {
    /// Never join it (every test that does not ask).
    Never,
    /// Join it as a program would (while its workers run).
    AsUsual,
    /// Always join it: the region's own behaviour, whatever the runtime's spin (which under
    /// qemu-user or on ARM cores may end before the next call).
    Always,
}

#[cfg(test)]
thread_local! {
    /// Unit tests share one process: only a test that asks for it gets the team (on its thread),
    /// so loading an OpenMP runtime for one test leaves the others on luong's pool.
    pub(crate) static TEAM_IN_THIS_TEST: std::cell::Cell<InThisTest> =
        const { std::cell::Cell::new(InThisTest::Never) };
}

/// The calling thread's OpenMP team, when luong may run on it (see the module's conditions).
fn team() -> Option<Team> {
    watch_forks();
    #[cfg(test)]
    if TEAM_IN_THIS_TEST.with(|t| t.get()) == InThisTest::Never {
        return None;
    }
    if !allowed() || FORKED.load(Ordering::Relaxed) {
        return None;
    }
    let team = lookup()?;
    // SAFETY: both take nothing and may be called from any thread.
    let usable = unsafe { (team.in_parallel)() == 0 && (team.max_threads)() > 1 };
    usable.then_some(team)
}

/// A team's workers as the calling thread last saw them: the team size they served and their
/// `/proc/self/task/<tid>/stat` files, read again (one `pread` each) before each step.
struct Workers {
    threads: usize,
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))] // read through `/proc`
    stats: Vec<std::fs::File>,
}

impl Workers {
    /// Whether every worker is running or runnable now (spinning between regions), or `None`
    /// when one's state cannot be read (it exited: learn the team again). A team the runtime
    /// gave no workers (a thread limit of 1) never counts as running: luong's pool is parallel.
    #[cfg(target_os = "linux")]
    fn running(&self) -> Option<bool> {
        use std::os::unix::fs::FileExt;
        if self.stats.is_empty() {
            return Some(false);
        }
        let mut buf = [0u8; 128];
        for stat in &self.stats {
            let n = stat.read_at(&mut buf, 0).ok()?;
            // "tid (comm) S ...": the state follows the last ')' (comm may hold one).
            let close = buf[..n].iter().rposition(|&c| c == b')')?;
            if buf.get(close + 2)? != &b'R' {
                return Some(false);
            }
        }
        Some(true)
    }

    #[cfg(not(target_os = "linux"))]
    fn running(&self) -> Option<bool> {
        None
    }
}

thread_local! {
    static WORKERS: RefCell<Option<Workers>> = const { RefCell::new(None) };
}

/// How a parallel step of `threads` threads should run now: on the calling thread's team when
/// its workers are running (`Some((team, false))`), or when they are not known yet (`Some((team,
/// true))`: the region is to report its workers' ids to [`remember`]); `None` for luong's pool.
pub(crate) fn awake_team(threads: usize) -> Option<(Team, bool)> {
    let team = team()?;
    WORKERS.with(|w| {
        let mut w = w.borrow_mut();
        let known = w.as_ref().filter(|w| w.threads == threads);
        #[cfg(test)]
        if TEAM_IN_THIS_TEST.with(|t| t.get()) == InThisTest::Always {
            return Some((team, known.is_none()));
        }
        match known.map(Workers::running) {
            Some(Some(true)) => Some((team, false)),
            Some(Some(false)) => None,
            Some(None) | None => {
                *w = None;
                Some((team, true))
            }
        }
    })
}

/// Notes the workers (thread ids) that ran a region of `threads` threads on this thread's team.
pub(crate) fn remember(threads: usize, tids: &[i32]) {
    let stats = tids
        .iter()
        .map(|tid| std::fs::File::open(format!("/proc/self/task/{tid}/stat")))
        .collect::<std::io::Result<Vec<_>>>();
    WORKERS.with(|w| *w.borrow_mut() = stats.ok().map(|stats| Workers { threads, stats }));
}

/// The calling thread's kernel thread id (for [`remember`]).
pub(crate) fn thread_id() -> i32 {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid takes nothing and cannot fail.
    return unsafe { libc::gettid() };
    #[cfg(not(target_os = "linux"))]
    return 0;
}

/// Where luong's parallel steps run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParallelBackend {
    /// luong's own pool (see [`crate::set_num_threads`]).
    Pool,
    /// The host program's OpenMP team of the calling thread (PyTorch's, for instance), which a
    /// call joins while the team's workers run (they spin for a while after each host region).
    OpenMp,
}

impl ParallelBackend {
    /// `"luong"` or `"openmp"`, the names Python's `luong.parallel_backend()` returns.
    pub fn as_str(self) -> &'static str {
        match self {
            ParallelBackend::Pool => "luong",
            ParallelBackend::OpenMp => "openmp",
        }
    }
}

/// Where a parallel call made on this thread runs its steps: [`ParallelBackend::OpenMp`] when
/// it may join the host's OpenMP team (on Linux, an OpenMP runtime in the process's global
/// symbol scope, as PyTorch loads one; the calling thread not inside an OpenMP region; that
/// runtime allowing more than one thread; the process not forked after luong was loaded;
/// `LUONG_OPENMP` not `0`), which it does while the team's workers run, and on luong's pool
/// otherwise. Either way a call uses [`crate::num_threads`] threads and computes the same bits.
pub fn parallel_backend() -> ParallelBackend {
    match team() {
        Some(_) => ParallelBackend::OpenMp,
        None => ParallelBackend::Pool,
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// The team is left alone inside one of its regions (a nested region would have one thread)
    /// and when the host holds OpenMP to one thread; it is used again once allowed.
    #[test]
    fn the_team_is_not_used_nested_or_when_held_to_one_thread() {
        let team = crate::pool::tests::on_gnu_openmp(InThisTest::AsUsual);
        assert_eq!(parallel_backend(), ParallelBackend::OpenMp);
        extern "C" fn inside(data: *mut c_void) {
            // SAFETY: `data` is the test's `AtomicUsize`, alive until the region returns.
            let nested = unsafe { &*(data as *const std::sync::atomic::AtomicUsize) };
            crate::openmp::TEAM_IN_THIS_TEST.with(|t| t.set(InThisTest::AsUsual));
            if parallel_backend() == ParallelBackend::OpenMp {
                nested.fetch_add(1, Ordering::SeqCst);
            }
        }
        let nested = std::sync::atomic::AtomicUsize::new(0);
        // SAFETY: `inside` does not unwind and `nested` outlives the region.
        unsafe { team.run(2, inside, &nested as *const _ as *mut c_void) };
        assert_eq!(
            nested.load(Ordering::SeqCst),
            0,
            "a thread inside a region would nest one"
        );
        type SetNum = unsafe extern "C" fn(c_int);
        // SAFETY: looked up by name in the runtime just loaded; it has this C signature.
        let set_num: SetNum = unsafe {
            let p = libc::dlsym(libc::RTLD_DEFAULT, c"omp_set_num_threads".as_ptr());
            assert!(!p.is_null());
            std::mem::transmute::<*mut c_void, SetNum>(p)
        };
        // SAFETY: sets this thread's OpenMP thread count (an ICV of the calling thread only).
        unsafe { set_num(1) };
        assert_eq!(parallel_backend(), ParallelBackend::Pool);
        // SAFETY: as above.
        unsafe { set_num(2) };
        assert_eq!(parallel_backend(), ParallelBackend::OpenMp);
    }

    /// The first step on a thread runs on the team (noting its worker); once the worker sleeps,
    /// steps run on luong's pool and never on it.
    #[test]
    fn steps_leave_the_team_while_its_worker_sleeps() {
        let team = crate::pool::tests::on_gnu_openmp(InThisTest::AsUsual);
        let pool = crate::pool::tests::two_threads();
        // Where the items of one step ran: (on the team's worker, on luong's pool).
        let step = || {
            let (worker, helper) = (AtomicUsize::new(0), AtomicUsize::new(0));
            crate::pool::run_indexed(
                &pool,
                200,
                || (),
                |_, _| {
                    crate::pool::tests::spin_for(20);
                    if team.thread_num() != 0 {
                        worker.fetch_add(1, Ordering::Relaxed);
                    }
                    if crate::pool::tests::on_luong_pool() {
                        helper.fetch_add(1, Ordering::Relaxed);
                    }
                },
            );
            (worker.into_inner(), helper.into_inner())
        };
        let (_, helper) = step();
        assert_eq!(
            helper, 0,
            "the first step (which notes the team) ran on the pool"
        );
        // GNU OpenMP's worker spins for a while (from about 0.1 ms on ARM cores to a few ms on
        // x86 ones, longer under emulation), then sleeps.
        let start = std::time::Instant::now();
        while awake_team(2).is_some() {
            assert!(
                start.elapsed().as_secs() < 10,
                "the team's worker never went to sleep"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // A helper may wake too late for the first few steps: repeat until one takes items.
        for round in 0.. {
            let (worker, helper) = step();
            assert_eq!(
                worker, 0,
                "round {round}: {worker} items on the sleeping team's worker"
            );
            if helper > 0 {
                break;
            }
            assert!(round < 100, "luong's pool never took an item");
        }
    }

    /// A thread's state as `Workers::running` reads it: running (this thread, reading), asleep
    /// (a thread blocked on a channel), unreadable once the thread has exited; a team without
    /// workers never counts as running.
    #[test]
    fn workers_count_as_running_only_while_their_threads_run() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            tid_tx.send(thread_id()).unwrap();
            go_rx.recv().unwrap();
        });
        let sleeping = tid_rx.recv().unwrap();
        let workers = |tid: i32| {
            let stat = std::fs::File::open(format!("/proc/self/task/{tid}/stat")).unwrap();
            Workers {
                threads: 2,
                stats: vec![stat],
            }
        };
        assert_eq!(workers(thread_id()).running(), Some(true));
        let none = Workers {
            threads: 1,
            stats: Vec::new(),
        };
        assert_eq!(
            none.running(),
            Some(false),
            "a team without workers counts as running"
        );
        let asleep = workers(sleeping);
        // The sleeper may not have reached `recv` yet: it is asleep within a second.
        let start = std::time::Instant::now();
        while asleep.running() != Some(false) {
            assert!(
                start.elapsed().as_secs() < 1,
                "a blocked thread reads as running"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        go_tx.send(()).unwrap();
        sleeper.join().unwrap();
        // `join` can return while the kernel still tears the thread down (seen under qemu-user):
        // its state is unreadable within a second.
        let start = std::time::Instant::now();
        while asleep.running().is_some() {
            assert!(
                start.elapsed().as_secs() < 1,
                "an exited thread's state was read"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

//! The host program's OpenMP team, which luong's parallel steps join when the process has one.
//!
//! A host that computes with OpenMP (PyTorch's libgomp, MKL's libiomp5, LLVM's libomp) leaves
//! its team's workers spinning on their cores for milliseconds after each of its parallel regions
//! (libgomp's default wait policy). A luong helper woken then finds no free core and shares one
//! with the caller or a spinner, so a call between two torch ops runs at about one core's speed.
//! Those spinning workers take a new region at once: luong's items run as one OpenMP region on
//! the calling thread's team instead of on luong's pool. Nothing is linked: the runtime is looked
//! up in the process's global symbol scope (where PyTorch puts its libgomp) at each call until
//! found, so `import luong` needs no OpenMP and a runtime loaded later is found then.
//!
//! The team is not used when `LUONG_OPENMP=0`, inside an OpenMP region (a nested region would be
//! one thread), when the host's OpenMP is held to one thread (`omp_get_max_threads() == 1`, as
//! PyTorch's DataLoader workers set it), or in a process forked after luong was loaded (GNU
//! OpenMP's team does not survive `fork`: its next region waits forever for the parent's
//! workers). Which thread runs an item never changes what it computes.

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

#[cfg(unix)]
extern "C" fn after_fork_in_child() {
    FORKED.store(true, Ordering::Relaxed);
}

/// Notes every later `fork` (in the child), so that a forked process keeps to luong's pool.
pub(crate) fn watch_forks() {
    static WATCH: Once = Once::new();
    WATCH.call_once(|| {
        #[cfg(unix)]
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

#[cfg(unix)]
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

#[cfg(not(unix))]
fn lookup() -> Option<Team> {
    None
}

#[cfg(test)]
thread_local! {
    /// Unit tests share one process: only a test that asks for it gets the team (on its thread),
    /// so loading an OpenMP runtime for one test leaves the others on luong's pool.
    pub(crate) static TEAM_IN_THIS_TEST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The calling thread's OpenMP team, when luong's parallel steps should run on it (see the
/// module's conditions).
pub(crate) fn team() -> Option<Team> {
    watch_forks();
    #[cfg(test)]
    if !TEAM_IN_THIS_TEST.with(|t| t.get()) {
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

/// Where luong's parallel steps run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParallelBackend {
    /// luong's own pool (see [`crate::set_num_threads`]).
    Pool,
    /// The host program's OpenMP team of the calling thread (PyTorch's, for instance), which a
    /// call joins when the process has an OpenMP runtime in its global symbol scope.
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

/// Where a parallel call made now on this thread would run its steps: on the host's OpenMP team
/// when the process has an OpenMP runtime in its global symbol scope (PyTorch loads one), the
/// calling thread is not inside an OpenMP region, that runtime allows more than one thread, the
/// process was not forked after luong was loaded and `LUONG_OPENMP` is not `0`; otherwise on
/// luong's pool. Either way a call uses [`crate::num_threads`] threads and computes the same bits.
pub fn parallel_backend() -> ParallelBackend {
    match team() {
        Some(_) => ParallelBackend::OpenMp,
        None => ParallelBackend::Pool,
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The team is left alone inside one of its regions (a nested region would have one thread)
    /// and when the host holds OpenMP to one thread; it is used again once allowed.
    #[test]
    fn the_team_is_not_used_nested_or_when_held_to_one_thread() {
        let team = crate::pool::tests::on_gnu_openmp();
        assert_eq!(parallel_backend(), ParallelBackend::OpenMp);
        extern "C" fn inside(data: *mut c_void) {
            // SAFETY: `data` is the test's `AtomicUsize`, alive until the region returns.
            let nested = unsafe { &*(data as *const std::sync::atomic::AtomicUsize) };
            crate::openmp::TEAM_IN_THIS_TEST.with(|t| t.set(true));
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
}

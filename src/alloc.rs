//! Where results live: arrays allocated fallibly (an error, not an abort, when they do not fit),
//! starting on a cache line, and advised for transparent huge pages when large; and the zeroing
//! of a work item's uninitialised rows. The ground the entry layer and the kernels stand on.

use std::mem::MaybeUninit;

use ndarray::Array3;

use crate::error::{AttentionError, Result};
use crate::float::Float;
use crate::shape::checked_len;

/// A zero-filled array, or [`AttentionError::TooLarge`] when it cannot be allocated (instead of
/// the abort an ordinary allocation failure would be).
pub(crate) fn zeros<T: Float>(shape: [usize; 3], what: &'static str) -> Result<Array3<T>> {
    let n = checked_len(&shape, what)?;
    let mut data: Vec<T> = Vec::new();
    data.try_reserve_exact(n)
        .map_err(|_| AttentionError::TooLarge {
            what,
            shape: shape.to_vec(),
        })?;
    huge_pages(data.as_mut_ptr().cast(), n * std::mem::size_of::<T>());
    data.resize(n, T::zero());
    Ok(Array3::from_shape_vec(shape, data).expect("length matches shape"))
}

/// Where a result's first element sits: on a cache line (64 bytes), so that the kernels'
/// 64-byte stores of output rows and returned weights each fill one line instead of straddling
/// two (glibc hands out large blocks 16 bytes past a page, or 32 past a line).
const RESULT_ALIGN: usize = 64;

/// An uninitialised array whose first element is [`RESULT_ALIGN`]-aligned, or
/// [`AttentionError::TooLarge`] when it cannot be allocated. It owns a block up to
/// `RESULT_ALIGN` bytes longer than its elements (NumPy keeps the whole block alive).
pub(crate) fn uninit<T: Float>(
    shape: [usize; 3],
    what: &'static str,
) -> Result<Array3<MaybeUninit<T>>> {
    let n = checked_len(&shape, what)?;
    let extra = RESULT_ALIGN / std::mem::size_of::<T>();
    let too_large = || AttentionError::TooLarge {
        what,
        shape: shape.to_vec(),
    };
    let mut data: Vec<MaybeUninit<T>> = Vec::new();
    data.try_reserve_exact(n.checked_add(extra).ok_or_else(too_large)?)
        .map_err(|_| too_large())?;
    // SAFETY: MaybeUninit needs no initialisation, and the capacity is n + extra.
    unsafe { data.set_len(n + extra) };
    // Elements to skip to the boundary: fewer than `extra`, as the allocator aligns at least
    // to T (`usize::MAX` if it could not be reached: then the block's start).
    let off = match data.as_ptr().align_offset(RESULT_ALIGN) {
        o if o < extra => o,
        _ => 0,
    };
    huge_pages(
        data[off..].as_mut_ptr().cast(),
        n * std::mem::size_of::<T>(),
    );
    let data = ndarray::Array1::from_vec(data).slice_move(ndarray::s![off..off + n]);
    Ok(data
        .into_shape_with_order(shape)
        .expect("length matches shape"))
}

/// Results this large ask Linux for transparent huge pages (as NumPy does for its arrays from
/// 4 MiB).
#[cfg(target_os = "linux")]
const HUGE_PAGES_FROM: usize = 4 << 20;

/// Asks Linux to back `bytes` at `p` (an allocation about to be written) with transparent huge
/// pages, when it is at least [`HUGE_PAGES_FROM`] long. Allocations this large are often fresh
/// mappings (glibc maps every one from 32 MiB on), filled in on first touch one 4 KiB page at a
/// time, each a fault. Only advice: where the kernel has no huge page to give, THP is off, or
/// the memory is already in use, nothing changes.
fn huge_pages(p: *mut u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    if bytes >= HUGE_PAGES_FROM {
        // SAFETY: sysconf reads a constant of the system.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        let start = (p as usize).next_multiple_of(page);
        let end = (p as usize + bytes) / page * page;
        if end > start {
            // SAFETY: the range lies inside this allocation, and MADV_HUGEPAGE changes no
            // contents, only how the pages are backed; failure leaves the mapping as it was.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, bytes);
}

/// Zeroes a work item's rows and hands them out as initialised floats.
pub(crate) fn init<T: Float>(rows: &mut [MaybeUninit<T>]) -> &mut [T] {
    for x in rows.iter_mut() {
        x.write(T::zero());
    }
    // SAFETY: every element was just written, and MaybeUninit<T> has T's layout.
    unsafe { &mut *(rows as *mut [MaybeUninit<T>] as *mut [T]) }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// `THPeligible` of the mapping holding address `p`, from /proc/self/smaps.
    fn thp_eligible(p: usize) -> Option<bool> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= p && p < b;
                    continue;
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("THPeligible:") {
                    return Some(v.trim() == "1");
                }
            }
        }
        None
    }

    /// Every result starts on a cache line, whatever the allocator returned, and its elements
    /// are all there (the last one writable).
    #[test]
    fn results_start_on_a_cache_line() {
        for n in [1usize, 3, 17, 1000, 100_000, 3 << 20] {
            let mut a = uninit::<f32>([1, 1, n], "output").unwrap();
            assert_eq!(a.as_ptr() as usize % RESULT_ALIGN, 0, "f32, {n} elements");
            assert_eq!(a.len(), n);
            a[[0, 0, n - 1]].write(1.0);
            let b = uninit::<f64>([n, 1, 1], "scores").unwrap();
            assert_eq!(b.as_ptr() as usize % RESULT_ALIGN, 0, "f64, {n} elements");
            assert!(b.is_standard_layout());
        }
    }

    /// A large result is advised for transparent huge pages wherever the kernel takes the advice:
    /// it is eligible exactly when a mapping this test advises itself is (64 MiB, past glibc's
    /// largest threshold, is a mapping of its own). Where the process runs natively (x86-64 here)
    /// that is wherever the kernel has them (not `[never]`); under qemu-user, which does not pass
    /// madvise on, neither is.
    #[test]
    fn large_results_ask_for_huge_pages() {
        const LEN: usize = 64 << 20;
        let big = uninit::<f32>([4, 2048, 2048], "scores").unwrap();
        let middle = big.as_ptr() as usize + (32 << 20);
        // SAFETY: a fresh private anonymous mapping of LEN bytes, advised and unmapped here and
        // never dereferenced.
        let control = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            libc::madvise(p, LEN, libc::MADV_HUGEPAGE);
            let eligible = thp_eligible(p as usize + LEN / 2);
            libc::munmap(p, LEN);
            eligible
        };
        assert_eq!(thp_eligible(middle), control, "64 MiB result");
        if cfg!(target_arch = "x86_64") {
            let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
            let thp = mode.is_ok_and(|m| !m.contains("[never]"));
            assert_eq!(control, Some(thp), "THP mode {thp}");
        }
    }
}

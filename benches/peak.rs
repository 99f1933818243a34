//! `cargo bench --bench peak [-- avx2|avx512|neon]`: the float32 FMA peak of an instruction set on
//! this machine, the number the kernels' rates are quoted against. Each thread (one per core
//! luong uses) runs independent FMA chains, enough to cover the FMA latency on every core we
//! know, for about 0.2 s; the best of five rounds is printed in GFLOP/s (2 flops per lane per
//! FMA). With no argument, every set the CPU has is measured.

use std::time::Instant;

/// Independent accumulators per thread: latency 4 × 2 FMA ports needs 8; 12 leaves margin.
const CHAINS: usize = 12;
/// FMA rounds per chain in a measurement (about 0.2 s on one core).
const ITERS: usize = 4_000_000;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    /// FMAs on ymm registers; returns a value that depends on every chain.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(seed: f32, iters: usize) -> f32 {
        let mut acc = [_mm256_set1_ps(seed); CHAINS];
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }

    /// FMAs on zmm registers; returns a value that depends on every chain.
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(seed: f32, iters: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(seed); CHAINS];
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::CHAINS;
    use std::arch::aarch64::*;

    /// FMAs on 128-bit NEON registers; returns a value that depends on every chain.
    pub fn neon(seed: f32, iters: usize) -> f32 {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe {
            let mut acc = [vdupq_n_f32(seed); CHAINS];
            let a = vdupq_n_f32(0.999_999);
            let b = vdupq_n_f32(1e-7);
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = vfmaq_f32(b, *x, a);
                }
            }
            let mut s = vdupq_n_f32(0.0);
            for x in acc {
                s = vaddq_f32(s, x);
            }
            vaddvq_f32(s)
        }
    }
}

/// GFLOP/s of `threads` threads each running `f` once (best of five rounds).
fn measure(lanes: usize, threads: usize, f: fn(f32, usize) -> f32, iters: usize) -> f64 {
    let flop = (2 * lanes * CHAINS * iters * threads) as f64;
    (0..5)
        .map(|round| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..threads {
                    s.spawn(move || std::hint::black_box(f((round * threads + t) as f32, iters)));
                }
            });
            flop / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

fn main() {
    // `cargo test --all-targets` runs this binary unoptimised and without `--bench`: a short
    // round then, to show it runs, not a measurement.
    let iters = if std::env::args().any(|a| a == "--bench") {
        ITERS
    } else {
        1_000
    };
    let threads = luong::num_threads();
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let mut any = false;
    #[cfg(target_arch = "x86_64")]
    {
        if want("avx2") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA were detected just above.
            let f: fn(f32, usize) -> f32 = |s, n| unsafe { x86::avx2(s, n) };
            println!(
                "avx2 {:.1} GFLOP/s on {threads} threads",
                measure(8, threads, f, iters)
            );
            any = true;
        }
        if want("avx512") && is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected just above.
            let f: fn(f32, usize) -> f32 = |s, n| unsafe { x86::avx512(s, n) };
            println!(
                "avx512 {:.1} GFLOP/s on {threads} threads",
                measure(16, threads, f, iters)
            );
            any = true;
        }
    }
    #[cfg(target_arch = "aarch64")]
    if want("neon") {
        println!(
            "neon {:.1} GFLOP/s on {threads} threads",
            measure(4, threads, arm::neon, iters)
        );
        any = true;
    }
    if !any {
        println!("no measured instruction set among {wanted:?} on this CPU");
    }
}

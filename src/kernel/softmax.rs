//! The SIMD softmax of one row of scores, and the SIMD exponential passes over a buffer, generic
//! over [`Simd`]: the fused item, the AMX item's softmax, the decoding path and the backward all
//! take their softmax from here.

use super::simd::Simd;

/// Softmax of `row` in place: the max (unless `known_max` gives it: the exact max of the row,
/// from the scores product's epilogue), then `e^(x - max)` and its sum. Returns `(max, sum)`;
/// with `normalize` the row is multiplied by `1 / sum` (the weights), else it is left as
/// `e^(x - max)` for the caller to scale the combined output instead (one multiply per Dv, not
/// per Tv). The backward recomputes the weights from `max` and `ln sum`.
///
/// Multiplying by the rounded reciprocal where Keras divides costs at most one ulp per weight.
/// Four accumulators hide the add latency; their fixed order keeps the bits deterministic. NaN
/// anywhere makes the whole row NaN, as in NumPy.
///
/// # Safety
/// `S`'s instructions must be available. All loads and stores are within `row` (whole vectors
/// of the body) or the 16-float `pad` (the tail), so no pointer leaves its slice.
#[inline(always)]
pub(crate) unsafe fn softmax_row<S: Simd>(
    row: &mut [f32],
    normalize: bool,
    known_max: Option<f32>,
) -> (f32, f32) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let l = S::LANES;
        let (body, tail) = row.split_at_mut(row.len() - row.len() % l);
        // The tail is processed as a full vector padded with -inf (e^-inf = 0 adds nothing).
        let mut pad = [f32::NEG_INFINITY; 16];
        pad[..tail.len()].copy_from_slice(tail);
        let (quads, singles) = body.split_at_mut(body.len() - body.len() % (4 * l));
        let p = quads.as_mut_ptr();
        // Four independent sums hide the latency (and maxima, in `row_max`).
        let row_max = match known_max {
            Some(m) => m,
            None => row_max::<S>(quads, singles, &pad),
        };
        let max = S::splat(row_max);
        let (mut s0, mut s1, mut s2, mut s3) = (S::zero(), S::zero(), S::zero(), S::zero());
        for x in (0..quads.len()).step_by(4 * l) {
            s0 = S::add(s0, exp_in_place::<S>(p.add(x), max));
            s1 = S::add(s1, exp_in_place::<S>(p.add(x + l), max));
            s2 = S::add(s2, exp_in_place::<S>(p.add(x + 2 * l), max));
            s3 = S::add(s3, exp_in_place::<S>(p.add(x + 3 * l), max));
        }
        // The padded tail only when there is one: an all -inf vector adds exact zeros (and a NaN
        // only where the row's own entries already give one), and at Tv = 128 it was a ninth exp.
        for c in singles.chunks_exact_mut(l) {
            s0 = S::add(s0, exp_in_place::<S>(c.as_mut_ptr(), max));
        }
        if !tail.is_empty() {
            s0 = S::add(s0, exp_in_place::<S>(pad.as_mut_ptr(), max));
        }
        let sum = S::sum(S::add(S::add(s0, s1), S::add(s2, s3)));
        if normalize {
            let v = S::splat(1.0 / sum);
            for c in body.chunks_exact_mut(l) {
                S::store(c.as_mut_ptr(), S::mul(S::load(c.as_ptr()), v));
            }
            if !tail.is_empty() {
                S::store(pad.as_mut_ptr(), S::mul(S::load(pad.as_ptr()), v));
            }
        }
        tail.copy_from_slice(&pad[..tail.len()]);
        (row_max, sum)
    }
}

/// The max of a row given as its whole groups of four vectors (`quads`), the whole vectors after
/// them (`singles`) and its tail padded with -inf (`pad`). Four independent maxima hide the
/// latency; all start from the padded tail.
///
/// # Safety
/// `S`'s instructions must be available; `quads` holds whole groups of `4 · LANES` floats.
#[inline(always)]
pub(crate) unsafe fn row_max<S: Simd>(quads: &[f32], singles: &[f32], pad: &[f32; 16]) -> f32 {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let (l, p) = (S::LANES, quads.as_ptr());
        // (No closures here: they would not inherit the caller's target features and would not
        // inline; plain loops do.)
        let first = S::load(pad.as_ptr());
        let (mut m0, mut m1, mut m2, mut m3) = (first, first, first, first);
        for x in (0..quads.len()).step_by(4 * l) {
            m0 = S::max(m0, S::load(p.add(x)));
            m1 = S::max(m1, S::load(p.add(x + l)));
            m2 = S::max(m2, S::load(p.add(x + 2 * l)));
            m3 = S::max(m3, S::load(p.add(x + 3 * l)));
        }
        for c in singles.chunks_exact(l) {
            m0 = S::max(m0, S::load(c.as_ptr()));
        }
        S::hmax(S::max(S::max(m0, m1), S::max(m2, m3)))
    }
}

/// [`row_max`] of a whole row.
///
/// # Safety
/// `S`'s instructions must be available.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the AMX item only
pub(crate) unsafe fn max_of_row<S: Simd>(row: &[f32]) -> f32 {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let l = S::LANES;
        let (body, tail) = row.split_at(row.len() - row.len() % l);
        let mut pad = [f32::NEG_INFINITY; 16];
        pad[..tail.len()].copy_from_slice(tail);
        let (quads, singles) = body.split_at(body.len() - body.len() % (4 * l));
        row_max::<S>(quads, singles, &pad)
    }
}

/// `p[..LANES] = e^(p[..LANES] - max)`, returning the new vector.
///
/// # Safety
/// `p` must point to `LANES` readable and writable floats.
#[inline(always)]
unsafe fn exp_in_place<S: Simd>(p: *mut f32, max: S::V) -> S::V {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let e = S::exp(S::sub(S::load(p), max));
        S::store(p, e);
        e
    }
}

/// `x = e^{c·x}` over a slice on ISA `S`.
///
/// # Safety
/// `S`'s instructions must be available. Whole vectors come from `chunks_exact_mut`; the tail is
/// read and written with masked loads and stores of exactly its length.
#[inline(always)]
pub(crate) unsafe fn exp_scaled_simd<S: Simd>(xs: &mut [f32], c: f32) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let (l, cv) = (S::LANES, S::splat(c));
        let mut chunks = xs.chunks_exact_mut(l);
        for ch in &mut chunks {
            S::store(ch.as_mut_ptr(), S::exp(S::mul(S::load(ch.as_ptr()), cv)));
        }
        let tail = chunks.into_remainder();
        let m = S::mask(tail.len());
        let v = S::exp(S::mul(S::load_masked(tail.as_ptr(), m), cv));
        S::store_masked(tail.as_mut_ptr(), m, v);
    }
}

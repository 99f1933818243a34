//! The softmax's pass between the two products: `e^(x - max)` of a row of scores split straight
//! into the weight parts ([`exp_split`], or 32 scores at a time as side work: [`ExpPass`]), and
//! the returned weights' scaling ([`scale_weights`]).

use std::arch::x86_64::*;

use super::split::{load32, store_parts, weight_row};
use crate::kernel::simd::exp_table;

/// Stores `v` to `dst + x ..`, only the lanes before `len`.
///
/// # Safety
/// AVX-512F; `dst` has `len` writable floats.
#[inline(always)]
unsafe fn store32(dst: *mut f32, x: usize, len: usize, v: [__m512; 2]) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        if x + 32 <= len {
            _mm512_storeu_ps(dst.add(x), v[0]);
            _mm512_storeu_ps(dst.add(x + 16), v[1]);
            return;
        }
        let mask = |x: usize| -> __mmask16 { ((1u32 << len.saturating_sub(x).min(16)) - 1) as u16 };
        _mm512_mask_storeu_ps(dst.add(x.min(len)), mask(x), v[0]);
        _mm512_mask_storeu_ps(dst.add((x + 16).min(len)), mask(x + 16), v[1]);
    }
}

/// The softmax's one pass over a row of (masked) scores: `e^(x - max)` split straight into row `r`
/// of the weight parts (width `kp`, zero past the row), whose sum it returns; the caller divides
/// the output row by it. `max` is the row's max, from
/// [`max_of_row`](crate::kernel::softmax::max_of_row) or from this pass on the row before.
/// Alongside, from the same scores block in L2 (what separate passes cost, measured:
/// docs/performance.md, "Where the thresholds come from"):
/// - `next`, the next row, gives its max (returned; -inf when empty): a pass of its own waits on
///   those loads, here the exp's arithmetic hides them;
/// - with `copy` (`row.len()` floats: the returned weights) `e^(x - max)` is stored there too;
/// - `prev`, the row before's returned weights (`len` floats) with its `1 / sum`, are normalised:
///   the weights are `e^(x - max) · (1 / sum)` as before, without a pass of their own, and not
///   what is split, so the output is `(Σ e_j v_j) / sum` with or without them, Keras's `Σ w_j v_j`
///   to rounding.
///
/// The caller normalises the last row's weights ([`scale_weights`]). As in
/// [`softmax_row`](crate::kernel::softmax::softmax_row), NaN anywhere makes the row's output NaN.
///
/// # Safety
/// AVX-512F; `parts` and `kp` come from [`weight_parts`](super::split::weight_parts) for at least
/// `r + 1` rows, and `kp ≥ row.len(), next.len(), len`; `copy` has `row.len()` and `prev` `len`
/// writable floats.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp_split(
    row: &[f32],
    max: f32,
    parts: ([*mut u16; 3], usize, usize),
    copy: Option<*mut f32>,
    next: &[f32],
    prev: Option<(*mut f32, usize, f32)>,
) -> (f32, f32) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let mut pass = ExpPass::new(row, max, parts, copy, next, prev);
        while !pass.done() {
            pass.chunk();
        }
        pass.finish()
    }
}

/// [`exp_split`]'s pass over one row, 32 scores at a time ([`ExpPass::chunk`]), so that it can run
/// between tile products ([`SideWork`](super::side_work::SideWork)); the same operations in the
/// same order.
pub(crate) struct ExpPass {
    mv: __m512,
    src: *const f32,
    len: usize,
    nsrc: *const f32,
    nlen: usize,
    pw: *mut f32,
    plen: usize,
    pinv: __m512,
    dst: [*mut u16; 3],
    copy: Option<*mut f32>,
    sum: [__m512; 2],
    max: [__m512; 2],
    x: usize,
    kp: usize,
}

impl ExpPass {
    /// The pass of [`exp_split`] with these arguments, before its first chunk.
    ///
    /// # Safety
    /// As [`exp_split`]; the slices outlive the pass.
    #[inline(always)]
    pub(crate) unsafe fn new(
        row: &[f32],
        max: f32,
        (parts, r, kp): ([*mut u16; 3], usize, usize),
        copy: Option<*mut f32>,
        next: &[f32],
        prev: Option<(*mut f32, usize, f32)>,
    ) -> ExpPass {
        // SAFETY: within this function's `# Safety` contract, which the caller upholds.
        unsafe {
            let (pw, plen, pinv) = prev.unwrap_or((std::ptr::null_mut(), 0, 1.0));
            let neg = _mm512_set1_ps(f32::NEG_INFINITY);
            ExpPass {
                mv: _mm512_set1_ps(max),
                src: row.as_ptr(),
                len: row.len(),
                nsrc: next.as_ptr(),
                nlen: next.len(),
                pw,
                plen,
                pinv: _mm512_set1_ps(pinv),
                dst: weight_row(parts, r, kp),
                copy,
                sum: [_mm512_setzero_ps(); 2],
                max: [neg; 2],
                x: 0,
                kp,
            }
        }
    }

    /// Whether every chunk is done.
    #[inline(always)]
    pub(crate) fn done(&self) -> bool {
        self.x >= self.kp
    }

    /// The next 32 scores (the caller checks [`ExpPass::done`] first).
    ///
    /// # Safety
    /// AVX-512F, as [`exp_split`].
    #[inline(always)]
    pub(crate) unsafe fn chunk(&mut self) {
        // SAFETY: within this function's `# Safety` contract, which the caller upholds.
        unsafe {
            let x = self.x;
            if x < self.plen {
                scale32(self.pw, x, self.plen, self.pinv);
            }
            if x < self.nlen {
                let [lo, hi] = load32(self.nsrc, x, self.nlen, f32::NEG_INFINITY);
                self.max = [
                    _mm512_max_ps(self.max[0], lo),
                    _mm512_max_ps(self.max[1], hi),
                ];
            }
            // Past the row: e^-inf = 0, zero weight parts.
            let [lo, hi] = load32(self.src, x, self.len, f32::NEG_INFINITY);
            let e = [
                // x - max ≤ 0 (or NaN): no upper clamp.
                exp_table::<false>(_mm512_sub_ps(lo, self.mv)),
                exp_table::<false>(_mm512_sub_ps(hi, self.mv)),
            ];
            self.sum = [
                _mm512_add_ps(self.sum[0], e[0]),
                _mm512_add_ps(self.sum[1], e[1]),
            ];
            if let Some(c) = self.copy {
                store32(c, x, self.len, e);
            }
            store_parts::<true>(self.dst.map(|p| p.add(x / 32 * 512)), e);
            self.x = x + 32;
        }
    }

    /// The row's sum and the next row's max (-inf when it is empty), as [`exp_split`] returns.
    ///
    /// # Safety
    /// AVX-512F.
    #[inline(always)]
    pub(crate) unsafe fn finish(&self) -> (f32, f32) {
        // SAFETY: within this function's `# Safety` contract, which the caller upholds.
        unsafe {
            let sum = _mm512_reduce_add_ps(_mm512_add_ps(self.sum[0], self.sum[1]));
            (
                sum,
                _mm512_reduce_max_ps(_mm512_max_ps(self.max[0], self.max[1])),
            )
        }
    }
}

/// Floats `x .. x + 32` of the `len` at `w`, times `inv`.
///
/// # Safety
/// AVX-512F; `w` has `len` writable floats.
#[inline(always)]
unsafe fn scale32(w: *mut f32, x: usize, len: usize, inv: __m512) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let [lo, hi] = load32(w, x, len, 0.0);
        store32(w, x, len, [_mm512_mul_ps(lo, inv), _mm512_mul_ps(hi, inv)]);
    }
}

/// `len` weights at `w` times `inv` (the last row's, after [`exp_split`]).
///
/// # Safety
/// AVX-512F; `w` has `len` writable floats.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn scale_weights(w: *mut f32, len: usize, inv: f32) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let inv = _mm512_set1_ps(inv);
        let mut x = 0;
        while x < len {
            scale32(w, x, len, inv);
            x += 32;
        }
    }
}

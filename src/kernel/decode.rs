//! Decoding: few query rows against many keys (`Tq < PACK_MIN_TQ`, e.g. one new token against a
//! long cache). A work item per batch element would leave a thread idle whenever B is not a
//! multiple of the thread count, and gives a late-waking worker nothing to take; so the keys are
//! split into chunks of about [`SPLIT_KEYS`], each chunk is a work item that computes its own
//! softmax statistics and unnormalised output, and the chunks of a row are merged in a fixed
//! order (FlashDecoding's split-K):
//!
//! `M = max_c m_c`, `S = Σ_c e^{m_c - M} s_c`, `out = (Σ_c e^{m_c - M} o_c) · (1 / S)`.
//!
//! The chunking depends on Tv alone, so results are the same for any thread count and any
//! batch size. Used for f32 dot scores without dropout or returned weights (the general block
//! handles those). Masks on keys and the causal mask apply per chunk exactly as to a whole row
//! (`mask_cols`: masked and hidden scores get the bias subtracted), so every Keras corner (a
//! fully masked row, NaN keys behind the causal mask) comes out as in one pass.

use std::mem::MaybeUninit;
use std::ops::Range;

use ndarray::{ArrayViewMut3, Axis};

use super::family::Family;
use super::gemm::{self, dot_rows};
use super::item::Ctx;
use super::plan::PACK_MIN_TQ;
use super::simd::Simd;
use super::softmax::softmax_row;
use crate::config::ScoreMode;
use crate::cpu::Isa;
use crate::mask::mask_cols;
use crate::shape::Dims;

/// Keys per chunk: 1024 keys of D = Dv = 64 are 512 KiB of keys and values, enough work to
/// amortise an item while giving each thread several items at B = 8, Tv = 4096 (measured:
/// docs/performance.md, "Where the thresholds come from").
pub(crate) const SPLIT_KEYS: usize = 1024;

/// The number of key chunks for this call, or `None` when the split path does not apply.
fn chunks(ctx: &Ctx<'_, '_, f32>) -> Option<usize> {
    let Dims { tq, tv, d, dv, .. } = ctx.dims;
    let applies = ctx.isa != Isa::Scalar
        && ctx.params.mode == ScoreMode::Dot
        && tq > 0
        && tq < PACK_MIN_TQ
        && d > 0
        && dv > 0
        && !ctx.normalize
        && ctx.dropout.is_none();
    let n = tv.div_ceil(SPLIT_KEYS);
    (applies && n >= 2).then_some(n)
}

/// Runs the call on the split path when it applies (returns false, touching nothing, when not):
/// writes every row of `output` and of `stats` (`(max, ln Σ)` per row).
///
/// # Safety
/// `F`'s instructions must be available.
pub(crate) unsafe fn run_split<F: Family>(
    ctx: &Ctx<'_, '_, f32>,
    pool: Option<&rayon::ThreadPool>,
    output: &mut ArrayViewMut3<'_, MaybeUninit<f32>>,
    stats: Option<&mut ArrayViewMut3<'_, MaybeUninit<f32>>>,
) -> bool {
    let Some(n) = chunks(ctx) else {
        return false;
    };
    let Dims {
        batch, tq, tv, dv, ..
    } = ctx.dims;
    // Partial results of chunk c of batch element b: tq rows of [m, s, o_0 .. o_{Dv-1}].
    let stride = dv + 2;
    let per_item = tq * stride;
    let mut partial = vec![0.0f32; batch * n * per_item];
    let len = tv.div_ceil(n);
    let work = |scratch: &mut Vec<f32>, idx: usize, part: &mut [f32]| {
        let (b, c) = (idx / n, idx % n);
        let keys = c * len..((c + 1) * len).min(tv);
        scratch.resize(tq * len, 0.0);
        // SAFETY: the caller vouches for `F`; `scratch` was sized just above and `part` is one
        // item's `tq · (Dv + 2)` partial rows.
        unsafe { F::decode_chunk(ctx, b, keys, scratch, part) };
    };
    match pool {
        Some(pool) => {
            let parts: Vec<std::sync::Mutex<&mut [f32]>> = partial
                .chunks_exact_mut(per_item)
                .map(std::sync::Mutex::new)
                .collect();
            crate::pool::run_indexed(pool, batch * n, Vec::new, |scratch, i| {
                if let Ok(mut part) = parts[i].lock() {
                    work(scratch, i, &mut part);
                }
            });
        }
        None => {
            let mut scratch = Vec::new();
            for (i, part) in partial.chunks_exact_mut(per_item).enumerate() {
                work(&mut scratch, i, part);
            }
        }
    }
    merge(ctx, n, &partial, output, stats);
    true
}

/// Merges the chunks of every row, in chunk order.
fn merge(
    ctx: &Ctx<'_, '_, f32>,
    n: usize,
    partial: &[f32],
    output: &mut ArrayViewMut3<'_, MaybeUninit<f32>>,
    mut stats: Option<&mut ArrayViewMut3<'_, MaybeUninit<f32>>>,
) {
    let Dims { batch, tq, dv, .. } = ctx.dims;
    let stride = dv + 2;
    let mut acc = vec![0.0f32; dv];
    for b in 0..batch {
        for i in 0..tq {
            let part = |c: usize| &partial[((b * n + c) * tq + i) * stride..][..stride];
            // NaN anywhere makes the row NaN (as in one pass); otherwise the largest max.
            let max = (0..n).map(|c| part(c)[0]).fold(f32::NEG_INFINITY, |m, x| {
                if m.is_nan() || x.is_nan() {
                    f32::NAN
                } else {
                    m.max(x)
                }
            });
            acc.fill(0.0);
            let mut sum = 0.0f32;
            for c in 0..n {
                let p = part(c);
                // A chunk whose scores are all -inf (from infinite inputs) has weight 0 when
                // another chunk has a finite max; its own statistics are NaN (-inf - -inf).
                if p[0] == f32::NEG_INFINITY && max != f32::NEG_INFINITY {
                    continue;
                }
                let w = (p[0] - max).exp();
                sum += w * p[1];
                for (a, &o) in acc.iter_mut().zip(&p[2..]) {
                    *a += w * o;
                }
            }
            let keep = ctx.masks.query_keeps(b, i);
            let inv = 1.0 / sum;
            for (x, &a) in output.slice_mut(ndarray::s![b, i, ..]).iter_mut().zip(&acc) {
                // Keras's `where(query_mask, output, 0)`: exactly 0, even for NaN.
                x.write(if keep { a * inv } else { 0.0 });
            }
            if let Some(st) = stats.as_deref_mut() {
                st[[b, i, 0]].write(max);
                st[[b, i, 1]].write(sum.ln());
            }
        }
    }
}

/// One chunk of keys of batch element `b`, all its query rows, on ISA `S` (a family's
/// `decode_chunk`): scores, softmax statistics and the unnormalised output into `part` (`tq`
/// rows of `[m, s, o..]`).
///
/// # Safety
/// `S`'s instructions must be available; `scratch` holds `tq · keys.len()` floats and `part`
/// `tq · (Dv + 2)`. The views in `ctx` have contiguous rows and non-negative strides and were
/// checked against `ctx.dims` (as for `block_simd`), so key and value rows `keys` of batch
/// element `b` are in bounds; the combine reads whole value rows with full-width loads only
/// for whole panels of Dv and masked loads for the tail.
#[inline(always)]
pub(crate) unsafe fn chunk_simd<S: Simd, const NV: usize>(
    ctx: &Ctx<'_, '_, f32>,
    b: usize,
    keys: Range<usize>,
    scratch: &mut [f32],
    part: &mut [f32],
    mr: usize,
) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let Dims { tq, d, dv, .. } = ctx.dims;
        let n = keys.len();
        let stride = dv + 2;
        let q = ctx.query.index_axis(Axis(0), b);
        let k = ctx.key.index_axis(Axis(0), b);
        let v = ctx.value.index_axis(Axis(0), b);
        let (q_ld, k_ld, v_ld) = (
            q.stride_of(Axis(0)) as usize,
            k.stride_of(Axis(0)) as usize,
            v.stride_of(Axis(0)) as usize,
        );
        for r in 0..tq {
            let qr = std::slice::from_raw_parts(q.as_ptr().add(r * q_ld), d);
            let s = &mut scratch[r * n..(r + 1) * n];
            dot_rows::<S>(
                qr,
                k.as_ptr().add(keys.start * k_ld),
                k_ld,
                s,
                ctx.params.scale,
            );
            if ctx.masks.value.is_some() || ctx.masks.causal {
                mask_cols(
                    s,
                    keys.start,
                    ctx.masks.keys_of_row(b, r),
                    ctx.masks.causal.then_some(r),
                    ctx.params.mask_bias,
                );
            }
            let (max, sum) = softmax_row::<S>(s, false, None);
            (part[r * stride], part[r * stride + 1]) = (max, sum);
        }
        let g = gemm::Gemm {
            m: tq,
            n: dv,
            k: n,
            a: scratch.as_ptr(),
            lda: n,
            b: v.as_ptr().add(keys.start * v_ld),
            b_row: v_ld,
            b_panel: NV * S::LANES,
            c: part.as_mut_ptr().add(2),
            ldc: stride,
        };
        // Value rows stream from memory too: prefetched 8 rows ahead (measured:
        // docs/performance.md, "Where the thresholds come from").
        gemm::gemm::<S, _, NV>(&g, gemm::DotPrefetch::<8>, mr);
    }
}

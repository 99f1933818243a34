//! The f32 backward work item of dot-mode attention on the SIMD micro-kernels: the portable item's
//! algorithm (`ctx::BackCtx::portable_item`), with its five products on the register-tiled `gemm`.
//!
//! Per block of 64 keys `Kc`, `Vc` (both packed transposed once per block) and per chunk of up
//! to 512 query rows:
//! 1. `S = Q · Kcᵀ` (the forward's scores tile), then `P = e^((S·scale - max) - ln Σ)` with the
//!    forward's saved row statistics;
//! 2. `dP = dO · Vcᵀ`, then `dS = P ⊙ (dP·drop/keep - Δ)` and `W = P·drop/keep`;
//! 3. `dVc += Wᵀ · dO` and `dKc += dSᵀ · Q` (A read transposed, so W and dS are used as
//!    stored, in sub-chunks of 128 rows that stay in L1), and `dQ += dS · (Kc - k̄)` (a centred
//!    copy of the key block: see `backward::key_means`).
//!
//! Every accumulator is one sequential FMA chain (over the query rows for dK and dV, over the
//! keys for dQ), so the bits never depend on the chunking; the scale is applied by the caller.

use std::ops::Range;

use ndarray::{s, Axis};

use super::super::gemm;
use super::super::simd::Simd;
use super::ctx::{BackCtx, ItemGrads, Partials, KEY_BLOCK, ROW_CHUNK};
use crate::mask::mask_cols;
use crate::shape::Dims;

/// Query rows per sub-chunk of the `Wᵀ · dO` and `dSᵀ · Q` products: 128 rows of 64 floats are
/// 32 KiB, inside L1 (48 KiB).
const TA_ROWS: usize = 128;

/// The item on ISA `S`; `mr` = (rows of the `·ᵀ` tiles, rows of the plain tiles).
///
/// # Safety
/// `S`'s instructions must be available. Pointers stay in bounds because: the views in `ctx`
/// have non-negative strides and contiguous rows (`rows_contiguous`), with sizes checked against
/// `ctx.dims` (`shape::check_qkv`, and `backward_with` for d_output and the saved arrays); the
/// packed panels are sized `ceil(c / NR) · D · NR` (zero-padded); the chunk buffers are
/// `ROW_CHUNK × KEY_BLOCK` with leading dimension `KEY_BLOCK`, and the products write only their
/// `r × c` (scores), `c × D`, `c × Dv` (accumulators) and `r × D` (dQ rows `i0..i0 + r` of the
/// item's `Tq × D` share) parts.
#[inline(always)]
pub(crate) unsafe fn item<S: Simd, const NVS: usize, const NVC: usize>(
    ctx: &BackCtx<'_, '_, f32>,
    b: usize,
    keys: Range<usize>,
    g: ItemGrads<'_, f32>,
    (mr_t, mr): (usize, usize),
) -> Partials {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let Dims { tq, d, dv, .. } = ctx.dims;
        debug_assert!(g.dq.len() == tq * d);
        debug_assert!(g.dk.len() == keys.len() * d && g.dv.len() == keys.len() * dv);
        let nr = NVS * S::LANES;
        let kb = KEY_BLOCK;
        let panels = kb.div_ceil(nr);
        let mut kt = vec![0.0f32; panels * d * nr];
        // The key block minus the batch element's mean key, for dQ (`backward::key_means`).
        let mut kc = vec![0.0f32; kb * d];
        let mean = ctx.key_mean.row(b);
        let mean = mean.as_slice().expect("fresh arrays are standard");
        let mut vt = vec![0.0f32; panels * dv * nr];
        let ch = ROW_CHUNK.min(tq.max(1));
        let (mut raw, mut p, mut ds) = (
            vec![0.0f32; ch * kb],
            vec![0.0f32; ch * kb],
            vec![0.0f32; ch * kb],
        );
        let q = ctx.q.index_axis(Axis(0), b);
        let k = ctx.k.index_axis(Axis(0), b);
        let v = ctx.v.index_axis(Axis(0), b);
        let dout = ctx.dout.index_axis(Axis(0), b);
        let (q_ld, k_ld, do_ld) = (
            q.stride_of(Axis(0)) as usize,
            k.stride_of(Axis(0)) as usize,
            dout.stride_of(Axis(0)) as usize,
        );
        let mut d_scale = 0.0f64;
        for j0 in keys.clone().step_by(kb) {
            let c = kb.min(keys.end - j0);
            gemm::pack::<S>(
                k.slice(s![j0..j0 + c, ..]),
                nr,
                &mut kt[..c.div_ceil(nr) * d * nr],
            );
            gemm::pack::<S>(
                v.slice(s![j0..j0 + c, ..]),
                nr,
                &mut vt[..c.div_ceil(nr) * dv * nr],
            );
            for (jj, row) in kc.chunks_exact_mut(d).take(c).enumerate() {
                let key = std::slice::from_raw_parts(k.as_ptr().add((j0 + jj) * k_ld), d);
                for ((x, &kx), &m) in row.iter_mut().zip(key).zip(mean) {
                    *x = kx - m;
                }
            }
            let dk_blk = g.dk.as_mut_ptr().add((j0 - keys.start) * d);
            let dv_blk = g.dv.as_mut_ptr().add((j0 - keys.start) * dv);
            let mut i0 = ctx.first_row(b, j0);
            while i0 < tq {
                let r = ch.min(tq - i0);
                // 1. Raw scores and dP, both against transposed panels.
                let transposed =
                    |a: *const f32, lda: usize, panel: &[f32], kdim: usize, c_: &mut [f32]| {
                        gemm::Gemm {
                            m: r,
                            n: c,
                            k: kdim,
                            a,
                            lda,
                            b: panel.as_ptr(),
                            b_row: nr,
                            b_panel: kdim * nr,
                            c: c_.as_mut_ptr(),
                            ldc: kb,
                        }
                    };
                let g_s = transposed(q.as_ptr().add(i0 * q_ld), q_ld, &kt, d, &mut raw);
                gemm::gemm::<S, _, NVS>(&g_s, gemm::Dot { scale: None }, mr_t);
                let g_dp = transposed(dout.as_ptr().add(i0 * do_ld), do_ld, &vt, dv, &mut ds);
                gemm::gemm::<S, _, NVS>(&g_dp, gemm::Dot { scale: None }, mr_t);
                // 2. Weights, dS and W, row by row.
                let blk = Block { j0, c, i0, r };
                rows_weights_and_ds::<S>(ctx, b, blk, &raw, (&mut p, &mut ds), &mut d_scale);
                // 3. dVc += Wᵀ · dO, dKc += dSᵀ · Q (A transposed), dQ += dS · Kc.
                let grads = (dk_blk, dv_blk, g.dq.as_mut_ptr().add(i0 * d));
                accumulate::<S, NVC>(ctx, b, blk, (&p, &ds), &kc, grads, mr);
                i0 += r;
            }
        }
        (d_scale, 0.0)
    }
}

/// Rows `i0..i0 + r` of the item against key block `j0..j0 + c`, as the chunk buffers hold them
/// (leading dimension `KEY_BLOCK`).
#[derive(Clone, Copy)]
struct Block {
    j0: usize,
    c: usize,
    i0: usize,
    r: usize,
}

/// Step 2 of [`item`] for a block: from the raw scores, each row's weights `P` (into `p`, as
/// `W = P·drop/keep`) and `dS` (into `ds`, which holds `dP`), adding each row's share of the
/// scale's gradient to `d_scale` in row order.
///
/// # Safety
/// `S`'s instructions must be available; the buffers are the item's chunk buffers.
#[inline(always)]
unsafe fn rows_weights_and_ds<S: Simd>(
    ctx: &BackCtx<'_, '_, f32>,
    b: usize,
    Block { j0, c, i0, r }: Block,
    raw: &[f32],
    (p, ds): (&mut [f32], &mut [f32]),
    d_scale: &mut f64,
) {
    let Dims { tq, tv, .. } = ctx.dims;
    let kb = KEY_BLOCK;
    let scale = ctx.p.scale;
    let masked = ctx.masks.value.is_some() || ctx.masks.causal;
    for rr in 0..r {
        let i = i0 + rr;
        let row = rr * kb..rr * kb + c;
        let (raw_r, p_r, ds_r) = (&raw[row.clone()], &mut p[row.clone()], &mut ds[row]);
        let (stats, delta) = (
            (ctx.stats[[b, i, 0]], ctx.stats[[b, i, 1]]),
            ctx.delta[[b, i]],
        );
        if masked || ctx.dropout.is_some() {
            match scale {
                Some(s) => p_r.iter_mut().zip(raw_r).for_each(|(p, &x)| *p = x * s),
                None => p_r.copy_from_slice(raw_r),
            }
            mask_cols(
                p_r,
                j0,
                ctx.masks.keys_of_row(b, i),
                ctx.masks.causal.then_some(i),
                ctx.p.mask_bias,
            );
            // SAFETY: `S`'s instructions are available (this fn's contract).
            unsafe { exp_shifted::<S>(p_r, stats.0, stats.1) };
            let first = ((b * tq + i) * tv + j0) as u64;
            for (jj, (g, p)) in ds_r.iter_mut().zip(p_r.iter_mut()).enumerate() {
                match &ctx.dropout {
                    None => *g = *p * (*g - delta),
                    Some((mask, keep)) if mask.keeps(first + jj as u64) => {
                        *g = *p * (*g / *keep - delta);
                        *p /= *keep;
                    }
                    Some(_) => {
                        *g = *p * -delta;
                        *p = 0.0;
                    }
                }
            }
            if scale.is_some() {
                let sum = ds_r.iter().zip(raw_r).fold(0.0f32, |a, (&g, &x)| a + g * x);
                *d_scale += sum as f64;
            }
        } else {
            // SAFETY: as above; the three rows have equal lengths.
            *d_scale +=
                unsafe { weights_and_ds::<S>(raw_r, p_r, ds_r, scale, stats, delta) } as f64;
        }
    }
}

/// Step 3 of [`item`] for a block: `dVc += Wᵀ · dO` and `dKc += dSᵀ · Q` (A read transposed, in
/// sub-chunks of TA_ROWS rows so the dO and Q rows a sub-chunk reads stay in L1 while every tile
/// of the key block passes over them, as the forward's combine), and `dQ += dS · Kc`. Each
/// accumulator is still one sequential chain over the rows. `grads` points at the block's dK
/// and dV rows and the chunk's dQ rows.
///
/// # Safety
/// As [`item`]; `kc` is the block's centred keys.
#[inline(always)]
unsafe fn accumulate<S: Simd, const NVC: usize>(
    ctx: &BackCtx<'_, '_, f32>,
    b: usize,
    Block { c, i0, r, .. }: Block,
    (p, ds): (&[f32], &[f32]),
    kc: &[f32],
    (dk_blk, dv_blk, dq_rows): (*mut f32, *mut f32, *mut f32),
    mr: usize,
) {
    let Dims { d, dv, .. } = ctx.dims;
    let kb = KEY_BLOCK;
    let q = ctx.q.index_axis(Axis(0), b);
    let dout = ctx.dout.index_axis(Axis(0), b);
    let (q_ld, do_ld) = (
        q.stride_of(Axis(0)) as usize,
        dout.stride_of(Axis(0)) as usize,
    );
    let plain = |a: *const f32,
                 lda: usize,
                 m: usize,
                 kdim: usize,
                 bm: *const f32,
                 b_row: usize,
                 n: usize,
                 c_: *mut f32| {
        gemm::Gemm {
            m,
            n,
            k: kdim,
            a,
            lda,
            b: bm,
            b_row,
            b_panel: NVC * S::LANES,
            c: c_,
            ldc: n,
        }
    };
    let dot = gemm::Dot { scale: None };
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let mut s0 = 0;
        while s0 < r {
            let n_rows = TA_ROWS.min(r - s0);
            let (w_at, ds_at) = (p.as_ptr().add(s0 * kb), ds.as_ptr().add(s0 * kb));
            let do_at = dout.as_ptr().add((i0 + s0) * do_ld);
            let g_dv = plain(w_at, kb, c, n_rows, do_at, do_ld, dv, dv_blk);
            gemm::gemm_with::<S, _, NVC, true, true>(&g_dv, dot, mr);
            let q_at = q.as_ptr().add((i0 + s0) * q_ld);
            let g_dk = plain(ds_at, kb, c, n_rows, q_at, q_ld, d, dk_blk);
            gemm::gemm_with::<S, _, NVC, true, true>(&g_dk, dot, mr);
            s0 += n_rows;
        }
        let g_dq = plain(ds.as_ptr(), kb, r, c, kc.as_ptr(), d, d, dq_rows);
        gemm::gemm_with::<S, _, NVC, false, true>(&g_dq, dot, mr);
    }
}

/// `x = e^((x - max) - ln_sum)` over a row, on ISA `S` (masked loads and stores for the tail).
///
/// # Safety
/// `S`'s instructions must be available.
#[inline(always)]
unsafe fn exp_shifted<S: Simd>(xs: &mut [f32], max: f32, ln_sum: f32) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let (l, mv, lv) = (S::LANES, S::splat(max), S::splat(ln_sum));
        let mut chunks = xs.chunks_exact_mut(l);
        for ch in &mut chunks {
            let x = S::load(ch.as_ptr());
            S::store(ch.as_mut_ptr(), S::exp(S::sub(S::sub(x, mv), lv)));
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let m = S::mask(tail.len());
            let x = S::load_masked(tail.as_ptr(), m);
            S::store_masked(tail.as_mut_ptr(), m, S::exp(S::sub(S::sub(x, mv), lv)));
        }
    }
}

/// One row of an unmasked block without dropout, in one pass: `p = e^((raw·scale - max) -
/// ln Σ)`, `dS = p ⊙ (dP - Δ)` (dS overwrites dP in `ds`); returns `Σ dS ⊙ raw` when scaled
/// (the row's share of d scale), else 0.
///
/// # Safety
/// `S`'s instructions must be available; the three slices have equal lengths.
#[inline(always)]
unsafe fn weights_and_ds<S: Simd>(
    raw: &[f32],
    p: &mut [f32],
    ds: &mut [f32],
    scale: Option<f32>,
    (max, ln_sum): (f32, f32),
    delta: f32,
) -> f32 {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        debug_assert!(raw.len() == p.len() && p.len() == ds.len());
        let (l, n) = (S::LANES, raw.len());
        let (mv, lv, dl) = (S::splat(max), S::splat(ln_sum), S::splat(delta));
        let sv = S::splat(scale.unwrap_or(1.0));
        let mut acc = S::zero();
        // Whole vectors with plain loads and stores (AVX2's masked stores are slow on AMD), then
        // the tail through a mask; the tail's dS is read back through the mask so lanes past the
        // row (exp of anything) add exactly 0 to the sum.
        let whole = n - n % l;
        let mut j = 0;
        while j < whole {
            let x = S::load(raw.as_ptr().add(j));
            let xs = if scale.is_some() { S::mul(x, sv) } else { x };
            let e = S::exp(S::sub(S::sub(xs, mv), lv));
            S::store(p.as_mut_ptr().add(j), e);
            let g = S::mul(e, S::sub(S::load(ds.as_ptr().add(j)), dl));
            S::store(ds.as_mut_ptr().add(j), g);
            acc = S::fma(g, x, acc);
            j += l;
        }
        if whole < n {
            let m = S::mask(n - whole);
            let x = S::load_masked(raw.as_ptr().add(whole), m);
            let xs = if scale.is_some() { S::mul(x, sv) } else { x };
            let e = S::exp(S::sub(S::sub(xs, mv), lv));
            S::store_masked(p.as_mut_ptr().add(whole), m, e);
            let g = S::mul(e, S::sub(S::load_masked(ds.as_ptr().add(whole), m), dl));
            S::store_masked(ds.as_mut_ptr().add(whole), m, g);
            let g = S::load_masked(ds.as_ptr().add(whole), m);
            acc = S::fma(g, x, acc);
        }
        if scale.is_some() {
            S::sum(acc)
        } else {
            0.0
        }
    }
}

//! The fused forward item, written once for every SIMD family ([`item`], generic over [`Simd`]
//! and the family's tile shape): the scores product (with the row max in its epilogue when no
//! mask applies), then row by row the masks, the softmax and dropout, then the combine in chunks
//! of keys that stay in L1, and each output row times its factor.

use std::mem::MaybeUninit;

use ndarray::Axis;

use super::gemm::{self, dot_rows};
use super::item::{causal_lengths, finish_fast_row, finish_out_rows, masked, Ctx, Item};
use super::keys::KeyCache;
use super::plan::{COMBINE_KEYS, CONCAT_EXP_LIMIT, MAX_ITEM_ROWS};
use super::simd::Simd;
use super::softmax::exp_scaled_simd;
use crate::config::ScoreMode;
use crate::score::score_row;
use crate::shape::Dims;

/// A family's row counts for the fused item's two products (their widths are `NVS` and `NVC`
/// vectors).
#[derive(Clone, Copy)]
pub(crate) struct Tiles {
    /// Rows of the scores tile.
    pub(crate) scores_mr: usize,
    /// Rows of the combine tile.
    pub(crate) combine_mr: usize,
}

/// The fused item on ISA `S`, its scores in panels of `NVS` vectors and its combine in tiles
/// `NVC` vectors wide.
///
/// # Safety
/// `S`'s instructions must be available; `keys` was prepared (`KeyCache::prepare`) for this
/// batch element and ISA.
///
/// Why the raw pointers stay in bounds: the views in `ctx` have non-negative strides and
/// contiguous rows (`shape::rows_contiguous`), and `shape::check_qkv` / `check_masks` checked
/// every size against `ctx.dims`. The query block starts at row `i0 < Tq` and spans `rows`
/// rows with `i0 + rows <= Tq` (`run_items`); the packed panels of the element are `per_batch`
/// floats (`KeyCache::prepare` sizes them), zero-padded to whole panels, so the full-width
/// loads of a panel stay inside; value rows are read with full-width loads only for whole
/// panels of `Dv` columns and with masked loads (which touch no masked-off lane) for the tail;
/// `scores` holds `rows · Tv` and `out` `rows · Dv` floats (asserted below), and the products
/// write only `rows × cols` and `rows × Dv` of them.
#[inline(always)]
pub(crate) unsafe fn item<S: Simd, const NVS: usize, const NVC: usize>(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    keys: &KeyCache,
    scores: &mut [MaybeUninit<f32>],
    out: &mut [f32],
    stats: Option<&mut [f32]>,
    tiles: Tiles,
) {
    let Dims { tv, dv, .. } = ctx.dims;
    debug_assert!(scores.len() >= item.rows * tv && out.len() >= item.rows * dv);
    let mut lens = [tv; MAX_ITEM_ROWS];
    let cols = causal_lengths(ctx, item, keys.finite, &mut lens);
    // Without masks the packed product also finds each row's max (lane-wise, per row) as it
    // stores the scores, and the softmax skips its pass to find it.
    let fused_max = keys.has_panels && ctx.params.mode == ScoreMode::Dot && !masked(ctx.masks);
    let mut row_max = [f32::NEG_INFINITY; MAX_ITEM_ROWS * 16];
    let max = fused_max.then_some(&mut row_max);
    // SAFETY: within this function's `# Safety` contract, which the caller upholds; the three
    // steps' contracts are its parts.
    unsafe {
        let scores = scores_step::<S, NVS>(ctx, item, keys, cols, scores, max, tiles);
        let max = fused_max.then_some(&row_max);
        let inv = softmax_step::<S>(ctx, item, (cols, &lens), scores, max, stats);
        combine_step::<S, NVC>(ctx, item, keys, cols, scores, out, tiles);
        finish_out_rows(ctx, item, out, &inv);
    }
}

/// Step 1 of [`item`]: the scores for the first `cols` keys (the rest are hidden from every row
/// of the block), as the `rows × Tv` block it returns. `scores` may be uninitialised (the
/// returned weights' rows): the packed product writes every row's first `cols` entries and the
/// rest are zeroed here, so no pass writes zeros first; the other score paths work on slices and
/// get a zeroed block. With `row_max`, the packed product also leaves each row's lane-wise max
/// there (dot scores in panels, no masks).
///
/// # Safety
/// As [`item`].
#[inline(always)]
unsafe fn scores_step<'s, S: Simd, const NVS: usize>(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    keys: &KeyCache,
    cols: usize,
    scores: &'s mut [MaybeUninit<f32>],
    row_max: Option<&mut [f32; MAX_ITEM_ROWS * 16]>,
    tiles: Tiles,
) -> &'s mut [f32] {
    let Dims { tv, d, .. } = ctx.dims;
    let Item { b, i0, rows } = item;
    let q = ctx.query.index_axis(Axis(0), b);
    let q_ld = q.stride_of(Axis(0));
    let nr = NVS * S::LANES;
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let q0 = q.as_ptr().offset(i0 as isize * q_ld);
        match ctx.params.mode {
            ScoreMode::Dot if keys.has_panels => {
                let sc = scores.as_mut_ptr().cast::<f32>();
                let g = gemm::Gemm {
                    m: rows,
                    n: cols,
                    k: d,
                    a: q0,
                    lda: q_ld as usize,
                    b: keys.packed.as_ptr(),
                    b_row: nr,
                    b_panel: d * nr,
                    c: sc,
                    ldc: tv,
                };
                let dot = gemm::Dot {
                    scale: ctx.params.scale,
                };
                match row_max {
                    Some(m) => {
                        let max = m.as_mut_ptr();
                        gemm::gemm::<S, _, NVS>(&g, gemm::DotMax { dot, max }, tiles.scores_mr)
                    }
                    None => gemm::gemm::<S, _, NVS>(&g, dot, tiles.scores_mr),
                }
                if cols < tv {
                    for r in 0..rows {
                        std::ptr::write_bytes(sc.add(r * tv + cols), 0, tv - cols);
                    }
                }
                // Every one of the `rows · Tv` entries was just written (the product the first
                // `cols` of each row, `write_bytes` the rest), and MaybeUninit<f32> has f32's
                // layout.
                std::slice::from_raw_parts_mut(sc, rows * tv)
            }
            ScoreMode::Dot => {
                let scores = crate::alloc::init(&mut scores[..rows * tv]);
                let k = ctx.key.index_axis(Axis(0), b);
                for r in 0..rows {
                    let qr = std::slice::from_raw_parts(q0.offset(r as isize * q_ld), d);
                    let s = &mut scores[r * tv..r * tv + cols];
                    dot_rows::<S>(
                        qr,
                        k.as_ptr(),
                        k.stride_of(Axis(0)) as usize,
                        s,
                        ctx.params.scale,
                    );
                }
                scores
            }
            ScoreMode::Concat => {
                let scores = crate::alloc::init(&mut scores[..rows * tv]);
                concat_scores::<S, NVS>(ctx, item, keys, cols, scores, tiles.scores_mr);
                scores
            }
        }
    }
}

/// Step 2 of [`item`]: mask, softmax, dropout, row by row; returns each row's output factor.
/// Unless the weights are returned, rows stay unnormalised and the output rows are scaled by
/// 1/sum after the combine. Row r covers its first `lens[r]` keys; the rest of its first `cols`
/// are zeroed for the combine (and of all Tv when the weights are returned). `row_max` holds
/// the scores product's row maxima when it found them.
///
/// # Safety
/// `S`'s instructions must be available.
#[inline(always)]
unsafe fn softmax_step<S: Simd>(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    (cols, lens): (usize, &[usize; MAX_ITEM_ROWS]),
    scores: &mut [f32],
    row_max: Option<&[f32; MAX_ITEM_ROWS * 16]>,
    mut stats: Option<&mut [f32]>,
) -> [f32; MAX_ITEM_ROWS] {
    let tv = ctx.dims.tv;
    let mut inv = [1.0f32; MAX_ITEM_ROWS];
    let normalize = ctx.normalize;
    for r in 0..item.rows {
        let (row, len) = (&mut scores[r * tv..(r + 1) * tv], lens[r]);
        // (A match, not a closure: a closure would not inherit the caller's target features.)
        let mut known_max = None;
        if let Some(m) = row_max {
            // SAFETY: `S`'s instructions are available (this fn's contract); row `r`'s vector
            // of maxima is inside `row_max`, which has one per row of an item.
            known_max = Some(unsafe { S::hmax(S::load(m.as_ptr().add(r * S::LANES))) });
        }
        debug_assert!(
            known_max.is_none_or(|m| row[..len].iter().any(|x| x.is_nan())
                || m == row[..len].iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x))),
            "the product's row max is the row's max"
        );
        // SAFETY: as above.
        inv[r] = unsafe {
            finish_fast_row::<S>(
                ctx,
                item,
                r,
                &mut row[..len],
                known_max,
                stats.as_deref_mut(),
            )
        };
        row[len..if normalize { tv } else { cols }].fill(0.0);
    }
    inv
}

/// Step 3 of [`item`]: `out = weights · V` over the first `cols` keys, in chunks of
/// COMBINE_KEYS keys so a chunk of value rows stays in L1 while every row tile of the block
/// passes over it; each output element is still one sequential chain over the keys (the tiles
/// continue from C). The values are read from `keys.values` when the family packed them there
/// (each panel of a chunk one contiguous stream), else in place.
///
/// # Safety
/// As [`item`]; `scores` is the block step 1 returned; with `keys.value_panels`, `keys.values`
/// holds this batch element's values as `gemm::pack_value_chunks` packs them for chunks of
/// COMBINE_KEYS keys and panels of `NVC · LANES` columns.
#[inline(always)]
unsafe fn combine_step<S: Simd, const NVC: usize>(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    keys: &KeyCache,
    cols: usize,
    scores: &[f32],
    out: &mut [f32],
    tiles: Tiles,
) {
    let Dims { tv, dv, .. } = ctx.dims;
    let v = ctx.value.index_axis(Axis(0), item.b);
    let v_ld = v.stride_of(Axis(0)) as usize;
    let nr = NVC * S::LANES;
    let dv_padded = dv.div_ceil(nr) * nr;
    let mut k0 = 0;
    while k0 < cols {
        let kc = COMBINE_KEYS.min(cols - k0);
        // SAFETY: within this function's `# Safety` contract, which the caller upholds; the
        // packed chunk at key k0 starts at k0 · dv_padded, and its panels have
        // `min(COMBINE_KEYS, Tv - k0) ≥ kc` zero-padded rows of `nr` floats.
        unsafe {
            let (b, b_row, b_panel) = match keys.value_panels {
                true => {
                    let chunk = COMBINE_KEYS.min(tv - k0);
                    (keys.values.as_ptr().add(k0 * dv_padded), nr, chunk * nr)
                }
                false => (v.as_ptr().add(k0 * v_ld), v_ld, nr),
            };
            let g = gemm::Gemm {
                m: item.rows,
                n: dv,
                k: kc,
                a: scores.as_ptr().add(k0),
                lda: tv,
                b,
                b_row,
                b_panel,
                c: out.as_mut_ptr(),
                ldc: dv,
            };
            let dot = gemm::Dot { scale: None };
            if k0 == 0 {
                gemm::gemm::<S, _, NVC>(&g, dot, tiles.combine_mr);
            } else {
                gemm::gemm_with::<S, _, NVC, false, true>(&g, dot, tiles.combine_mr);
            }
        }
        k0 += kc;
    }
}

/// Concat scores for one item: the exponential form where it is safe, else tanh row by row.
///
/// # Safety
/// As [`item`]: the `e^{2s·q}` table is `rows × D` (`lda = D`), the packed keys as there.
#[inline(always)]
unsafe fn concat_scores<S: Simd, const NVS: usize>(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    keys: &KeyCache,
    cols: usize,
    scores: &mut [f32],
    mr: usize,
) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let Dims { tv, d, .. } = ctx.dims;
        let Item { b, i0, rows } = item;
        let p = ctx.params;
        let two_s = 2.0 * p.scale.unwrap_or(1.0);
        let q = ctx.query.slice(ndarray::s![b, i0..i0 + rows, ..]);
        // The block's queries, row by row (ndarray's element iterator over a 2-D slice is slower,
        // measured: docs/performance.md, "Where the thresholds come from"), then the bound on a
        // contiguous slice.
        let mut eq: Vec<f32> = Vec::with_capacity(rows * d);
        for r in q.rows() {
            eq.extend_from_slice(r.to_slice().expect("query rows are contiguous"));
        }
        let q_ok = eq.iter().all(|&x| (two_s * x).abs() <= CONCAT_EXP_LIMIT);
        if !(q_ok && keys.concat_ok) {
            let k = ctx.key.index_axis(Axis(0), b);
            for (r, qr) in eq.chunks_exact(d).enumerate() {
                score_row(&p, qr, k, &mut scores[r * tv..(r + 1) * tv]);
            }
            return;
        }
        exp_scaled_simd::<S>(&mut eq, two_s);
        let nr = NVS * S::LANES;
        let g = gemm::Gemm {
            m: rows,
            n: cols,
            k: d,
            a: eq.as_ptr(),
            lda: d,
            b: keys.packed.as_ptr(),
            b_row: nr,
            b_panel: d * nr,
            c: scores.as_mut_ptr(),
            ldc: tv,
        };
        let op = gemm::Concat {
            weight: p.concat_score_weight,
            d: d as f32,
        };
        gemm::gemm::<S, _, NVS>(&g, op, mr);
    }
}

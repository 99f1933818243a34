//! One forward item on AMX tiles: the scores product, the softmax (overlapped with the other
//! 32-row block's tile products where it can be, `softmax`), the combine, and the chunked
//! (flash) form for long keys. Falls back to the AVX-512 family when a query row does not split
//! exactly.

use std::mem::MaybeUninit;

use ndarray::Axis;

use crate::kernel::item::{
    causal_lengths, finish_fast_row, finish_out_rows, mask_fast_row, row_done, scale_row, Ctx, Item,
};
use crate::kernel::plan::{FLASH_KEYS, MAX_ITEM_ROWS};
use crate::kernel::simd;
use crate::kernel::softmax::max_of_row;
use crate::shape::Dims;

use super::buf::{Packed, QueryRows, Scratch};
use super::exp;
use super::side_work::{self, NoWork, Prefetch, SplitAhead};
use super::softmax::{RowSoftmax, SoftmaxBufs};
use super::split;
use super::tile::{self, Tiles};

thread_local! {
    /// The tile kernels' per-item scratch on this thread.
    pub(crate) static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Frees this thread's tile scratch if it holds more than `keep` bytes (a call with very long
/// keys does not leave its buffers to every later call of the thread).
pub(crate) fn trim_scratch(keep: usize) {
    SCRATCH.with_borrow_mut(|s| {
        if s.bytes() > keep {
            *s = Scratch::default();
        }
    });
}

/// The query rows of the item this thread most likely takes next: the rows after `item`'s, in
/// its batch element or the next ([`crate::pool::run_indexed`] hands a thread its share in
/// order); none after the last.
fn next_item_queries(ctx: &Ctx<'_, '_, f32>, item: Item) -> Option<QueryRows> {
    let Dims { batch, tq, d, .. } = ctx.dims;
    let (b, i0) = match item.i0 + item.rows < tq {
        true => (item.b, item.i0 + item.rows),
        false => (item.b + 1, 0),
    };
    (b < batch).then(|| {
        let q = ctx.query.index_axis(Axis(0), b);
        let ld = q.stride_of(Axis(0)) as usize;
        QueryRows {
            call: ctx.call,
            q0: q.as_ptr().wrapping_add(i0 * ld),
            ld,
            rows: ctx.item_rows.min(tq - i0),
            d,
        }
    })
}

/// What an item on tiles with returned weights keeps in L2: the keys' and values' parts
/// (6 bytes per element), and per score the raw score, its three weight parts and the returned
/// weight (14 bytes).
fn item_bytes(ctx: &Ctx<'_, '_, f32>, rows: usize) -> usize {
    let Dims { tv, d, dv, .. } = ctx.dims;
    tv * (d + dv) * 6 + rows * tv * 14
}

/// Up to this many [`item_bytes`] (the L2 of a core with tiles is 2 MiB), an item's returned
/// weights are prefetched into L2 during its scores ([`Prefetch`]). Beyond, the prefetched
/// rows push the keys' and values' parts out, and the prefetch stops paying (measured:
/// docs/performance.md, "Where the thresholds come from").
const PREFETCH_WEIGHTS_UP_TO: usize = 3 << 19;

/// One item on AMX tiles (the [`amx`](super) family): scores product on tiles into scratch, then
/// row by row the scale and masks, the softmax (`e^(s - max)` split into three parts; the row's max
/// found while the row before was exponentiated, [`RowSoftmax`]) and the returned weights, or with
/// dropout [`finish_fast_row`] and the split, then the combine on tiles and each output row over
/// its sum. Without returned weights or dropout, an item of two 32-row blocks runs each block's
/// softmax between the other block's tile products ([`SideWork`](side_work::SideWork)): block 0's
/// scores, block 1's scores with block 0's softmax, block 0's combine with block 1's softmax, block
/// 1's combine. The output rows may come uninitialised: the copy-out from the tiles' O writes each
/// in full, and zeroing them first cost time (measured: docs/performance.md, "Where the thresholds
/// come from"). Returns false, touching nothing the caller reads, when a query row of the item
/// does not split exactly (`split::split_queries`); the caller then runs the AVX-512 path.
///
/// # Safety
/// [`Isa::Amx`](crate::Isa::Amx) was detected; `amx_keys` holds batch element `item.b`'s keys and
/// values in tile layout, every one split exactly (`KeyCache::amx_ready`); `finite` is
/// `KeyCache::finite`. Sizes as `fused::item`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn block_amx(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    (amx_keys, finite): (&Packed, bool),
    scores: &mut [MaybeUninit<f32>],
    out: &mut [MaybeUninit<f32>],
    mut stats: Option<&mut [f32]>,
) -> bool {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let Dims { tv, d, dv, .. } = ctx.dims;
        let Item { b, i0, rows } = item;
        debug_assert!(scores.len() >= rows * tv && out.len() >= rows * dv);
        let q = ctx.query.index_axis(Axis(0), b);
        let q_ld = q.stride_of(Axis(0)) as usize;
        let q0 = q.as_ptr().add(i0 * q_ld);
        let mut lens = [tv; MAX_ITEM_ROWS];
        let cols = causal_lengths(ctx, item, finite, &mut lens);
        let weights = scores.as_mut_ptr().cast::<f32>();
        let mut inv = [1.0f32; MAX_ITEM_ROWS];
        let done = SCRATCH.with_borrow_mut(|scratch| {
            let at = QueryRows {
                call: ctx.call,
                q0,
                ld: q_ld,
                rows,
                d,
            };
            let Some(dp) = side_work::queries_for(scratch, at) else {
                return false;
            };
            let tiles = Tiles::configure();
            if ctx.flash {
                amx_flash(
                    ctx,
                    item,
                    amx_keys,
                    (scratch, &tiles, dp),
                    crate::alloc::init(out),
                    stats.as_deref_mut(),
                    &mut inv,
                );
                return true;
            }
            let (kp, parts) = split::weight_parts(scratch, rows, cols);
            let blocks = rows.div_ceil(32);
            let (s_dims, c_dims) = ((rows, 0, cols, dp), (rows, 0, kp, dv));
            // Without returned weights or dropout, the softmax of one 32-row block runs between the
            // tile products of the other: block 0's during block 1's scores, block 1's during block
            // 0's combine. (Not with returned weights: their stores between the tile products, or a
            // pass of their own from the parts afterwards, cost more than the overlap saves.)
            let overlap = ctx.dropout.is_none() && !ctx.normalize && blocks > 1;
            let first = overlap.then_some(0..1); // None: every block
            let (raw, ld) = if ctx.normalize && item_bytes(ctx, rows) <= PREFETCH_WEIGHTS_UP_TO {
                // The returned weights' rows come into L2 during the scores ([`Prefetch`]).
                let bytes = rows * tv * std::mem::size_of::<f32>();
                let mut rows_ahead = Prefetch::new(weights.cast(), bytes);
                tile::scores(&tiles, scratch, amx_keys, s_dims, first, &mut rows_ahead)
            } else {
                tile::scores(&tiles, scratch, amx_keys, s_dims, first, &mut NoWork)
            };
            let weights = if ctx.normalize {
                weights
            } else {
                std::ptr::null_mut()
            };
            let lens = &lens;
            let bufs = SoftmaxBufs {
                raw,
                ld,
                parts,
                kp,
                weights,
                lens,
            };
            // The next item's queries are split during this one's last combine, after every
            // scores product of this one ([`SplitAhead`]).
            let last = if overlap { blocks - 1 } else { blocks };
            let groups = last * dv.div_ceil(32) * (kp / 32) * 6;
            let mut ahead = SplitAhead::new(scratch, next_item_queries(ctx, item), groups);
            let (o, ldo) = if ctx.dropout.is_some() {
                dropout_rows(ctx, item, bufs, &mut inv, stats);
                tile::combine(&tiles, scratch, amx_keys, c_dims, None, &mut ahead)
            } else if overlap {
                let st = stats.as_deref_mut();
                let mut sm = RowSoftmax::new(ctx, item, bufs, 0..32, &mut inv, st, true);
                let rest = Some(1..blocks);
                tile::scores(&tiles, scratch, amx_keys, s_dims, rest, &mut sm);
                sm.finish();
                let mut sm = RowSoftmax::new(ctx, item, bufs, 32..rows, &mut inv, stats, true);
                tile::combine(&tiles, scratch, amx_keys, c_dims, Some(0..1), &mut sm);
                sm.finish();
                let rest = Some(1..blocks);
                tile::combine(&tiles, scratch, amx_keys, c_dims, rest, &mut ahead)
            } else {
                RowSoftmax::new(ctx, item, bufs, 0..rows, &mut inv, stats, false).finish();
                tile::combine(&tiles, scratch, amx_keys, c_dims, None, &mut ahead)
            };
            ahead.finish(scratch);
            copy_out((o, ldo), dv, out, &mut inv[..rows]);
            true
        });
        if done {
            // SAFETY: a finished item wrote every output row (the copy-out, or `init` for
            // amx_flash), and MaybeUninit<f32> has f32's layout.
            let out = &mut *(&mut out[..rows * dv] as *mut [MaybeUninit<f32>] as *mut [f32]);
            finish_out_rows(ctx, item, out, &inv);
        }
        done
    }
}

/// The softmax rows of an item under dropout, one after another (no overlap with the tile
/// products): scale and masks, softmax, statistics and dropout ([`finish_fast_row`]), the split
/// into the weight parts, and the returned weights when `bufs.weights` is not null.
///
/// # Safety
/// AVX-512F; `bufs` as [`RowSoftmax::new`] takes them, for the item's `rows` rows.
#[inline(always)]
unsafe fn dropout_rows(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    bufs: SoftmaxBufs<'_>,
    inv: &mut [f32; MAX_ITEM_ROWS],
    mut stats: Option<&mut [f32]>,
) {
    let tv = ctx.dims.tv;
    let SoftmaxBufs {
        raw,
        ld,
        parts,
        kp,
        weights,
        lens,
    } = bufs;
    for r in 0..item.rows {
        let len = lens[r];
        // SAFETY: the scores scratch holds `⌈rows/32⌉·32` rows of `ld ≥ cols ≥ lens[r]` floats;
        // nothing else refers to it here, and the loop holds one row at a time. The rest is this
        // fn's contract.
        unsafe {
            let s = std::slice::from_raw_parts_mut(raw.add(r * ld), len);
            scale_row(ctx, s);
            inv[r] = finish_fast_row::<simd::Avx512>(ctx, item, r, s, None, stats.as_deref_mut());
            split::split_weights(parts, r, s, kp);
            if !weights.is_null() {
                // The returned weights: this row of `scores` (`rows · Tv`, possibly
                // uninitialised) is written in full here.
                let w = weights.add(r * tv);
                std::ptr::copy_nonoverlapping(s.as_ptr(), w, len);
                std::ptr::write_bytes(w.add(len), 0, tv - len);
            }
        }
    }
}

/// Copies the combine's output rows out of the tiles' O (`ldo` floats per row) into `out`, each
/// times its factor in `inv`, which is then 1: one pass, which leaves `finish_out_rows` only the
/// query mask.
///
/// # Safety
/// `o` holds `inv.len()` rows of `ldo ≥ dv` floats.
#[inline(always)]
unsafe fn copy_out(
    (o, ldo): (*const f32, usize),
    dv: usize,
    out: &mut [MaybeUninit<f32>],
    inv: &mut [f32],
) {
    for (r, f) in inv.iter_mut().enumerate() {
        // SAFETY: this fn's contract.
        let src = unsafe { std::slice::from_raw_parts(o.add(r * ldo), dv) };
        let dst = &mut out[r * dv..(r + 1) * dv];
        dst.iter_mut().zip(src).for_each(|(d, &x)| {
            d.write(x * *f);
        });
        *f = 1.0;
    }
}

/// An item on tiles with long keys ([`plan::flash`](crate::kernel::plan::flash)): for each chunk of
/// [`FLASH_KEYS`] keys, the scores product, per row the scale, the value mask, the running max `m`
/// and `e^(s - m)` split into the weight parts, then the combine, added to the output row after
/// scaling it by `e^(m_old - m)` (as its sum is). Leaves each row's output factor ([`row_done`]) in
/// `inv` for [`finish_out_rows`], and its statistics in `stats`. The chunks depend on Tv alone, so
/// results are the same for any thread count.
///
/// # Safety
/// As [`block_amx`], with `tiles` configured, the item's queries split (`dp` wide) and `out`
/// zeroed.
#[target_feature(enable = "avx512f")]
unsafe fn amx_flash(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    amx_keys: &Packed,
    (scratch, tiles, dp): (&mut Scratch, &Tiles, usize),
    out: &mut [f32],
    mut stats: Option<&mut [f32]>,
    inv: &mut [f32; MAX_ITEM_ROWS],
) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        debug_assert!(!ctx.masks.causal && ctx.dropout.is_none() && !ctx.normalize);
        let Dims { tv, dv, .. } = ctx.dims;
        let rows = item.rows;
        let mut max = [f32::NEG_INFINITY; MAX_ITEM_ROWS];
        let mut sum = [0.0f32; MAX_ITEM_ROWS];
        let mut alpha = [0.0f32; MAX_ITEM_ROWS];
        let mut c0 = 0;
        while c0 < tv {
            let ck = FLASH_KEYS.min(tv - c0);
            let (raw, ld) = tile::scores(
                tiles,
                scratch,
                amx_keys,
                (rows, c0, ck, dp),
                None,
                &mut NoWork,
            );
            let (kp, parts) = split::weight_parts(scratch, rows, ck);
            // SAFETY: the scores scratch holds `⌈rows/32⌉·32` rows of `ld ≥ ck` floats; nothing
            // else refers to it here, and the loop below holds at most one reference to each row at
            // a time.
            let row = |r: usize| std::slice::from_raw_parts_mut(raw.add(r * ld), ck);
            // As in block_amx: row r + 1 is scaled and masked before row r's exp, which finds its
            // max.
            let prepare = |r: usize| {
                if r < rows {
                    scale_row(ctx, row(r));
                    mask_fast_row(ctx, item, r, c0, row(r));
                }
            };
            prepare(0);
            let mut chunk_max = max_of_row::<simd::Avx512>(row(0));
            for r in 0..rows {
                prepare(r + 1);
                let next: &[f32] = if r + 1 < rows { row(r + 1) } else { &[] };
                // NaN anywhere reaches the sum and the output through its own e^(s - m).
                let m = max[r].max(chunk_max);
                alpha[r] = (max[r] - m).exp();
                let (e, next_max) = exp::exp_split(row(r), m, (parts, r, kp), None, next, None);
                (sum[r], max[r], chunk_max) = (sum[r] * alpha[r] + e, m, next_max);
            }
            let (o, ldo) = tile::combine(
                tiles,
                scratch,
                amx_keys,
                (rows, c0, kp, dv),
                None,
                &mut NoWork,
            );
            for (r, acc) in out[..rows * dv].chunks_exact_mut(dv).enumerate() {
                // SAFETY: O holds `rows` rows of `ldo ≥ dv` floats.
                let o = std::slice::from_raw_parts(o.add(r * ldo), dv);
                acc.iter_mut()
                    .zip(o)
                    .for_each(|(a, &x)| *a = *a * alpha[r] + x);
            }
            c0 += ck;
        }
        for r in 0..rows {
            inv[r] = row_done(false, r, (max[r], sum[r]), stats.as_deref_mut());
        }
    }
}

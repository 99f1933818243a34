//! What a forward work item is and reads: the call's shared context ([`Ctx`]), the item (a block
//! of query rows of one batch element, [`Item`]), and the per-row steps every family shares:
//! the masks, dropout, the causal lengths, the output factors.

use ndarray::ArrayView3;

use super::plan::MAX_ITEM_ROWS;
use super::simd::Simd;
use super::softmax::softmax_row;
use crate::cpu::Isa;
use crate::dropout::{dropout_row, DropoutMask};
use crate::float::Float;
use crate::mask::{mask_row, Masks};
use crate::score::ScoreParams;
use crate::shape::Dims;

/// Everything a work item reads, shared by all items of one call.
pub(crate) struct Ctx<'a, 'm, T> {
    // Views have contiguous rows and no negative strides (`shape::rows_contiguous`).
    pub(crate) query: ArrayView3<'a, T>,
    pub(crate) key: ArrayView3<'a, T>,
    pub(crate) value: ArrayView3<'a, T>,
    pub(crate) masks: &'a Masks<'m>,
    pub(crate) params: ScoreParams<T>,
    pub(crate) dropout: Option<(DropoutMask, T)>,
    pub(crate) dims: Dims,
    pub(crate) isa: Isa,
    /// Whether the weights are returned (so each row of scores must hold normalised weights).
    pub(crate) normalize: bool,
    /// Query rows per work item (the last item of a batch element may have fewer).
    pub(crate) item_rows: usize,
    /// Items on tiles run their keys in chunks (`plan::flash`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the AMX item only
    pub(crate) flash: bool,
    /// This call's number ([`next_call`]): what a thread split ahead for its next item
    /// (`amx::SplitAhead`) is used only within the call that split it.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the AMX item only
    pub(crate) call: u64,
}

/// A number no earlier call had.
pub(crate) fn next_call() -> u64 {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A block of query rows `i0 .. i0 + rows` of batch element `b`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Item {
    pub(crate) b: usize,
    pub(crate) i0: usize,
    pub(crate) rows: usize,
}

pub(crate) fn apply_dropout_row<T: Float>(ctx: &Ctx<'_, '_, T>, first: usize, s: &mut [T]) {
    if let Some((mask, keep_prob)) = &ctx.dropout {
        dropout_row(s.iter_mut(), mask, *keep_prob, first as u64);
    }
}

pub(crate) fn masked(masks: &Masks<'_>) -> bool {
    masks.value.is_some() || masks.causal
}

/// With the causal mask, each row's softmax and the combine only need the keys the row can see:
/// row i covers keys `..=i` (`lens[r]`), and the block the first `i0 + rows` (returned). Hidden
/// keys would get weight exactly 0, so skipping them changes no bit, except where Keras's
/// arithmetic still reads them: a row whose visible keys are all masked (its weights come from
/// all Tv scores minus 1e9) covers all Tv keys, and a batch element with a non-finite key or
/// value (NaN · 0 is NaN in Keras's products) skips nothing. Lengths depend on the row alone,
/// never on the block, so results stay the same for any split.
pub(crate) fn causal_lengths(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    finite: bool,
    lens: &mut [usize; MAX_ITEM_ROWS],
) -> usize {
    let tv = ctx.dims.tv;
    let Item { b, i0, rows } = item;
    debug_assert!(rows <= MAX_ITEM_ROWS);
    if !ctx.masks.causal || !finite {
        return tv;
    }
    for (r, len) in lens[..rows].iter_mut().enumerate() {
        let i = i0 + r;
        let visible = (i + 1).min(tv);
        let all_masked = ctx
            .masks
            .keys_of_row(b, i)
            .is_some_and(|k| !k.slice(ndarray::s![..visible]).iter().any(|&x| x));
        *len = if all_masked { tv } else { visible };
    }
    lens[..rows].iter().copied().max().unwrap_or(0)
}

/// Row `r`'s softmax `(max, sum)` into the statistics, if kept; returns what its output row is
/// to be multiplied by: `1 / sum` unless the combined weights were `normalized` (then 1).
pub(crate) fn row_done(
    normalized: bool,
    r: usize,
    (max, sum): (f32, f32),
    stats: Option<&mut [f32]>,
) -> f32 {
    if let Some(st) = stats {
        (st[2 * r], st[2 * r + 1]) = (max, sum.ln());
    }
    if normalized {
        1.0
    } else {
        1.0 / sum
    }
}

/// The value mask and the causal mask on row `r` of a fast item: `s` holds its scores of keys
/// `c0 .. c0 + s.len()` (the causal mask only with `c0 = 0`, as the chunked items never have it).
#[inline(always)]
pub(crate) fn mask_fast_row(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    r: usize,
    c0: usize,
    s: &mut [f32],
) {
    debug_assert!(c0 == 0 || !ctx.masks.causal);
    if masked(ctx.masks) {
        let i = item.i0 + r;
        let keys = ctx
            .masks
            .keys_of_row(item.b, i)
            .map(|k| k.slice_move(ndarray::s![c0..c0 + s.len()]));
        mask_row(s, keys, ctx.masks.causal.then_some(i), ctx.params.mask_bias);
    }
}

/// Keras scales the finished dot product: a tile-product row of raw scores times the scale.
/// Inlined, so it runs in the kernel's AVX-512 instructions.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the AMX item only
pub(crate) fn scale_row(ctx: &Ctx<'_, '_, f32>, s: &mut [f32]) {
    if let Some(c) = ctx.params.scale {
        s.iter_mut().for_each(|x| *x *= c);
    }
}

/// The last step of a fast item: each output row times its `inv` (from [`finish_fast_row`]),
/// or zeros where the query mask drops the row.
pub(crate) fn finish_out_rows(ctx: &Ctx<'_, '_, f32>, item: Item, out: &mut [f32], inv: &[f32]) {
    let dv = ctx.dims.dv;
    for (r, o) in out[..item.rows * dv].chunks_exact_mut(dv).enumerate() {
        if !ctx.masks.query_keeps(item.b, item.i0 + r) {
            o.fill(0.0);
        } else if inv[r] != 1.0 {
            o.iter_mut().for_each(|x| *x *= inv[r]);
        }
    }
}

/// Step 2 of a fast item for its row `r`, `s` the row's first `lens[r]` scores: mask, softmax,
/// statistics (`stats`, the item's `rows × 2`), dropout. Returns what the combined output row is
/// to be multiplied by: `1 / sum` unless the weights are normalised in place (then 1).
///
/// # Safety
/// `S`'s instructions must be available.
#[inline(always)]
pub(crate) unsafe fn finish_fast_row<S: Simd>(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    r: usize,
    s: &mut [f32],
    known_max: Option<f32>,
    stats: Option<&mut [f32]>,
) -> f32 {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let Dims { tq, tv, .. } = ctx.dims;
        let (b, i) = (item.b, item.i0 + r);
        mask_fast_row(ctx, item, r, 0, s);
        let (max, sum) = softmax_row::<S>(s, ctx.normalize, known_max);
        let inv = row_done(ctx.normalize, r, (max, sum), stats);
        apply_dropout_row(ctx, (b * tq + i) * tv, s);
        inv
    }
}

//! The portable family: the readable stage functions (`score`, `mask`, `softmax`, `dropout`,
//! `combine`) row by row, for float64, for CPUs without a SIMD family, and for degenerate
//! shapes. Every other family is held equal to this one within float32 rounding.

use std::mem::MaybeUninit;
use std::ops::Range;

use ndarray::Axis;

use super::backward::ctx::{BackCtx, ItemGrads, Partials};
use super::family::Family;
use super::item::{apply_dropout_row, Ctx, Item};
use super::keys::KeyCache;
use crate::combine::combine_row;
use crate::float::Float;
use crate::mask::mask_row;
use crate::score::score_row;
use crate::shape::Dims;
use crate::softmax::softmax_row;

/// The portable family ([`Family`]).
pub(crate) struct Portable;

impl Family for Portable {
    /// The portable item reads the keys in place: nothing to prepare.
    unsafe fn prepare(_keys: &mut KeyCache, _ctx: &Ctx<'_, '_, f32>, _b: usize) {}

    unsafe fn item(
        ctx: &Ctx<'_, '_, f32>,
        item: Item,
        _keys: &KeyCache,
        scores: &mut [MaybeUninit<f32>],
        out: &mut [f32],
        stats: Option<&mut [f32]>,
    ) {
        portable_block(ctx, item, crate::alloc::init(scores), out, stats)
    }

    unsafe fn exp_scaled(xs: &mut [f32], c: f32) {
        xs.iter_mut().for_each(|x| *x = (c * *x).exp());
    }

    unsafe fn decode_chunk(
        _ctx: &Ctx<'_, '_, f32>,
        _b: usize,
        _keys: Range<usize>,
        _scratch: &mut [f32],
        _part: &mut [f32],
    ) {
        unreachable!("the split path runs only on a SIMD family (`decode::chunks`)")
    }

    unsafe fn backward_item(
        ctx: &BackCtx<'_, '_, f32>,
        b: usize,
        keys: Range<usize>,
        g: ItemGrads<'_, f32>,
    ) -> Partials {
        ctx.portable_item(b, keys, g)
    }
}

/// The portable block: the stage functions, row by row. `scores` is `rows × Tv`, `out`
/// `rows × Dv`, both row-major.
/// With `stats` (`rows × 2`), each row's softmax max and `ln Σ e^(x - max)` are written there
/// for the backward.
pub(crate) fn portable_block<T: Float>(
    ctx: &Ctx<'_, '_, T>,
    item: Item,
    scores: &mut [T],
    out: &mut [T],
    mut stats: Option<&mut [T]>,
) {
    let Dims { tq, tv, dv, .. } = ctx.dims;
    for r in 0..item.rows {
        let i = item.i0 + r;
        let (s, o) = (
            &mut scores[r * tv..(r + 1) * tv],
            &mut out[r * dv..(r + 1) * dv],
        );
        let q = ctx.query.slice(ndarray::s![item.b, i, ..]);
        let q = q.to_slice().expect("query rows are contiguous");
        score_row(&ctx.params, q, ctx.key.index_axis(Axis(0), item.b), s);
        let st = stats.as_deref_mut().map(|st| &mut st[2 * r..2 * r + 2]);
        finish_row(ctx, item.b, i, (item.b * tq + i) * tv, s, st);
        if ctx.masks.query_keeps(item.b, i) {
            combine_row(s, ctx.value.index_axis(Axis(0), item.b), o);
        } else {
            o.fill(T::zero()); // Keras's `where(query_mask, output, 0)`: exactly 0, even for NaN
        }
    }
}

/// Mask, softmax and dropout of one row of scores (row `i` of batch `b`, first flat index
/// `first`), the portable way; `stats` gets the row's `(max, ln Σ e^(x - max))`.
fn finish_row<T: Float>(
    ctx: &Ctx<'_, '_, T>,
    b: usize,
    i: usize,
    first: usize,
    s: &mut [T],
    stats: Option<&mut [T]>,
) {
    mask_row(
        s,
        ctx.masks.keys_of_row(b, i),
        ctx.masks.causal.then_some(i),
        ctx.params.mask_bias,
    );
    if let Some(st) = stats {
        let max = s
            .iter()
            .fold(T::neg_infinity(), |m, &x| if x > m { x } else { m });
        let sum = s.iter().fold(T::zero(), |a, &x| a + (x - max).exp());
        (st[0], st[1]) = (max, sum.ln());
    }
    softmax_row(s);
    apply_dropout_row(ctx, first, s);
}

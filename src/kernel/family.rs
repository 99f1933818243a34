//! The kernel-family trait: what one CPU family (AVX-512, AVX2, NEON, the portable path)
//! provides to the fused item and its helpers. Each implementation lives in a file of its own and
//! carries its own tile shapes; it is picked in one place, `kernel::on_family!`. AMX is not a
//! family of this trait: its items overlap the softmax with the tile products (`kernel::amx`)
//! and fall back to the AVX-512 family.
//!
//! Every method is `unsafe` for one reason: a family's instructions must be available, which
//! `on_family!` guarantees by choosing from a detected [`Isa`](crate::Isa).

use std::mem::MaybeUninit;
use std::ops::Range;

use super::backward::ctx::{BackCtx, ItemGrads, Partials};
use super::item::{Ctx, Item};
use super::keys::KeyCache;

/// One CPU family's kernels.
pub(crate) trait Family {
    /// Prepares batch element `b`'s keys for this family's item ([`KeyCache::prepare`]), unless
    /// `keys` holds them already.
    ///
    /// # Safety
    /// The family's instructions must be available.
    unsafe fn prepare(keys: &mut KeyCache, ctx: &Ctx<'_, '_, f32>, b: usize);

    /// One forward work item: scores, mask, softmax, dropout and combine of the item's query rows
    /// (`super::fused::item` on a SIMD family). `scores` (`rows × Tv`) may be uninitialised and
    /// is written in full; `out` (`rows × Dv`) is zeroed; `stats` (`rows × 2`) gets each row's
    /// softmax max and `ln Σ e^(x - max)`.
    ///
    /// # Safety
    /// The family's instructions must be available; `keys` was prepared for `item.b` by this
    /// family; `ctx`'s views were checked against `ctx.dims` (`shape::check_qkv`) and have
    /// contiguous rows and non-negative strides.
    unsafe fn item(
        ctx: &Ctx<'_, '_, f32>,
        item: Item,
        keys: &KeyCache,
        scores: &mut [MaybeUninit<f32>],
        out: &mut [f32],
        stats: Option<&mut [f32]>,
    );

    /// `x = e^{c·x}` over a buffer.
    ///
    /// # Safety
    /// The family's instructions must be available.
    unsafe fn exp_scaled(xs: &mut [f32], c: f32);

    /// One chunk of keys of batch element `b` on the split-keys decoding path
    /// (`super::decode`): scores, softmax statistics and the unnormalised output into `part`
    /// (`Tq` rows of `[m, s, o..]`); `scratch` holds `Tq · keys.len()` floats.
    ///
    /// # Safety
    /// As [`Family::item`].
    unsafe fn decode_chunk(
        ctx: &Ctx<'_, '_, f32>,
        b: usize,
        keys: Range<usize>,
        scratch: &mut [f32],
        part: &mut [f32],
    );

    /// One backward work item (batch element `b`, keys `keys`): its shares of the gradients
    /// into `g`, and its partial sums of the scalar gradients.
    ///
    /// # Safety
    /// As [`Family::item`], for the backward's views (`BackCtx`).
    unsafe fn backward_item(
        ctx: &BackCtx<'_, '_, f32>,
        b: usize,
        keys: Range<usize>,
        g: ItemGrads<'_, f32>,
    ) -> Partials;
}

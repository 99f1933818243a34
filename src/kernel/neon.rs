//! The NEON family ([`Family`]) for aarch64: the fused item, the decoding chunk and the backward
//! item instantiated for `simd::Neon`. NEON is part of every aarch64 target, so these need no
//! target-feature trampolines. 32 registers of 4 floats: every tile is 6 rows × 16 columns
//! (4 vectors), 24 accumulators, 4 B vectors and one broadcast A, as wide as x86's AVX2 tiles
//! with twice the rows' reuse of each loaded B vector that 16 registers allow there. The values
//! are read in place, as on AVX-512.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::backward::ctx::{BackCtx, ItemGrads, Partials};
use super::family::Family;
use super::fused::{self, Tiles};
use super::item::{Ctx, Item};
use super::keys::KeyCache;
use super::simd;
use super::{backward, decode, softmax};

/// Vectors per tile row (16 columns).
const NV: usize = 4;
/// Rows per tile.
const MR: usize = 6;

/// The NEON family.
pub(crate) struct Neon;

impl Family for Neon {
    unsafe fn prepare(keys: &mut KeyCache, ctx: &Ctx<'_, '_, f32>, b: usize) {
        // SAFETY: NEON is part of the target; the rest of the contract is the callee's, passed on.
        unsafe { keys.prepare::<simd::Neon, NV, false>(ctx, b) }
    }

    unsafe fn item(
        ctx: &Ctx<'_, '_, f32>,
        item: Item,
        keys: &KeyCache,
        scores: &mut [MaybeUninit<f32>],
        out: &mut [f32],
        stats: Option<&mut [f32]>,
    ) {
        let tiles = Tiles {
            scores_mr: MR,
            combine_mr: MR,
        };
        // SAFETY: NEON is part of the target; the rest of the contract is the callee's, passed on.
        unsafe { fused::item::<simd::Neon, NV, NV>(ctx, item, keys, scores, out, stats, tiles) }
    }

    unsafe fn exp_scaled(xs: &mut [f32], c: f32) {
        // SAFETY: NEON is part of the target.
        unsafe { softmax::exp_scaled_simd::<simd::Neon>(xs, c) }
    }

    unsafe fn decode_chunk(
        ctx: &Ctx<'_, '_, f32>,
        b: usize,
        keys: Range<usize>,
        scratch: &mut [f32],
        part: &mut [f32],
    ) {
        // SAFETY: NEON is part of the target; the rest of the contract is the callee's, passed on.
        unsafe { decode::chunk_simd::<simd::Neon, NV>(ctx, b, keys, scratch, part, MR) }
    }

    unsafe fn backward_item(
        ctx: &BackCtx<'_, '_, f32>,
        b: usize,
        keys: Range<usize>,
        g: ItemGrads<'_, f32>,
    ) -> Partials {
        // SAFETY: NEON is part of the target; the rest of the contract is the callee's, passed on.
        unsafe { backward::fused::item::<simd::Neon, NV, NV>(ctx, b, keys, g, (MR, MR)) }
    }
}

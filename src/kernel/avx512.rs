//! The AVX-512 family ([`Family`]): the fused item, the decoding chunk and the backward item
//! instantiated for `simd::Avx512` inside `#[target_feature(enable = "avx512f")]` trampolines.
//! AVX-512F has 32 registers of 16 floats: scores tiles 6 rows × 64 keys (4 vectors), combine
//! 6 × 64 (24 accumulators of the 32 registers); the backward 12 × 32 for its transposed
//! products and 6 × 64 for the others. `Isa::Amx` runs this family wherever its tiles decline a
//! call or an item.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::backward::ctx::{BackCtx, ItemGrads, Partials};
use super::family::Family;
use super::fused::{self, Tiles};
use super::item::{Ctx, Item};
use super::keys::KeyCache;
use super::simd;
use super::{backward, decode, softmax};

/// The Avx512 family.
pub(crate) struct Avx512;

impl Family for Avx512 {
    #[target_feature(enable = "avx512f")]
    unsafe fn prepare(keys: &mut KeyCache, ctx: &Ctx<'_, '_, f32>, b: usize) {
        // SAFETY: the `Family` contract (AVX-512F detected) is what this trampoline enables, and
        // the rest of it is the callee's own contract, passed on unchanged.
        unsafe { keys.prepare::<simd::Avx512, 4, false>(ctx, b) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn item(
        ctx: &Ctx<'_, '_, f32>,
        item: Item,
        keys: &KeyCache,
        scores: &mut [MaybeUninit<f32>],
        out: &mut [f32],
        stats: Option<&mut [f32]>,
    ) {
        // SAFETY: the `Family` contract (AVX-512F detected) is what this trampoline enables, and
        // the rest of it is the callee's own contract, passed on unchanged.
        unsafe {
            let tiles = Tiles {
                scores_mr: 6,
                combine_mr: 6,
            };
            fused::item::<simd::Avx512, 4, 4>(ctx, item, keys, scores, out, stats, tiles)
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn exp_scaled(xs: &mut [f32], c: f32) {
        // SAFETY: the `Family` contract (AVX-512F detected) is what this trampoline enables, and
        // the rest of it is the callee's own contract, passed on unchanged.
        unsafe { softmax::exp_scaled_simd::<simd::Avx512>(xs, c) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn decode_chunk(
        ctx: &Ctx<'_, '_, f32>,
        b: usize,
        keys: Range<usize>,
        scratch: &mut [f32],
        part: &mut [f32],
    ) {
        // SAFETY: the `Family` contract (AVX-512F detected) is what this trampoline enables, and
        // the rest of it is the callee's own contract, passed on unchanged.
        unsafe { decode::chunk_simd::<simd::Avx512, 4>(ctx, b, keys, scratch, part, 6) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn backward_item(
        ctx: &BackCtx<'_, '_, f32>,
        b: usize,
        keys: Range<usize>,
        g: ItemGrads<'_, f32>,
    ) -> Partials {
        // SAFETY: the `Family` contract (AVX-512F detected) is what this trampoline enables, and
        // the rest of it is the callee's own contract, passed on unchanged.
        unsafe { backward::fused::item::<simd::Avx512, 2, 4>(ctx, b, keys, g, (12, 6)) }
    }
}

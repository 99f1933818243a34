//! The AVX2 family ([`Family`]): the fused item, the decoding chunk and the backward item
//! instantiated for `simd::Avx2` inside `#[target_feature(enable = "avx2,fma")]` trampolines.
//! AVX2 with FMA has 16 registers of 8 floats: scores tiles 6 rows × 16 keys (2 vectors),
//! combine 6 × 16 (12 accumulators and 3 operands: 3 × 32 needed 17 registers and spilled), and
//! the backward's five products 6 × 16 for the same reason. Its prepare packs the values too, in
//! the combine's chunks and panels.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::backward::ctx::{BackCtx, ItemGrads, Partials};
use super::family::Family;
use super::fused::{self, Tiles};
use super::item::{Ctx, Item};
use super::keys::KeyCache;
use super::simd;
use super::{backward, decode, softmax};

/// The Avx2 family.
pub(crate) struct Avx2;

impl Family for Avx2 {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn prepare(keys: &mut KeyCache, ctx: &Ctx<'_, '_, f32>, b: usize) {
        // SAFETY: the `Family` contract (AVX2 and FMA detected) is what this trampoline enables,
        // and the rest of it is the callee's own contract, passed on unchanged.
        unsafe { keys.prepare::<simd::Avx2, 2, true>(ctx, b) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn item(
        ctx: &Ctx<'_, '_, f32>,
        item: Item,
        keys: &KeyCache,
        scores: &mut [MaybeUninit<f32>],
        out: &mut [f32],
        stats: Option<&mut [f32]>,
    ) {
        // SAFETY: the `Family` contract (AVX2 and FMA detected) is what this trampoline enables,
        // and the rest of it is the callee's own contract, passed on unchanged.
        unsafe {
            let tiles = Tiles {
                scores_mr: 6,
                combine_mr: 6,
            };
            fused::item::<simd::Avx2, 2, 2>(ctx, item, keys, scores, out, stats, tiles)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_scaled(xs: &mut [f32], c: f32) {
        // SAFETY: the `Family` contract (AVX2 and FMA detected) is what this trampoline enables,
        // and the rest of it is the callee's own contract, passed on unchanged.
        unsafe { softmax::exp_scaled_simd::<simd::Avx2>(xs, c) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode_chunk(
        ctx: &Ctx<'_, '_, f32>,
        b: usize,
        keys: Range<usize>,
        scratch: &mut [f32],
        part: &mut [f32],
    ) {
        // SAFETY: the `Family` contract (AVX2 and FMA detected) is what this trampoline enables,
        // and the rest of it is the callee's own contract, passed on unchanged.
        unsafe { decode::chunk_simd::<simd::Avx2, 4>(ctx, b, keys, scratch, part, 3) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn backward_item(
        ctx: &BackCtx<'_, '_, f32>,
        b: usize,
        keys: Range<usize>,
        g: ItemGrads<'_, f32>,
    ) -> Partials {
        // SAFETY: the `Family` contract (AVX2 and FMA detected) is what this trampoline enables,
        // and the rest of it is the callee's own contract, passed on unchanged.
        unsafe { backward::fused::item::<simd::Avx2, 2, 2>(ctx, b, keys, g, (6, 6)) }
    }
}

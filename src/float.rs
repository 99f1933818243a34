//! The floating-point types luong computes in.
//!
//! Every stage is generic over [`Float`], implemented for `f32` (Keras's default compute dtype)
//! and `f64` (which Keras silently drops to float32; luong computes in float64 for real).

use std::fmt::{Debug, Display};

use crate::backward::{BackCtx, ItemGrads};
use crate::kernel::{self, Ctx, Item, KeyCache};

/// A float type the attention stages can run in: `f32` or `f64`.
///
/// `MASK_BIAS` is the number Keras subtracts from masked scores (`1e9`; Keras uses `65504` for
/// float16: `Half::MASK_BIAS`). Keras subtracts a large finite number
/// instead of writing `-inf` so that a fully masked row still gives finite weights: the softmax of
/// `s - 1e9` is the softmax of `s` rounded to the spacing of floats near `1e9`.
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + ndarray::ScalarOperand
    + ndarray::LinalgScalar
    + Default
    + Debug
    + Display
    + Send
    + Sync
    + 'static
{
    /// Keras's bias for masked scores, in this type: `1e9`.
    const MASK_BIAS: Self;
    /// The dtype name NumPy and Keras use for this type.
    const NAME: &'static str;
    /// Converts an `f64` setting (scale, concat weight, keep probability) to this type, rounding
    /// as NumPy's cast does.
    fn of(x: f64) -> Self;

    /// A work thread's cache of prepared keys for this type's fast path (the portable path
    /// uses none).
    #[doc(hidden)]
    fn key_cache() -> KeyCache {
        KeyCache::default()
    }

    /// `x = e^x` over a slice (SIMD for f32 where the CPU has it).
    #[doc(hidden)]
    fn exp_in_place(xs: &mut [Self]) {
        xs.iter_mut().for_each(|x| *x = x.exp());
    }

    /// Runs one backward work item (batch element `b`, keys `keys`); returns the item's partial
    /// sums of the scalar gradients.
    #[doc(hidden)]
    fn backward_item(
        ctx: &BackCtx<'_, '_, Self>,
        b: usize,
        keys: std::ops::Range<usize>,
        grads: ItemGrads<'_, Self>,
    ) -> (f64, f64) {
        ctx.portable_item(b, keys, grads)
    }

    /// `out[i] = a_i · b_i` for the rows of two `(n, d)` arrays (the backward's `Δ = dO · O`).
    #[doc(hidden)]
    fn row_dots(a: ndarray::ArrayView2<'_, Self>, b: ndarray::ArrayView2<'_, Self>) -> Vec<Self> {
        a.rows()
            .into_iter()
            .zip(b.rows())
            .map(|(x, y)| x.dot(&y))
            .collect()
    }

    /// Runs a whole call on the split-keys decoding path when it applies to this type and call
    /// (`kernel::decode`), writing every row of `output` and `stats`; false when it does not.
    #[doc(hidden)]
    fn run_split(
        _ctx: &Ctx<'_, '_, Self>,
        _pool: Option<&rayon::ThreadPool>,
        _output: &mut ndarray::ArrayViewMut3<'_, std::mem::MaybeUninit<Self>>,
        _stats: Option<&mut ndarray::ArrayViewMut3<'_, std::mem::MaybeUninit<Self>>>,
    ) -> bool {
        false
    }

    /// Runs one work item: the fused fast path where there is one, else the stage functions.
    /// `scores` (`rows × Tv`) and `out` (`rows × Dv`) may be uninitialised: the item writes
    /// every entry of both before reading it. With `stats` (`rows × 2`), writes each row's
    /// softmax max and `ln Σ e^(x - max)`.
    #[doc(hidden)]
    fn attend_block(
        ctx: &Ctx<'_, '_, Self>,
        item: Item,
        _keys: &mut KeyCache,
        scores: &mut [std::mem::MaybeUninit<Self>],
        out: &mut [std::mem::MaybeUninit<Self>],
        stats: Option<&mut [Self]>,
    ) {
        let scores = crate::alloc::init(scores);
        kernel::portable_block(ctx, item, scores, crate::alloc::init(out), stats)
    }
}

impl Float for f32 {
    const MASK_BIAS: f32 = 1.0e9;
    const NAME: &'static str = "float32";
    #[inline]
    fn of(x: f64) -> f32 {
        x as f32
    }
    fn key_cache() -> KeyCache {
        KeyCache::recycled()
    }
    fn run_split(
        ctx: &Ctx<'_, '_, f32>,
        pool: Option<&rayon::ThreadPool>,
        output: &mut ndarray::ArrayViewMut3<'_, std::mem::MaybeUninit<f32>>,
        stats: Option<&mut ndarray::ArrayViewMut3<'_, std::mem::MaybeUninit<f32>>>,
    ) -> bool {
        kernel::decode::run_split(ctx, pool, output, stats)
    }
    fn attend_block(
        ctx: &Ctx<'_, '_, f32>,
        item: Item,
        keys: &mut KeyCache,
        scores: &mut [std::mem::MaybeUninit<f32>],
        out: &mut [std::mem::MaybeUninit<f32>],
        stats: Option<&mut [f32]>,
    ) {
        kernel::block_f32(ctx, item, keys, scores, out, stats)
    }
    fn exp_in_place(xs: &mut [f32]) {
        kernel::exp_scaled(kernel::Isa::detect(), xs, 1.0)
    }
    fn row_dots(a: ndarray::ArrayView2<'_, f32>, b: ndarray::ArrayView2<'_, f32>) -> Vec<f32> {
        kernel::backward::row_dots_f32(a, b)
    }
    fn backward_item(
        ctx: &BackCtx<'_, '_, f32>,
        b: usize,
        keys: std::ops::Range<usize>,
        grads: ItemGrads<'_, f32>,
    ) -> (f64, f64) {
        kernel::backward::item_f32(ctx, b, keys, grads)
    }
}

impl Float for f64 {
    const MASK_BIAS: f64 = 1.0e9;
    const NAME: &'static str = "float64";
    #[inline]
    fn of(x: f64) -> f64 {
        x
    }
}

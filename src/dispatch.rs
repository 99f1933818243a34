//! The entry layer's type dispatch: float32 calls go to the kernel families (`kernel`), every
//! other type to the portable item. Each function is a same-type check (`TypeId`) and, when `T`
//! is `f32`, a cast between what are then identical types: ndarray's own idiom for its BLAS
//! paths. This is the only place the crate casts between float types.

use std::any::TypeId;
use std::mem::MaybeUninit;
use std::ops::Range;

use ndarray::{ArrayView2, ArrayViewMut3};

use crate::config::ScoreMode;
use crate::cpu::Isa;
use crate::float::Float;
use crate::kernel::{self, BackCtx, Ctx, Item, ItemGrads, KeyCache, Partials};
use crate::shape::Dims;

/// Whether `T` is `f32`.
pub(crate) fn is_f32<T: 'static>() -> bool {
    TypeId::of::<T>() == TypeId::of::<f32>()
}

/// `x` as a `B`.
///
/// # Safety
/// `T` is `f32` ([`is_f32`]) and `B` is `A` with its `T` written as `f32`: one type, two names.
unsafe fn same<A, B>(x: &A) -> &B {
    debug_assert_eq!(std::mem::size_of::<A>(), std::mem::size_of::<B>());
    // SAFETY: `A` and `B` are the same type (the caller's contract).
    unsafe { &*(x as *const A).cast::<B>() }
}

/// [`same`] for a mutable reference.
///
/// # Safety
/// As [`same`].
unsafe fn same_mut<A, B>(x: &mut A) -> &mut B {
    debug_assert_eq!(std::mem::size_of::<A>(), std::mem::size_of::<B>());
    // SAFETY: `A` and `B` are the same type (the caller's contract).
    unsafe { &mut *(x as *mut A).cast::<B>() }
}

/// A slice of `A` as a slice of `B`.
///
/// # Safety
/// As [`same`], for the elements.
unsafe fn same_slice<A, B>(xs: &mut [A]) -> &mut [B] {
    debug_assert_eq!(std::mem::size_of::<A>(), std::mem::size_of::<B>());
    // SAFETY: `A` and `B` are the same type (the caller's contract), so the slice's pointer,
    // length and alignment stay valid.
    unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast::<B>(), xs.len()) }
}

/// A work thread's cache of prepared keys: this thread's buffers from its previous call for
/// f32, an empty one for the portable item (which reads keys in place).
pub(crate) fn key_cache<T: Float>() -> KeyCache {
    match is_f32::<T>() {
        true => KeyCache::recycled(),
        false => KeyCache::default(),
    }
}

/// Runs one work item: on the kernel families for f32 (`kernel::run_item`), else the stage
/// functions (`kernel::portable_block`). `scores` (`rows × Tv`) and `out` (`rows × Dv`) may be
/// uninitialised: the item writes every entry of both before reading it. With `stats`
/// (`rows × 2`), writes each row's softmax max and `ln Σ e^(x - max)`.
pub(crate) fn attend_block<T: Float>(
    ctx: &Ctx<'_, '_, T>,
    item: Item,
    keys: &mut KeyCache,
    scores: &mut [MaybeUninit<T>],
    out: &mut [MaybeUninit<T>],
    stats: Option<&mut [T]>,
) {
    if is_f32::<T>() {
        // SAFETY: `T` is `f32`, so each pair of types below is one type.
        let (ctx, scores, out, stats) = unsafe {
            (
                same::<Ctx<'_, '_, T>, Ctx<'_, '_, f32>>(ctx),
                same_slice::<_, MaybeUninit<f32>>(scores),
                same_slice::<_, MaybeUninit<f32>>(out),
                stats.map(|s| same_slice::<T, f32>(s)),
            )
        };
        return kernel::run_item(ctx, item, keys, scores, out, stats);
    }
    let (scores, out) = (crate::alloc::init(scores), crate::alloc::init(out));
    kernel::portable_block(ctx, item, scores, out, stats)
}

/// Runs a whole call on the split-keys decoding path when it applies (f32 only,
/// `kernel::run_split`), writing every row of `output` and `stats`; false when it does not.
pub(crate) fn run_split<T: Float>(
    ctx: &Ctx<'_, '_, T>,
    pool: Option<&rayon::ThreadPool>,
    output: &mut ArrayViewMut3<'_, MaybeUninit<T>>,
    stats: Option<&mut ArrayViewMut3<'_, MaybeUninit<T>>>,
) -> bool {
    if !is_f32::<T>() {
        return false;
    }
    type Out<'v, U> = ArrayViewMut3<'v, MaybeUninit<U>>;
    // SAFETY: `T` is `f32`, so each pair of types below is one type.
    let (ctx, output, stats) = unsafe {
        (
            same::<Ctx<'_, '_, T>, Ctx<'_, '_, f32>>(ctx),
            same_mut::<Out<'_, T>, Out<'_, f32>>(output),
            stats.map(|s| same_mut::<Out<'_, T>, Out<'_, f32>>(s)),
        )
    };
    kernel::run_split(ctx, pool, output, stats)
}

/// Runs one backward work item (batch element `b`, keys `keys`): on the kernel families for f32
/// (`kernel::backward_item`), else the portable item; returns the item's partial sums of the
/// scalar gradients.
pub(crate) fn backward_item<T: Float>(
    ctx: &BackCtx<'_, '_, T>,
    b: usize,
    keys: Range<usize>,
    g: ItemGrads<'_, T>,
) -> Partials {
    if !is_f32::<T>() {
        return ctx.portable_item(b, keys, g);
    }
    // SAFETY: `T` is `f32`, so each pair of types below is one type.
    let (ctx, g) = unsafe {
        let g = ItemGrads {
            dq: same_slice::<T, f32>(g.dq),
            dk: same_slice::<T, f32>(g.dk),
            dv: same_slice::<T, f32>(g.dv),
        };
        (same::<BackCtx<'_, '_, T>, BackCtx<'_, '_, f32>>(ctx), g)
    };
    kernel::backward_item(ctx, b, keys, g)
}

/// `out[i] = a_i · b_i` for the rows of two `(n, d)` arrays (the backward's `Δ = dO · O`), in
/// the order in which the call's backward items compute `dP = dO · Vᵀ`: FMA chains for the f32
/// items of a SIMD family (`kernel::row_dots_f32`), the matrix product's for the portable item.
pub(crate) fn row_dots<T: Float>(
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    (isa, mode, dims): (Isa, ScoreMode, Dims),
) -> Vec<T> {
    if is_f32::<T>() {
        type View<'v, U> = ArrayView2<'v, U>;
        // SAFETY: `T` is `f32`, so each pair of types below is one type.
        let (a32, b32) = unsafe {
            (
                same::<View<'_, T>, View<'_, f32>>(&a),
                same::<View<'_, T>, View<'_, f32>>(&b),
            )
        };
        let simd_items = kernel::backward_on_family(isa, mode, dims);
        let mut dots = kernel::row_dots_f32(a32.view(), b32.view(), simd_items);
        // SAFETY: as above, `Vec<f32>` is `Vec<T>`.
        return unsafe { std::mem::take(same_mut::<Vec<f32>, Vec<T>>(&mut dots)) };
    }
    kernel::row_dots_matmul(a, b)
}

/// `x = e^x` over a slice: the SIMD exp of the CPU's family for f32 (`kernel::exp_in_place`),
/// the elementwise `exp` otherwise.
pub(crate) fn exp_in_place<T: Float>(xs: &mut [T]) {
    if is_f32::<T>() {
        // SAFETY: `T` is `f32`.
        return kernel::exp_in_place(unsafe { same_slice::<T, f32>(xs) });
    }
    xs.iter_mut().for_each(|x| *x = x.exp());
}

//! The fast paths. A forward work item (a block of query rows of one batch element) runs scores,
//! mask, softmax, dropout and combine back to back while its `rows × Tv` block of scores sits in
//! cache; a backward item walks one range of keys. A map, to read first:
//!
//! | file | what it holds |
//! |---|---|
//! | `plan.rs` | every threshold and gate: threads per call, rows per item, tiles or not, flash |
//! | `item.rs` | the call's context ([`Ctx`]), the item ([`Item`]), the per-row steps all share |
//! | `family.rs` | the kernel-family trait: prepare, item, exp, decode chunk, backward item |
//! | `avx512.rs`, `avx2.rs`, `neon.rs`, `portable.rs` | the families, each with its own tiles |
//! | `fused.rs` | the fused item, written once, generic over [`simd::Simd`] and a tile shape |
//! | `softmax.rs` | the SIMD softmax of a row and the SIMD exp passes |
//! | `gemm.rs` | register-tiled products with epilogues, the panel packing, `dot_rows` |
//! | `simd.rs` | the `Simd` trait, its AVX-512, AVX2 and NEON implementations, the SIMD exp |
//! | `keys.rs` | what a thread prepares per batch element ([`KeyCache`]) |
//! | `decode.rs` | few query rows against many keys: split keys, merged in a fixed order |
//! | `amx/` | the AMX family: f32 on tiles, its own item and softmax (one `cfg` on the folder) |
//! | `backward/` | the backward item's context, its portable and its SIMD form |
//!
//! So "the softmax on AVX2" is `softmax::softmax_row::<simd::Avx2>`, called by `fused::item`,
//! which `avx2.rs` instantiates with its tiles; the portable family runs the readable stage
//! functions of `crate::softmax` instead.
//!
//! Selection is in one place, `on_family!`: [`Isa::Avx512`] and
//! [`Isa::Amx`] take the AVX-512 family (an AMX call tries its tiles first and
//! falls back to it), [`Isa::Avx2`] the AVX2 family, [`Isa::Neon`] (aarch64) the NEON
//! family, anything else the portable one. Adding a family is adding one implementation of [`family::Family`] and one arm
//! there. These paths compute in f32; the entry layer sends f64 to the portable item. Tests hold
//! every family equal to the stage functions within float32 rounding (`tests/kernels.rs`).

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod backward;
mod decode;
mod family;
mod fused;
mod gemm;
mod item;
mod keys;
#[cfg(target_arch = "aarch64")]
mod neon;
pub(crate) mod plan;
mod portable;
mod simd;
mod softmax;

use std::mem::MaybeUninit;
use std::ops::Range;

use ndarray::ArrayViewMut3;

use crate::alloc::init;
use crate::config::ScoreMode;
use crate::cpu::Isa;
use crate::shape::Dims;
use family::Family;

pub(crate) use backward::ctx::{BackCtx, ItemGrads, Partials, KEY_BLOCK};
pub(crate) use backward::{row_dots_f32, row_dots_matmul};
pub(crate) use item::{next_call, Ctx, Item};
pub(crate) use keys::KeyCache;
pub(crate) use portable::portable_block;

/// Runs `$body` with `$F` the kernel family of `$isa` (a type implementing [`Family`]). The one
/// place an ISA picks its family; `$isa` must come from detection (`cpu::resolve`), which is what
/// makes calling the family's `unsafe` methods sound.
macro_rules! on_family {
    ($isa:expr, $F:ident => $body:expr) => {
        match $isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Amx => {
                type $F = avx512::Avx512;
                $body
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                type $F = avx2::Avx2;
                $body
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => {
                type $F = neon::Neon;
                $body
            }
            _ => {
                type $F = portable::Portable;
                $body
            }
        }
    };
}

/// Runs one forward work item on `ctx.isa`'s family, with this thread's key cache: on tiles
/// when the call runs there and the item's inputs split exactly, else on the family's fused item
/// (the portable item for degenerate shapes). `scores` (`rows × Tv`) and `out` (`rows × Dv`) may
/// be uninitialised: the item writes every entry of both. With `stats` (`rows × 2`), writes each
/// row's softmax max and `ln Σ e^(x - max)`.
pub(crate) fn run_item(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    keys: &mut KeyCache,
    scores: &mut [MaybeUninit<f32>],
    out: &mut [MaybeUninit<f32>],
    #[allow(unused_mut)] mut stats: Option<&mut [f32]>,
) {
    let Dims { tv, d, dv, .. } = ctx.dims;
    if tv == 0 || d == 0 || dv == 0 {
        return portable_block(ctx, item, init(scores), init(out), stats);
    }
    on_family!(ctx.isa, F => {
        // SAFETY: `ctx.isa` was detected (`on_family!`).
        unsafe { F::prepare(keys, ctx, item.b) };
        #[cfg(target_arch = "x86_64")]
        if ctx.isa == Isa::Amx && keys.amx_ready {
            let packed = (&keys.amx, keys.finite);
            // SAFETY: Isa::Amx implies AVX-512F and the tile state (`cpu::amx_available`);
            // `prepare` packed this batch element's keys and values for the tiles (`amx_ready`).
            // The tiles write the output rows themselves; the family's item (also when the
            // tiles decline the item) gets them zeroed.
            if unsafe { amx::block_amx(ctx, item, packed, scores, out, stats.as_deref_mut()) } {
                return;
            }
        }
        // SAFETY: as above; `keys` was prepared by this family just now.
        unsafe { F::item(ctx, item, keys, scores, init(out), stats) }
    })
}

/// Runs a whole call on the split-keys decoding path when it applies (`decode`), writing every
/// row of `output` and `stats`; false, touching nothing, when it does not.
pub(crate) fn run_split(
    ctx: &Ctx<'_, '_, f32>,
    pool: Option<&rayon::ThreadPool>,
    output: &mut ArrayViewMut3<'_, MaybeUninit<f32>>,
    stats: Option<&mut ArrayViewMut3<'_, MaybeUninit<f32>>>,
) -> bool {
    // SAFETY: `ctx.isa` was detected (`on_family!`).
    on_family!(ctx.isa, F => unsafe { decode::run_split::<F>(ctx, pool, output, stats) })
}

/// Runs one backward work item (batch element `b`, keys `keys`) on `ctx.isa`'s family in dot
/// mode, on the portable item otherwise (concat mode, empty dims); returns the item's partial
/// sums of the scalar gradients.
pub(crate) fn backward_item(
    ctx: &BackCtx<'_, '_, f32>,
    b: usize,
    keys: Range<usize>,
    g: ItemGrads<'_, f32>,
) -> Partials {
    if !backward_on_family(ctx.isa, ctx.p.mode, ctx.dims) {
        return ctx.portable_item(b, keys, g);
    }
    // SAFETY: `ctx.isa` was detected (`on_family!`).
    on_family!(ctx.isa, F => unsafe { F::backward_item(ctx, b, keys, g) })
}

/// Whether the f32 backward items of a call run on a SIMD family's item (dot scores, D and Dv
/// non-zero, any ISA but the scalar one); the rest run the portable item.
pub(crate) fn backward_on_family(isa: Isa, mode: ScoreMode, dims: Dims) -> bool {
    mode == ScoreMode::Dot && dims.d > 0 && dims.dv > 0 && isa != Isa::Scalar
}

/// `x = e^x` over a slice, on the CPU's best family.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    // SAFETY: `Isa::detect` reports only what the CPU has.
    on_family!(Isa::detect(), F => unsafe { F::exp_scaled(xs, 1.0) })
}

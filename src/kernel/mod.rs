//! Fused fast paths: one work item (a block of query rows of one batch element) runs scores,
//! mask, softmax, dropout and combine back to back while its `rows × Tv` block of scores sits in
//! cache (in per-thread scratch, or straight in the returned scores array; L2 up to Tv = 4096).
//!
//! For f32 on x86-64 the products and the softmax run on AVX-512 or AVX2 + FMA micro-kernels
//! chosen at run time ([`Isa::detect`]), and on CPUs with AMX the dot mode's two products run
//! on tiles at f32 accuracy (`amx`, [`Isa::Amx`]) for calls the tiles win: 24 MFLOP or more,
//! blocks of 32 query rows or more, at most 2048 keys with returned weights (`tiles_or_not`);
//! everything else (f64, other CPUs, degenerate shapes) runs the portable block, which calls the
//! readable stage functions row by row. Tests hold the fast paths equal to the stage functions
//! within float32 rounding (`tests/kernels.rs`, every ISA the CPU has, the tiles at every size),
//! and Keras parity tests run on whatever path the machine picks (and again with
//! `LUONG_ISA=amx`).
//!
//! What the fast path buys at (8, 512, 512, 64), 2 threads, float32: see `benches/` and
//! docs/performance.md.

#[cfg(target_arch = "x86_64")]
mod amx;
pub(crate) mod backward;
pub(crate) mod decode;
mod gemm;
mod rows;
mod simd;

use std::mem::MaybeUninit;

pub use crate::cpu::Isa;

use ndarray::{ArrayView3, Axis};

use crate::combine::combine_row;
use crate::config::ScoreMode;
use crate::dropout::{dropout_row, DropoutMask};
use crate::float::Float;
use crate::mask::{mask_row, Masks};
use crate::score::{score_row, ScoreParams};
use crate::shape::Dims;
use crate::softmax::softmax_row;

/// Below this many query rows the dot scores read key rows in place instead of packing Kᵀ: the
/// packing pass costs as much as the product when each key meets only a few queries.
pub(crate) const PACK_MIN_TQ: usize = 8;

/// Keys per chunk of the combine: 128 value rows of 64 floats are 32 KiB, inside L1 (48 KiB).
const COMBINE_KEYS: usize = 128;

/// [`Isa::Amx`] runs a call on tiles only from this much work (4·B·Tq·Tv·D): a core's tile unit
/// takes about 3 µs to warm up after a millisecond unused (the first 128 tile products after a
/// 1 ms pause took 30 ns each instead of 4.5), which smaller calls do not recover. Measured with
/// 2 threads, back to back: (1, 256, 256, 64), 17 MFLOP, 76 µs on tiles against 71 on AVX-512;
/// (2, 256, 256, 64) and (8, 128, 128, 64), 34 MFLOP, 95 against 111 and 103 against 118.
pub(crate) const AMX_MIN_FLOP: usize = 24_000_000;

/// [`Isa::Amx`] runs a call on tiles only when its work items have at least this many query rows:
/// the tile products work in blocks of 32 rows, so an item of 16 rows pays for 32. Items shrink
/// below 32 rows when Tv > 32768 (the 4 MiB scores block) or B·Tq is small; measured with 2
/// threads, interleaved, before this rule: (1, 1024, 16384, 64) 37.4 ms on tiles against 28.8 on
/// AVX-512 (16-row items), (1, 512, 65536, 64) 363 against 103 (4-row items).
pub(crate) const AMX_MIN_ROWS: usize = 32;

/// With returned weights, [`Isa::Amx`] runs a call on tiles only up to this many keys. Such an
/// item also writes its weights out and keeps them in f32 and in three bf16 parts; with longer
/// rows the tiles lost. Measured, 2 threads, interleaved, tiles against AVX-512: (8, 512, 512,
/// 64) 1.65 against 1.94 ms, (4, 1024, 1024, 64) 3.39 against 4.18, (2, 2048, 2048, 64) 16.0
/// against 16.8; but (1, 1024, 4096, 64) 5.64 against 4.80 (5.74 against 4.94 with 32-row
/// items) and (1, 1024, 6000, 64) 9.46 against 8.10. Without returned weights the tiles won at
/// those lengths too: 4.29 against 4.55 and 6.74 against 7.37 ms.
pub(crate) const AMX_WEIGHTS_MAX_TV: usize = 2048;

/// When a call runs on tiles ([`Isa::Amx`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AmxGate {
    /// The least work, 4·B·Tq·Tv·D.
    pub(crate) min_flop: usize,
    /// The fewest query rows per work item.
    pub(crate) min_rows: usize,
    /// The most keys with returned weights.
    pub(crate) max_weights_tv: usize,
}

/// The gate for an explicitly requested ISA (`None`: the automatic choice): open at every size
/// when [`Isa::Amx`] is asked for by the builder or by `LUONG_ISA=amx` (for tests and
/// benchmarks), else [`AMX_MIN_FLOP`], [`AMX_MIN_ROWS`] and [`AMX_WEIGHTS_MAX_TV`].
pub(crate) fn amx_gate(requested: Option<Isa>) -> AmxGate {
    let env = crate::cpu::requested_by_env() == Some(Isa::Amx);
    if requested == Some(Isa::Amx) || (requested.is_none() && env) {
        AmxGate {
            min_flop: 0,
            min_rows: 0,
            max_weights_tv: usize::MAX,
        }
    } else {
        AmxGate {
            min_flop: AMX_MIN_FLOP,
            min_rows: AMX_MIN_ROWS,
            max_weights_tv: AMX_WEIGHTS_MAX_TV,
        }
    }
}

/// The ISA and rows per work item a call runs with: [`Isa::Amx`] stays only for dot scores with
/// packed keys (`Tq` at least [`PACK_MIN_TQ`]) that pass the gate, with items of a whole number
/// of the tiles' 32-row blocks when they have more (48 rows would pay for 64); any other call
/// on an AMX machine runs on AVX-512 with `rows` per item.
pub(crate) fn tiles_or_not(
    isa: Isa,
    gate: AmxGate,
    mode: ScoreMode,
    dims: Dims,
    rows: usize,
    weights: bool,
) -> (Isa, usize) {
    if isa != Isa::Amx {
        return (isa, rows);
    }
    let tile_rows = if rows > 32 { rows / 32 * 32 } else { rows };
    let flop = [dims.batch, dims.tq, dims.tv, dims.d]
        .iter()
        .fold(4usize, |a, &x| a.saturating_mul(x));
    let tiles = mode == ScoreMode::Dot
        && dims.tq >= PACK_MIN_TQ
        && flop >= gate.min_flop
        && tile_rows >= gate.min_rows
        && (!weights || dims.tv <= gate.max_weights_tv);
    match tiles {
        true => (Isa::Amx, tile_rows),
        false => (Isa::Avx512, rows),
    }
}

/// The most query rows of one work item.
pub(crate) const MAX_ITEM_ROWS: usize = 64;

/// A concat score uses `e^{2s·q}·e^{2s·k}` only when every `|2s·q|` and `|2s·k|` is at most this,
/// so the product stays within `[e^-80, e^80]`, far inside f32's range.
const CONCAT_EXP_LIMIT: f32 = 40.0;

/// Everything a work item reads, shared by all items of one call.
pub struct Ctx<'a, 'm, T> {
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
    /// Items on tiles run their keys in chunks ([`flash`]).
    pub(crate) flash: bool,
    /// This call's number ([`next_call`]): what a thread split ahead for its next item
    /// ([`amx::SplitAhead`]) is used only within the call that split it.
    pub(crate) call: u64,
}

/// A number no earlier call had.
pub(crate) fn next_call() -> u64 {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A block of query rows `i0 .. i0 + rows` of batch element `b`.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    pub(crate) b: usize,
    pub(crate) i0: usize,
    pub(crate) rows: usize,
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

fn apply_dropout_row<T: Float>(ctx: &Ctx<'_, '_, T>, first: usize, s: &mut [T]) {
    if let Some((mask, keep_prob)) = &ctx.dropout {
        dropout_row(s.iter_mut(), mask, *keep_prob, first as u64);
    }
}

fn masked(masks: &Masks<'_>) -> bool {
    masks.value.is_some() || masks.causal
}

/// What the f32 fast path prepares once per batch element, per thread: Kᵀ packed in panels
/// (dot, Tq ≥ PACK_MIN_TQ) or `e^{2s·k}` panels (concat), and two flags. Each thread keeps the
/// batch element it last prepared, so a thread working through its contiguous share of the
/// items packs each batch element's keys once, and no call waits on a separate packing pass
/// (which cost a pool hand-off and a barrier per call). A thread that steals an item of another
/// batch element packs that element again: the same bits, a little more work.
#[derive(Default)]
pub struct KeyCache {
    /// The batch element the buffer holds, if any.
    b: Option<usize>,
    packed: Vec<f32>,
    /// Whether `packed` holds panels (false: the dot scores read key rows in place).
    has_panels: bool,
    /// Concat: whether the keys allow the exponential form.
    concat_ok: bool,
    /// Causal: whether keys and values are all finite (`causal_lengths`).
    finite: bool,
    /// [`Isa::Amx`]: keys and values in tile layout, when `amx_ready` (the dot mode with
    /// packed keys, and every key and value split exactly); else the AVX-512 path runs.
    #[cfg(target_arch = "x86_64")]
    amx: amx::Packed,
    amx_ready: bool,
}

impl KeyCache {
    /// A cache whose buffer is this thread's buffer from its previous call: fresh pages for
    /// every call cost more in page faults than packing itself.
    pub(crate) fn recycled() -> Self {
        KeyCache {
            packed: PACKED.with(|c| c.take()),
            #[cfg(target_arch = "x86_64")]
            amx: AMX_PACKED.with(|c| c.take()),
            ..KeyCache::default()
        }
    }

    /// Prepares batch element `b` unless this cache holds it already.
    fn prepare(&mut self, ctx: &Ctx<'_, '_, f32>, b: usize) {
        if self.b == Some(b) {
            return;
        }
        let Dims { tq, tv, d, .. } = ctx.dims;
        let (params, isa) = (ctx.params, ctx.isa);
        let key = ctx.key.index_axis(Axis(0), b);
        self.finite =
            ctx.masks.causal && all_finite(key) && all_finite(ctx.value.index_axis(Axis(0), b));
        self.b = Some(b);
        self.amx_ready = false;
        #[cfg(target_arch = "x86_64")]
        {
            // `tiles_or_not` left Isa::Amx only for calls that run on tiles.
            if isa == Isa::Amx && params.mode == ScoreMode::Dot && tq >= PACK_MIN_TQ {
                let value = ctx.value.index_axis(Axis(0), b);
                let (ld, ldv) = (key.stride_of(Axis(0)), value.stride_of(Axis(0)));
                // SAFETY: Isa::Amx was detected (AVX-512F and the tile state); the views' rows are
                // contiguous with non-negative strides, `tv` rows of `d` (keys) and `dv` (values)
                // floats (`shape::check_qkv`).
                let exact = unsafe {
                    self.amx.pack(
                        key.as_ptr(),
                        ld as usize,
                        value.as_ptr(),
                        ldv as usize,
                        (tv, d, ctx.dims.dv),
                    )
                };
                if exact {
                    (self.has_panels, self.concat_ok, self.amx_ready) = (false, true, true);
                    return;
                }
            }
        }
        let nr = fwd_panel_width(isa);
        let per_batch = tv.div_ceil(nr) * d * nr;
        let two_s = 2.0 * params.scale.unwrap_or(1.0);
        (self.has_panels, self.concat_ok) = match params.mode {
            ScoreMode::Dot if tq >= PACK_MIN_TQ => {
                self.packed.resize(per_batch, 0.0); // every element is written below
                pack_keys(isa, key, nr, &mut self.packed);
                (true, true)
            }
            ScoreMode::Dot => (false, true),
            ScoreMode::Concat => {
                let ok = key.rows().into_iter().all(|r| {
                    let r = r.to_slice().expect("key rows are contiguous");
                    r.iter().all(|&x| (two_s * x).abs() <= CONCAT_EXP_LIMIT)
                });
                if ok {
                    self.packed.resize(per_batch, 0.0);
                    pack_keys(isa, key, nr, &mut self.packed);
                    exp_scaled(isa, &mut self.packed, two_s);
                }
                (ok, ok)
            }
        };
    }
}

impl Drop for KeyCache {
    /// Keeps the buffers for this thread's next call (up to 64 MiB each).
    fn drop(&mut self) {
        let packed = std::mem::take(&mut self.packed);
        if packed.capacity() > 0 && packed.capacity() <= (64 << 20) / 4 {
            PACKED.with(|c| c.set(packed));
        }
        // The tile buffers too, up to 64 MiB each (a call with very long keys does not leave
        // its buffers to every later call of the thread).
        #[cfg(target_arch = "x86_64")]
        {
            const KEEP: usize = 64 << 20;
            let amx = std::mem::take(&mut self.amx);
            if amx.bytes() <= KEEP {
                AMX_PACKED.with(|c| c.set(amx));
            }
            AMX_SCRATCH.with_borrow_mut(|s| {
                if s.bytes() > KEEP {
                    *s = amx::Scratch::default();
                }
            });
        }
    }
}

thread_local! {
    /// The last call's packed keys on this thread (see [`KeyCache::recycled`]).
    static PACKED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The last call's keys and values in tile layout on this thread.
    static AMX_PACKED: std::cell::Cell<amx::Packed> = std::cell::Cell::default();
    /// The tile kernels' per-item scratch on this thread.
    static AMX_SCRATCH: std::cell::RefCell<amx::Scratch> = std::cell::RefCell::default();
}

/// Whether every element is finite; branch-free over contiguous rows so it vectorises.
fn all_finite(a: ndarray::ArrayView2<'_, f32>) -> bool {
    const EXP: u32 = 0x7f80_0000;
    let nonfinite = |row: &[f32]| {
        row.iter()
            .fold(0u32, |acc, x| acc | ((x.to_bits() & EXP == EXP) as u32))
    };
    a.rows().into_iter().all(|r| match r.as_slice() {
        Some(row) => nonfinite(row) == 0,
        None => r.iter().all(|x| x.is_finite()),
    })
}

/// Kᵀ in panels of `nr` columns ([`gemm::pack`]) on the given ISA.
fn pack_keys(isa: Isa, key: ndarray::ArrayView2<'_, f32>, nr: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(key: ndarray::ArrayView2<'_, f32>, nr: usize, out: &mut [f32]) {
            gemm::pack::<simd::Avx512>(key, nr, out)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(key: ndarray::ArrayView2<'_, f32>, nr: usize, out: &mut [f32]) {
            gemm::pack::<simd::Avx2>(key, nr, out)
        }
        match isa {
            // SAFETY: the ISA was detected (`Isa::detect`); `nr` is `panel_width(isa)` or
            // `fwd_panel_width(isa)`, a multiple of the lanes, and callers size `out` for it.
            Isa::Avx512 | Isa::Amx => return unsafe { avx512(key, nr, out) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { avx2(key, nr, out) },
            Isa::Scalar => {}
        }
    }
    gemm::pack_panels(key, nr, out)
}

/// `x = e^{c·x}` over a buffer, on the given ISA.
pub(crate) fn exp_scaled(isa: Isa, xs: &mut [f32], c: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(xs: &mut [f32], c: f32) {
            exp_scaled_simd::<simd::Avx512>(xs, c)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(xs: &mut [f32], c: f32) {
            exp_scaled_simd::<simd::Avx2>(xs, c)
        }
        match isa {
            // SAFETY: the ISA was detected (`Isa::detect`).
            Isa::Avx512 | Isa::Amx => return unsafe { avx512(xs, c) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { avx2(xs, c) },
            Isa::Scalar => {}
        }
    }
    xs.iter_mut().for_each(|x| *x = (c * *x).exp());
}

/// `x = e^{c·x}` over a slice on ISA `S`.
///
/// # Safety
/// `S`'s instructions must be available. Whole vectors come from `chunks_exact_mut`; the tail is
/// read and written with masked loads and stores of exactly its length.
#[inline(always)]
unsafe fn exp_scaled_simd<S: simd::Simd>(xs: &mut [f32], c: f32) {
    let (l, cv) = (S::LANES, S::splat(c));
    let mut chunks = xs.chunks_exact_mut(l);
    for ch in &mut chunks {
        S::store(ch.as_mut_ptr(), S::exp(S::mul(S::load(ch.as_ptr()), cv)));
    }
    let tail = chunks.into_remainder();
    let m = S::mask(tail.len());
    let v = S::exp(S::mul(S::load_masked(tail.as_ptr(), m), cv));
    S::store_masked(tail.as_mut_ptr(), m, v);
}

/// The backward's panel width (its score tiles are 12 × 32 on AVX-512).
fn panel_width(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 | Isa::Amx => 32,
        _ => 16,
    }
}

/// The forward's panel width: the scores tile's NVS vectors (6 × 64 on AVX-512 measured 1–2%
/// faster than 12 × 32 in an interleaved A/B at (8,512,512,64), (32,128,128,64) and
/// (2,2048,2048,64); the same for concat).
fn fwd_panel_width(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 | Isa::Amx => 64,
        _ => 16,
    }
}

/// Runs one item on the f32 fast path (or the portable block where it does not apply), with
/// this thread's key cache.
pub(crate) fn block_f32(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    keys: &mut KeyCache,
    scores: &mut [MaybeUninit<f32>],
    out: &mut [MaybeUninit<f32>],
    mut stats: Option<&mut [f32]>,
) {
    use crate::alloc::init;
    let Dims { tv, d, dv, .. } = ctx.dims;
    if tv == 0 || d == 0 || dv == 0 {
        return portable_block(ctx, item, init(scores), init(out), stats);
    }
    if ctx.isa != Isa::Scalar {
        keys.prepare(ctx, item.b);
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: Isa::Amx implies AVX-512F and the tile state (`amx::available`); `prepare`
    // packed this batch element's keys and values for the tiles when `amx_ready`. The tiles
    // write the output rows themselves; every other path (also when the tiles decline the
    // item) gets them zeroed.
    if ctx.isa == Isa::Amx
        && keys.amx_ready
        && unsafe { block_amx(ctx, item, keys, scores, out, stats.as_deref_mut()) }
    {
        return;
    }
    let out = init(out);
    match ctx.isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` chose Avx512 (and Amx) only after
        // `is_x86_feature_detected!("avx512f")`.
        Isa::Avx512 | Isa::Amx => unsafe { block_avx512(ctx, item, keys, scores, out, stats) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 only after detecting avx2 and fma.
        Isa::Avx2 => unsafe { block_avx2(ctx, item, keys, scores, out, stats) },
        _ => portable_block(ctx, item, init(scores), out, stats),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    keys: &KeyCache,
    scores: &mut [MaybeUninit<f32>],
    out: &mut [f32],
    stats: Option<&mut [f32]>,
) {
    // Tiles: scores 6 rows × 64 keys, combine 6 × 64 (24 accumulators of 32 registers each).
    block_simd::<simd::Avx512, 4>(
        ctx,
        item,
        keys,
        scores,
        out,
        stats,
        Tiles {
            scores_mr: 6,
            combine_mr: 6,
        },
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    keys: &KeyCache,
    scores: &mut [MaybeUninit<f32>],
    out: &mut [f32],
    stats: Option<&mut [f32]>,
) {
    // Tiles: scores 6 rows × 16 keys, combine 3 × 32 (12 accumulators of 16 registers).
    block_simd::<simd::Avx2, 2>(
        ctx,
        item,
        keys,
        scores,
        out,
        stats,
        Tiles {
            scores_mr: 6,
            combine_mr: 3,
        },
    )
}

#[derive(Clone, Copy)]
struct Tiles {
    scores_mr: usize,
    combine_mr: usize,
}

/// The fused block on ISA `S`.
///
/// # Safety
/// `S`'s instructions must be available; `keys` was prepared (`KeyCache::prepare`) for this
/// batch element and ISA.
///
/// Why the raw pointers stay in bounds: the views in `ctx` have non-negative strides and
/// contiguous rows (`shape::rows_contiguous`), and `shape::check_qkv` / `check_masks` checked
/// every size against `ctx.dims`. The query block starts at row `i0 < Tq` and spans `rows`
/// rows with `i0 + rows <= Tq` (`run_items`); the packed panels of the element are `per_batch`
/// floats (`KeyCache::prepare` sizes them), zero-padded to whole panels, so the full-width
/// loads of a panel stay inside; value rows are read with full-width loads only for whole
/// panels of `Dv` columns and with masked loads (which touch no masked-off lane) for the tail;
/// `scores` holds `rows · Tv` and `out` `rows · Dv` floats (asserted below), and the products
/// write only `rows × cols` and `rows × Dv` of them.
#[inline(always)]
unsafe fn block_simd<S: simd::Simd, const NVS: usize>(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    keys: &KeyCache,
    scores: &mut [MaybeUninit<f32>],
    out: &mut [f32],
    mut stats: Option<&mut [f32]>,
    tiles: Tiles,
) {
    let Dims { tv, d, dv, .. } = ctx.dims;
    let Item { b, i0, rows } = item;
    debug_assert!(scores.len() >= rows * tv && out.len() >= rows * dv);
    let q = ctx.query.index_axis(Axis(0), b);
    let q_ld = q.stride_of(Axis(0));
    let q0 = q.as_ptr().offset(i0 as isize * q_ld);
    let nr = fwd_panel_width(ctx.isa);
    let panel = d * nr;
    let mut lens = [tv; MAX_ITEM_ROWS];
    let cols = causal_lengths(ctx, item, keys.finite, &mut lens);

    // 1. Scores, for the first `cols` keys (the rest are hidden from every row of the block).
    //    `scores` may be uninitialised (the returned weights' rows): the packed product writes
    //    every row's first `cols` entries and the rest are zeroed here, so no pass writes zeros
    //    first; the other score paths work on slices and get a zeroed block.
    // Without masks the packed product also finds each row's max (lane-wise, per row) as it
    // stores the scores, and the softmax skips its pass to find it.
    let fused_max = keys.has_panels && ctx.params.mode == ScoreMode::Dot && !masked(ctx.masks);
    let mut row_max = [f32::NEG_INFINITY; MAX_ITEM_ROWS * 16];
    let scores: &mut [f32] = match ctx.params.mode {
        ScoreMode::Dot if keys.has_panels => {
            let sc = scores.as_mut_ptr().cast::<f32>();
            let g = gemm::Gemm {
                m: rows,
                n: cols,
                k: d,
                a: q0,
                lda: q_ld as usize,
                b: keys.packed.as_ptr(),
                b_row: nr,
                b_panel: panel,
                c: sc,
                ldc: tv,
            };
            let dot = gemm::Dot {
                scale: ctx.params.scale,
            };
            if fused_max {
                let max = row_max.as_mut_ptr();
                gemm::gemm::<S, _, NVS>(&g, gemm::DotMax { dot, max }, tiles.scores_mr);
            } else {
                gemm::gemm::<S, _, NVS>(&g, dot, tiles.scores_mr);
            }
            if cols < tv {
                for r in 0..rows {
                    std::ptr::write_bytes(sc.add(r * tv + cols), 0, tv - cols);
                }
            }
            // SAFETY: every one of the `rows · Tv` entries was just written (the product the
            // first `cols` of each row, `write_bytes` the rest), and MaybeUninit<f32> has f32's
            // layout.
            std::slice::from_raw_parts_mut(sc, rows * tv)
        }
        ScoreMode::Dot => {
            let scores = crate::alloc::init(&mut scores[..rows * tv]);
            let k = ctx.key.index_axis(Axis(0), b);
            for r in 0..rows {
                let qr = std::slice::from_raw_parts(q0.offset(r as isize * q_ld), d);
                let s = &mut scores[r * tv..r * tv + cols];
                rows::dot_rows::<S>(
                    qr,
                    k.as_ptr(),
                    k.stride_of(Axis(0)) as usize,
                    s,
                    ctx.params.scale,
                );
            }
            scores
        }
        ScoreMode::Concat => {
            let scores = crate::alloc::init(&mut scores[..rows * tv]);
            concat_scores::<S, NVS>(ctx, item, keys, cols, scores, tiles.scores_mr);
            scores
        }
    };

    // 2. Mask, softmax, dropout. Unless the weights are returned, rows stay unnormalised and
    //    the output rows are scaled by 1/sum after the combine.
    //    Row r covers its first `lens[r]` keys; the rest of its first `cols` are zeroed for the
    //    combine (and of all Tv when the weights are returned).
    let mut inv = [1.0f32; MAX_ITEM_ROWS];
    let normalize = ctx.normalize;
    for r in 0..rows {
        let (row, len) = (&mut scores[r * tv..(r + 1) * tv], lens[r]);
        let known_max = if fused_max {
            let m = S::hmax(S::load(row_max.as_ptr().add(r * S::LANES)));
            debug_assert!(
                row[..len].iter().any(|x| x.is_nan())
                    || m == row[..len].iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)),
                "the product's row max is the row's max"
            );
            Some(m)
        } else {
            None
        };
        inv[r] = finish_fast_row::<S>(
            ctx,
            item,
            r,
            &mut row[..len],
            known_max,
            stats.as_deref_mut(),
        );
        row[len..if normalize { tv } else { cols }].fill(0.0);
    }

    // 3. Combine, then the query mask. The keys go in chunks of COMBINE_KEYS so a chunk of
    //    value rows stays in L1 while every row tile of the block passes over it; each output
    //    element is still one sequential chain over the keys (the tiles continue from C).
    let v = ctx.value.index_axis(Axis(0), b);
    let v_ld = v.stride_of(Axis(0)) as usize;
    let mut k0 = 0;
    while k0 < cols {
        let kc = COMBINE_KEYS.min(cols - k0);
        let g = gemm::Gemm {
            m: rows,
            n: dv,
            k: kc,
            a: scores.as_ptr().add(k0),
            lda: tv,
            b: v.as_ptr().add(k0 * v_ld),
            b_row: v_ld,
            b_panel: 4 * S::LANES,
            c: out.as_mut_ptr(),
            ldc: dv,
        };
        let dot = gemm::Dot { scale: None };
        if k0 == 0 {
            gemm::gemm::<S, _, 4>(&g, dot, tiles.combine_mr);
        } else {
            gemm::gemm_with::<S, _, 4, false, true>(&g, dot, tiles.combine_mr);
        }
        k0 += kc;
    }
    finish_out_rows(ctx, item, out, &inv);
}

/// Step 2 of a fast item for its row `r`, `s` the row's first `lens[r]` scores: mask, softmax,
/// statistics (`stats`, the item's `rows × 2`), dropout. Returns what the combined output row is
/// to be multiplied by: `1 / sum` unless the weights are normalised in place (then 1).
///
/// # Safety
/// `S`'s instructions must be available.
#[inline(always)]
unsafe fn finish_fast_row<S: simd::Simd>(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    r: usize,
    s: &mut [f32],
    known_max: Option<f32>,
    stats: Option<&mut [f32]>,
) -> f32 {
    let Dims { tq, tv, .. } = ctx.dims;
    let (b, i) = (item.b, item.i0 + r);
    mask_fast_row(ctx, item, r, 0, s);
    let (max, sum) = rows::softmax_row::<S>(s, ctx.normalize, known_max);
    let inv = row_done(ctx.normalize, r, (max, sum), stats);
    apply_dropout_row(ctx, (b * tq + i) * tv, s);
    inv
}

/// Row `r`'s softmax `(max, sum)` into the statistics, if kept; returns what its output row is
/// to be multiplied by: `1 / sum` unless the combined weights were `normalized` (then 1).
fn row_done(normalized: bool, r: usize, (max, sum): (f32, f32), stats: Option<&mut [f32]>) -> f32 {
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
fn mask_fast_row(ctx: &Ctx<'_, '_, f32>, item: Item, r: usize, c0: usize, s: &mut [f32]) {
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
fn scale_row(ctx: &Ctx<'_, '_, f32>, s: &mut [f32]) {
    if let Some(c) = ctx.params.scale {
        s.iter_mut().for_each(|x| *x *= c);
    }
}

/// The last step of a fast item: each output row times its `inv` (from [`finish_fast_row`]), or
/// zeros where the query mask drops the row.
fn finish_out_rows(ctx: &Ctx<'_, '_, f32>, item: Item, out: &mut [f32], inv: &[f32]) {
    let dv = ctx.dims.dv;
    for (r, o) in out[..item.rows * dv].chunks_exact_mut(dv).enumerate() {
        if !ctx.masks.query_keeps(item.b, item.i0 + r) {
            o.fill(0.0);
        } else if inv[r] != 1.0 {
            o.iter_mut().for_each(|x| *x *= inv[r]);
        }
    }
}

/// Where an AMX item's softmax reads and writes: the raw scores (`ld` floats per row), the
/// weight parts (`kp` wide), the returned weights (`Tv` per row) and each row's length.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct SoftmaxBufs<'a> {
    raw: *mut f32,
    ld: usize,
    parts: [*mut u16; 3],
    kp: usize,
    /// The returned weights, `Tv` floats per row (null: none are written).
    weights: *mut f32,
    lens: &'a [usize; MAX_ITEM_ROWS],
}

/// The softmax of rows `r .. end` of an AMX item without dropout, one row after another: each
/// row's scale and masks (done one row ahead), `e^(s - max)` split into the weight parts
/// ([`amx::ExpPass`], which also finds the next row's max and normalises the row before's
/// returned weights), the row's statistics and output factor (`inv`). As side work
/// ([`amx::SideWork`]) it runs 32 scores per step between another block's tile products.
#[cfg(target_arch = "x86_64")]
struct RowSoftmax<'a, 'c, 'm> {
    ctx: &'a Ctx<'c, 'm, f32>,
    item: Item,
    bufs: SoftmaxBufs<'a>,
    r: usize,
    end: usize,
    max: f32,
    pass: Option<amx::ExpPass>,
    /// The row before's returned weights, to normalise by its 1 / sum during this row's pass.
    pending: Option<(*mut f32, usize, f32)>,
    inv: &'a mut [f32; MAX_ITEM_ROWS],
    stats: Option<&'a mut [f32]>,
    /// Whether every row was scaled and masked up front (for side work: a row's masks in one
    /// step would hold up the tile unit; a pass of their own costs the same as before).
    prepared: bool,
}

#[cfg(target_arch = "x86_64")]
impl<'a, 'c, 'm> RowSoftmax<'a, 'c, 'm> {
    /// Scales and masks row `rows.start` (with `prepared`, every row) and finds its max.
    ///
    /// # Safety
    /// AVX-512F; `bufs` holds the item's raw scores for these rows, its weight parts sized for
    /// them, and (with returned weights) `Tv` writable floats per row; nothing else touches
    /// these rows until [`RowSoftmax::finish`].
    #[target_feature(enable = "avx512f")]
    unsafe fn new(
        ctx: &'a Ctx<'c, 'm, f32>,
        item: Item,
        bufs: SoftmaxBufs<'a>,
        rows: std::ops::Range<usize>,
        inv: &'a mut [f32; MAX_ITEM_ROWS],
        stats: Option<&'a mut [f32]>,
        prepared: bool,
    ) -> Self {
        let mut sm = RowSoftmax {
            ctx,
            item,
            bufs,
            r: rows.start,
            end: rows.end,
            max: f32::NEG_INFINITY,
            pass: None,
            pending: None,
            inv,
            stats,
            prepared,
        };
        let first = if prepared { sm.end } else { sm.r + 1 };
        for r in sm.r..first.min(sm.end) {
            sm.prepare(r);
        }
        if sm.r < sm.end {
            sm.max = rows::max_of_row::<simd::Avx512>(sm.row(sm.r));
        }
        sm
    }

    /// Row `r`'s scores.
    ///
    /// # Safety
    /// As [`RowSoftmax::new`]; one reference per row at a time.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, r: usize) -> &mut [f32] {
        let b = self.bufs;
        std::slice::from_raw_parts_mut(b.raw.add(r * b.ld), b.lens[r])
    }

    /// Row `r`'s scale and masks (before the pass that finds its max).
    #[target_feature(enable = "avx512f")]
    unsafe fn prepare(&self, r: usize) {
        scale_row(self.ctx, self.row(r));
        mask_fast_row(self.ctx, self.item, r, 0, self.row(r));
    }

    /// Starts row `r`'s pass, the next row scaled and masked first.
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    unsafe fn start_row(&mut self) {
        let r = self.r;
        let next: &[f32] = if r + 1 < self.end {
            if !self.prepared {
                self.prepare(r + 1);
            }
            self.row(r + 1)
        } else {
            &[]
        };
        let b = self.bufs;
        let w = (!b.weights.is_null()).then(|| b.weights.add(r * self.ctx.dims.tv));
        let parts = (b.parts, r, b.kp);
        self.pass = Some(amx::ExpPass::new(
            self.row(r),
            self.max,
            parts,
            w,
            next,
            self.pending,
        ));
    }

    /// Ends row `r`'s pass: its factor and statistics, the zeros past its returned weights.
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    unsafe fn end_row(&mut self, (sum, next_max): (f32, f32)) {
        let r = self.r;
        self.inv[r] = row_done(false, r, (self.max, sum), self.stats.as_deref_mut());
        let (len, tv) = (self.bufs.lens[r], self.ctx.dims.tv);
        self.pending = None;
        if !self.bufs.weights.is_null() {
            // The returned weights: this row of `scores` (`rows · Tv`, possibly uninitialised)
            // is written in full, `e` by the pass, the zeros here, the scaling by the next.
            let w = self.bufs.weights.add(r * tv);
            std::ptr::write_bytes(w.add(len), 0, tv - len);
            self.pending = Some((w, len, self.inv[r]));
        }
        self.max = next_max;
        self.r += 1;
    }

    /// Runs what is left, then normalises the last row's returned weights.
    ///
    /// # Safety
    /// As [`RowSoftmax::new`].
    #[target_feature(enable = "avx512f")]
    unsafe fn finish(mut self) {
        // A row under way goes on step by step, the rest each in one loop.
        while self.pass.is_some() {
            amx::SideWork::step(&mut self);
        }
        while self.r < self.end {
            self.start_row();
            if let Some(mut pass) = self.pass.take() {
                while !pass.done() {
                    pass.chunk();
                }
                self.end_row(pass.finish());
            }
        }
        if let Some((w, len, inv)) = self.pending {
            amx::scale_weights(w, len, inv);
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl amx::SideWork for RowSoftmax<'_, '_, '_> {
    fn units(&self) -> usize {
        (self.end - self.r) * (self.bufs.kp / 32)
    }

    /// 32 scores of the current row.
    ///
    /// # Safety
    /// As [`RowSoftmax::new`], in code compiled for AVX-512F.
    #[inline(always)]
    unsafe fn step(&mut self) {
        if self.r >= self.end {
            return;
        }
        if self.pass.is_none() {
            self.start_row();
        }
        if let Some(pass) = &mut self.pass {
            pass.chunk();
            if pass.done() {
                let done = pass.finish();
                self.pass = None;
                self.end_row(done);
            }
        }
    }
}

/// The query rows of the item this thread most likely takes next: the rows after `item`'s, in
/// its batch element or the next ([`crate::pool::run_indexed`] hands a thread its share in
/// order); none after the last.
#[cfg(target_arch = "x86_64")]
fn next_item_queries(ctx: &Ctx<'_, '_, f32>, item: Item) -> Option<amx::QueryRows> {
    let Dims { batch, tq, d, .. } = ctx.dims;
    let (b, i0) = match item.i0 + item.rows < tq {
        true => (item.b, item.i0 + item.rows),
        false => (item.b + 1, 0),
    };
    (b < batch).then(|| {
        let q = ctx.query.index_axis(Axis(0), b);
        let ld = q.stride_of(Axis(0)) as usize;
        amx::QueryRows {
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
#[cfg(target_arch = "x86_64")]
fn item_bytes(ctx: &Ctx<'_, '_, f32>, rows: usize) -> usize {
    let Dims { tv, d, dv, .. } = ctx.dims;
    tv * (d + dv) * 6 + rows * tv * 14
}

/// Up to this many [`item_bytes`] (the L2 of a core with tiles is 2 MiB), an item's returned
/// weights are prefetched into L2 during its scores ([`amx::Prefetch`]). Beyond, the prefetched
/// rows push the keys' and values' parts out: (2, 2048, 2048, 64), 3.3 MB per item, took
/// 9.9-12.4 against 9.3-10.2 ms with them, and (4, 1024, 1024, 64), 1.7 MB, gained nothing
/// (2.65-2.75 against 2.58-2.74 ms), where (4, 768, 768, 64), 1.3 MB, took 1.34-1.39 against
/// 1.40-1.44 (2 threads, alternating, medians of 40-100).
#[cfg(target_arch = "x86_64")]
const PREFETCH_WEIGHTS_UP_TO: usize = 3 << 19;

/// One item on AMX tiles ([`amx`]): scores product on tiles into scratch, then row by row the
/// scale and masks, the softmax (`e^(s - max)` split into three parts; the row's max found while
/// the row before was exponentiated, [`RowSoftmax`]) and the returned weights, or with dropout
/// [`finish_fast_row`] and the split, then the combine on tiles and each output row over its
/// sum. Without returned weights or dropout, an item of two 32-row blocks runs each block's
/// softmax between the other block's tile products ([`amx::SideWork`]): block 0's scores, block
/// 1's scores with block 0's softmax, block 0's combine with block 1's softmax, block 1's
/// combine. The output rows may come uninitialised: the copy-out from the tiles' O writes each
/// in full (zeroing them first cost 0.4-4.2% of a call at (8, 512, 512, 64) with returned
/// weights, 0-4.6% without: Rust, 2 threads, old and new binaries alternating, medians of 200).
/// Returns false, touching nothing the caller reads, when a query row of the item does not
/// split exactly (`amx::split_queries`); the caller then runs the AVX-512 path.
///
/// # Safety
/// [`Isa::Amx`] was detected; `keys` was prepared with `amx_ready` for batch element `item.b`.
/// Sizes as [`block_simd`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_amx(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    keys: &KeyCache,
    scores: &mut [MaybeUninit<f32>],
    out: &mut [MaybeUninit<f32>],
    mut stats: Option<&mut [f32]>,
) -> bool {
    let Dims { tv, d, dv, .. } = ctx.dims;
    let Item { b, i0, rows } = item;
    debug_assert!(scores.len() >= rows * tv && out.len() >= rows * dv);
    let q = ctx.query.index_axis(Axis(0), b);
    let q_ld = q.stride_of(Axis(0)) as usize;
    let q0 = q.as_ptr().add(i0 * q_ld);
    let mut lens = [tv; MAX_ITEM_ROWS];
    let cols = causal_lengths(ctx, item, keys.finite, &mut lens);
    let weights = scores.as_mut_ptr().cast::<f32>();
    let mut inv = [1.0f32; MAX_ITEM_ROWS];
    let done = AMX_SCRATCH.with_borrow_mut(|scratch| {
        let at = amx::QueryRows {
            call: ctx.call,
            q0,
            ld: q_ld,
            rows,
            d,
        };
        let Some(dp) = amx::queries_for(scratch, at) else {
            return false;
        };
        let tiles = amx::Tiles::configure();
        if ctx.flash {
            amx_flash(
                ctx,
                item,
                keys,
                (scratch, &tiles, dp),
                crate::alloc::init(out),
                stats.as_deref_mut(),
                &mut inv,
            );
            return true;
        }
        let (kp, parts) = amx::weight_parts(scratch, rows, cols);
        let (amx_keys, blocks) = (&keys.amx, rows.div_ceil(32));
        let (s_dims, c_dims) = ((rows, 0, cols, dp), (rows, 0, kp, dv));
        // Without returned weights or dropout, the softmax of one 32-row block runs between the
        // tile products of the other: block 0's during block 1's scores, block 1's during block
        // 0's combine. (Not with returned weights: their stores between the tile products, or a
        // pass of their own from the parts afterwards, cost more than the overlap saves.)
        let overlap = ctx.dropout.is_none() && !ctx.normalize && blocks > 1;
        let first = overlap.then_some(0..1); // None: every block
        let (raw, ld) = if ctx.normalize && item_bytes(ctx, rows) <= PREFETCH_WEIGHTS_UP_TO {
            // The returned weights' rows come into L2 during the scores ([`amx::Prefetch`]).
            let bytes = rows * tv * std::mem::size_of::<f32>();
            let mut rows_ahead = amx::Prefetch::new(weights.cast(), bytes);
            amx::scores(&tiles, scratch, amx_keys, s_dims, first, &mut rows_ahead)
        } else {
            amx::scores(&tiles, scratch, amx_keys, s_dims, first, &mut amx::NoWork)
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
        // scores product of this one ([`amx::SplitAhead`]).
        let last = if overlap { blocks - 1 } else { blocks };
        let groups = last * dv.div_ceil(32) * (kp / 32) * 6;
        let mut ahead = amx::SplitAhead::new(scratch, next_item_queries(ctx, item), groups);
        let (o, ldo) = if ctx.dropout.is_some() {
            // SAFETY: the scores scratch holds `⌈rows/32⌉·32` rows of `ld ≥ cols ≥ lens[r]`
            // floats; nothing else refers to it here, and the loop holds one row at a time.
            let row = |r: usize| std::slice::from_raw_parts_mut(raw.add(r * ld), lens[r]);
            for r in 0..rows {
                let (len, s) = (lens[r], row(r));
                scale_row(ctx, s);
                inv[r] =
                    finish_fast_row::<simd::Avx512>(ctx, item, r, s, None, stats.as_deref_mut());
                amx::split_weights(parts, r, s, kp);
                if ctx.normalize {
                    // The returned weights: this row of `scores` (`rows · Tv`, possibly
                    // uninitialised) is written in full here.
                    let w = weights.add(r * tv);
                    std::ptr::copy_nonoverlapping(s.as_ptr(), w, len);
                    std::ptr::write_bytes(w.add(len), 0, tv - len);
                }
            }
            amx::combine(&tiles, scratch, amx_keys, c_dims, None, &mut ahead)
        } else if overlap {
            let st = stats.as_deref_mut();
            let mut sm = RowSoftmax::new(ctx, item, bufs, 0..32, &mut inv, st, true);
            let rest = Some(1..blocks);
            amx::scores(&tiles, scratch, amx_keys, s_dims, rest, &mut sm);
            sm.finish();
            let mut sm = RowSoftmax::new(ctx, item, bufs, 32..rows, &mut inv, stats, true);
            amx::combine(&tiles, scratch, amx_keys, c_dims, Some(0..1), &mut sm);
            sm.finish();
            let rest = Some(1..blocks);
            amx::combine(&tiles, scratch, amx_keys, c_dims, rest, &mut ahead)
        } else {
            RowSoftmax::new(ctx, item, bufs, 0..rows, &mut inv, stats, false).finish();
            amx::combine(&tiles, scratch, amx_keys, c_dims, None, &mut ahead)
        };
        ahead.finish(scratch);
        // Each output row times its factor as it is copied out (one pass, in AVX-512), which
        // leaves finish_out_rows only the query mask.
        for (r, f) in inv[..rows].iter_mut().enumerate() {
            // SAFETY: the combine's O holds `rows` rows of `ldo ≥ dv` floats.
            let src = std::slice::from_raw_parts(o.add(r * ldo), dv);
            let dst = &mut out[r * dv..(r + 1) * dv];
            dst.iter_mut().zip(src).for_each(|(d, &x)| {
                d.write(x * *f);
            });
            *f = 1.0;
        }
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

/// Keys per chunk of an item on tiles with long keys ([`flash`]): 64 rows × 512 keys are
/// 128 KiB of scores and 192 KiB of weight parts. Measured against 1024 and 256, 2 threads,
/// chunks against one block per item: (2, 2048, 2048, 64) 5.41-5.78 against 6.21-6.66 ms with
/// 512 keys, 0.87-0.89 of one block's time with 1024 and 256; (8, 512, 512, 64) in two chunks of
/// 256 took 1.59-1.68 ms against 1.55.
pub(crate) const FLASH_KEYS: usize = 512;

/// Beyond this many keys an item on tiles runs its keys in chunks ([`flash`]); at 1024 keys two
/// chunks and one block took the same time ((4, 1024, 1024, 64): 2.70-2.78 against 2.67-2.87 ms).
pub(crate) const FLASH_MIN_TV: usize = 1024;

/// Whether a call on tiles runs each item's keys in chunks of [`FLASH_KEYS`] with an online
/// softmax (FlashAttention's): beyond [`FLASH_MIN_TV`] keys, when neither the weights are
/// returned (they need the whole row's sum before the first is written), nor dropout nor the
/// causal mask applies. Its scores and weight parts stay in L2 at any Tv, and its items keep
/// their rows where one-block items shrank to keep their scores in cache (streaming the keys and
/// values more often). Measured, 2 threads, chunks against one block: (2, 2048, 2048, 64) 5.41
/// against 6.21 ms, (2, 1024, 4096, 64) 6.37 against 8.17, (1, 1024, 16384, 64) 16.3 against
/// 23.7 (with 1024-key chunks), (1, 512, 65536, 64) 68.0 against 83.6.
pub(crate) fn flash(tv: usize, weights: bool, dropout: bool, causal: bool) -> bool {
    tv > FLASH_MIN_TV && !weights && !dropout && !causal
}

/// An item on tiles with long keys ([`flash`]): for each chunk of [`FLASH_KEYS`] keys, the scores
/// product, per row the scale, the value mask, the running max `m` and `e^(s - m)` split into the
/// weight parts, then the combine, added to the output row after scaling it by `e^(m_old - m)`
/// (as its sum is). Leaves each row's output factor ([`row_done`]) in `inv` for
/// [`finish_out_rows`], and its statistics in `stats`. The chunks depend on Tv alone, so results
/// are the same for any thread count.
///
/// # Safety
/// As [`block_amx`], with `tiles` configured, the item's queries split (`dp` wide) and `out`
/// zeroed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn amx_flash(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    keys: &KeyCache,
    (scratch, tiles, dp): (&mut amx::Scratch, &amx::Tiles, usize),
    out: &mut [f32],
    mut stats: Option<&mut [f32]>,
    inv: &mut [f32; MAX_ITEM_ROWS],
) {
    debug_assert!(!ctx.masks.causal && ctx.dropout.is_none() && !ctx.normalize);
    let Dims { tv, dv, .. } = ctx.dims;
    let rows = item.rows;
    let mut max = [f32::NEG_INFINITY; MAX_ITEM_ROWS];
    let mut sum = [0.0f32; MAX_ITEM_ROWS];
    let mut alpha = [0.0f32; MAX_ITEM_ROWS];
    let mut c0 = 0;
    while c0 < tv {
        let ck = FLASH_KEYS.min(tv - c0);
        let (raw, ld) = amx::scores(
            tiles,
            scratch,
            &keys.amx,
            (rows, c0, ck, dp),
            None,
            &mut amx::NoWork,
        );
        let (kp, parts) = amx::weight_parts(scratch, rows, ck);
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
        let mut chunk_max = rows::max_of_row::<simd::Avx512>(row(0));
        for r in 0..rows {
            prepare(r + 1);
            let next: &[f32] = if r + 1 < rows { row(r + 1) } else { &[] };
            // NaN anywhere reaches the sum and the output through its own e^(s - m).
            let m = max[r].max(chunk_max);
            alpha[r] = (max[r] - m).exp();
            let (e, next_max) = amx::exp_split(row(r), m, (parts, r, kp), None, next, None);
            (sum[r], max[r], chunk_max) = (sum[r] * alpha[r] + e, m, next_max);
        }
        let (o, ldo) = amx::combine(
            tiles,
            scratch,
            &keys.amx,
            (rows, c0, kp, dv),
            None,
            &mut amx::NoWork,
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

/// With the causal mask, each row's softmax and the combine only need the keys the row can see:
/// row i covers keys `..=i` (`lens[r]`), and the block the first `i0 + rows` (returned). Hidden
/// keys would get weight exactly 0, so skipping them changes no bit, except where Keras's
/// arithmetic still reads them: a row whose visible keys are all masked (its weights come from
/// all Tv scores minus 1e9) covers all Tv keys, and a batch element with a non-finite key or
/// value (NaN · 0 is NaN in Keras's products) skips nothing. Lengths depend on the row alone,
/// never on the block, so results stay the same for any split.
fn causal_lengths(
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

/// Concat scores for one item: the exponential form where it is safe, else tanh row by row.
///
/// # Safety
/// As [`block_simd`]: the `e^{2s·q}` table is `rows × D` (`lda = D`), the packed keys as there.
#[inline(always)]
unsafe fn concat_scores<S: simd::Simd, const NVS: usize>(
    ctx: &Ctx<'_, '_, f32>,
    item: Item,
    keys: &KeyCache,
    cols: usize,
    scores: &mut [f32],
    mr: usize,
) {
    let Dims { tv, d, .. } = ctx.dims;
    let Item { b, i0, rows } = item;
    let p = ctx.params;
    let two_s = 2.0 * p.scale.unwrap_or(1.0);
    let q = ctx.query.slice(ndarray::s![b, i0..i0 + rows, ..]);
    // The block's queries, row by row (ndarray's element iterator over a 2-D slice cost 4% of
    // a concat call), then the bound on a contiguous slice.
    let mut eq: Vec<f32> = Vec::with_capacity(rows * d);
    for r in q.rows() {
        eq.extend_from_slice(r.to_slice().expect("query rows are contiguous"));
    }
    let q_ok = eq.iter().all(|&x| (two_s * x).abs() <= CONCAT_EXP_LIMIT);
    if !(q_ok && keys.concat_ok) {
        let k = ctx.key.index_axis(Axis(0), b);
        for (r, qr) in eq.chunks_exact(d).enumerate() {
            score_row(&p, qr, k, &mut scores[r * tv..(r + 1) * tv]);
        }
        return;
    }
    exp_scaled_simd::<S>(&mut eq, two_s);
    let nr = fwd_panel_width(ctx.isa);
    let g = gemm::Gemm {
        m: rows,
        n: cols,
        k: d,
        a: eq.as_ptr(),
        lda: d,
        b: keys.packed.as_ptr(),
        b_row: nr,
        b_panel: d * nr,
        c: scores.as_mut_ptr(),
        ldc: tv,
    };
    let op = gemm::Concat {
        weight: p.concat_score_weight,
        d: d as f32,
    };
    gemm::gemm::<S, _, NVS>(&g, op, mr);
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Calls run on tiles from 24 MFLOP and 32 rows per item, and with returned weights up to
    /// 2048 keys, unless tiles were asked for; items of fewer rows (long keys, or few query rows
    /// per thread) stay on AVX-512, and items on tiles are a whole number of 32-row blocks.
    #[test]
    fn tiles_need_the_work_and_32_row_items() {
        let auto = amx_gate(Some(Isa::Avx512)); // the automatic gate, whatever LUONG_ISA says
        let forced = amx_gate(Some(Isa::Amx));
        let dims = |batch, tq, tv| Dims {
            batch,
            tq,
            tv,
            d: 64,
            dv: 64,
        };
        let rows = |d: Dims| crate::attention::item_rows::<f32>(d, 2, false);
        // Items whose keys run in chunks: 4 per thread, not shrunk by Tv.
        let chunked = |d: Dims| crate::attention::item_rows::<f32>(d, 2, true);
        assert_eq!(
            (rows(dims(1, 512, 65536)), chunked(dims(1, 512, 65536))),
            (16, 64)
        );
        assert_eq!(
            (rows(dims(1, 256, 4096)), chunked(dims(1, 256, 4096))),
            (16, 32)
        );
        for (d, weights, auto_tiles) in [
            (dims(8, 512, 512), false, true),
            (dims(8, 512, 512), true, true),
            (dims(2, 2048, 2048), true, true),
            (dims(1, 2048, 8192), false, true),
            (dims(1, 1024, 4096), true, false), // returned weights beyond 2048 keys
            (dims(1, 512, 65536), false, false), // 16-row items (the 4 MiB scores block)
            (dims(1, 256, 1024), false, false), // 16 rows per item for 2 threads
            (dims(1, 64, 64), false, false),    // 1 MFLOP
            (dims(1, 768, 768), false, true),   // 48 rows per item, taken as 32
            (dims(1, 1024, 20000), false, true), // 52 rows (4 MiB of scores), taken as 32
        ] {
            let (isa, r) = tiles_or_not(Isa::Amx, auto, ScoreMode::Dot, d, rows(d), weights);
            assert_eq!(
                isa == Isa::Amx,
                auto_tiles,
                "{d:?}, weights {weights}: {r} rows"
            );
            if isa == Isa::Amx {
                assert!(r >= 32 && r % 32 == 0, "{d:?}: {r} rows on tiles");
            } else {
                assert_eq!((isa, r), (Isa::Avx512, rows(d)), "{d:?}");
            }
            let forced_dot = tiles_or_not(Isa::Amx, forced, ScoreMode::Dot, d, rows(d), weights);
            assert_eq!(forced_dot.0, Isa::Amx, "{d:?}");
            let concat = tiles_or_not(Isa::Amx, forced, ScoreMode::Concat, d, rows(d), weights);
            assert_eq!(concat, (Isa::Avx512, rows(d)));
            let other = tiles_or_not(Isa::Avx2, forced, ScoreMode::Dot, d, rows(d), weights);
            assert_eq!(other, (Isa::Avx2, rows(d)));
        }
    }

    /// A thread keeps its tile buffers for its next call only up to 64 MiB each: a call with
    /// very long keys does not leave hundreds of MiB behind.
    #[test]
    fn tile_buffers_are_kept_only_up_to_64_mib() {
        let (kept, big) = (1usize << 20, 70usize << 20);
        for (bytes, keep) in [(kept, true), (big, false)] {
            // Scratch of about `bytes` (weight parts: 6 B per score).
            let cols = bytes / (64 * 6);
            AMX_SCRATCH.with_borrow_mut(|s| {
                *s = amx::Scratch::default();
                let _ = amx::weight_parts(s, 64, cols);
                assert!(s.bytes() >= bytes * 9 / 10, "{} vs {bytes}", s.bytes());
            });
            drop(KeyCache::recycled());
            let left = AMX_SCRATCH.with_borrow(|s| s.bytes());
            assert_eq!(left > 0, keep, "{bytes} bytes of scratch: {left} kept");
        }
        if !is_x86_feature_detected!("avx512f") {
            return; // the packer needs AVX-512F; the scratch half above ran anyway
        }
        for (tv, keep) in [(1000usize, true), (400_000, false)] {
            let d = 32;
            let x = vec![0.5f32; tv * d];
            let mut cache = KeyCache::recycled();
            // SAFETY: AVX-512F was detected; `x` holds `tv` rows of `d` floats.
            assert!(unsafe { cache.amx.pack(x.as_ptr(), d, x.as_ptr(), d, (tv, d, d)) });
            let bytes = cache.amx.bytes();
            drop(cache);
            let left = AMX_PACKED.with(|c| c.take()).bytes();
            assert_eq!(
                left == bytes,
                keep,
                "{bytes} bytes of packed keys: {left} kept"
            );
        }
    }
}

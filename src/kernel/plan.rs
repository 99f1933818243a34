//! Every threshold and gate of the fast paths in one place: whether a call runs on one thread,
//! how many query rows each work item takes, whether it runs on AMX tiles, and whether the
//! tiles take its keys in chunks. The measurements behind each number are in
//! docs/performance.md ("Where the thresholds come from").

use crate::config::ScoreMode;
use crate::cpu::Isa;
use crate::shape::Dims;

/// Below this many floating-point operations a call runs on the calling thread: handing work to
/// the pool costs a few microseconds, more than the whole computation.
pub(crate) const SERIAL_FLOPS: usize = 1 << 20;

/// The most bytes of scores one work item keeps (its `rows × Tv` block): L2-resident up to
/// Tv = 4096 at 64 rows; beyond, a block that spills to L3 costs less than the extra passes over
/// the keys and values that fewer rows per item would need.
pub(crate) const SCRATCH_BYTES: usize = 4 << 20;

/// The most query rows of one work item.
pub(crate) const MAX_ITEM_ROWS: usize = 64;

/// Keys per chunk of the fused item's combine: 128 value rows of 64 floats are 32 KiB, inside L1
/// on recent Intel cores (48 KiB) and all of it on AMD Zen 3 and 4 (32 KiB).
pub(crate) const COMBINE_KEYS: usize = 128;

/// Below this many query rows the dot scores read key rows in place instead of packing Kᵀ: the
/// packing pass costs as much as the product when each key meets only a few queries.
pub(crate) const PACK_MIN_TQ: usize = 8;

/// A concat score uses `e^{2s·q}·e^{2s·k}` only when every `|2s·q|` and `|2s·k|` is at most this,
/// so the product stays within `[e^-80, e^80]`, far inside f32's range.
pub(crate) const CONCAT_EXP_LIMIT: f32 = 40.0;

/// [`Isa::Amx`] runs a call on tiles only from this much work (4·B·Tq·Tv·D): a core's tile unit
/// takes microseconds to warm up after a pause, which smaller calls do not recover.
pub(crate) const AMX_MIN_FLOP: usize = 24_000_000;

/// [`Isa::Amx`] runs a call on tiles only when its work items have at least this many query rows:
/// the tile products work in blocks of 32 rows, so an item of 16 rows pays for 32.
pub(crate) const AMX_MIN_ROWS: usize = 32;

/// With returned weights, [`Isa::Amx`] runs a call on tiles only up to this many keys: such an
/// item also writes its weights out and keeps them in f32 and in three bf16 parts, and with
/// longer rows the tiles lost to AVX-512.
pub(crate) const AMX_WEIGHTS_MAX_TV: usize = 2048;

/// Keys per chunk of an item on tiles with long keys ([`flash`]): 64 rows × 512 keys are
/// 128 KiB of scores and 192 KiB of weight parts, in L2.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the AMX item only
pub(crate) const FLASH_KEYS: usize = 512;

/// Beyond this many keys an item on tiles runs its keys in chunks ([`flash`]); at 1024 keys two
/// chunks and one block took the same time.
pub(crate) const FLASH_MIN_TV: usize = 1024;

/// How a call runs: the family, the query rows per work item, and whether its keys run in chunks
/// on tiles ([`flash`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) isa: Isa,
    pub(crate) rows: usize,
    pub(crate) flash: bool,
}

/// What routing a call needs to know about it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call {
    /// The ISA the call may use (`Attention::effective_isa`).
    pub(crate) isa: Isa,
    /// The ISA asked for by the builder, if any (`None`: the automatic choice).
    pub(crate) requested: Option<Isa>,
    pub(crate) mode: ScoreMode,
    pub(crate) dims: Dims,
    pub(crate) weights: bool,
    pub(crate) dropout: bool,
    pub(crate) causal: bool,
    pub(crate) threads: usize,
}

/// The route of a call computing in `T`: long keys on tiles run in chunks ([`flash`]), their
/// items not shrunk by Tv (float32 only: the tiles and the chunks are the f32 fast path's).
pub(crate) fn route<T: 'static>(c: Call) -> Route {
    let f32 = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
    let chunks = f32 && flash(c.dims.tv, c.weights, c.dropout, c.causal);
    let (isa, rows) = tiles_or_not(
        c.isa,
        amx_gate(c.requested),
        c.mode,
        c.dims,
        item_rows::<T>(c.dims, c.threads, chunks),
        c.weights,
    );
    let flash = chunks && isa == Isa::Amx;
    let rows = match chunks && !flash {
        true => item_rows::<T>(c.dims, c.threads, false), // not on tiles after all
        false => rows,
    };
    Route { isa, rows, flash }
}

/// The threads a call of `dims` runs on, out of a pool of `pool_threads`: one below
/// [`SERIAL_FLOPS`].
pub(crate) fn call_threads(dims: Dims, pool_threads: usize) -> usize {
    let flops = (dims.batch * dims.tq)
        .saturating_mul(dims.tv)
        .saturating_mul(2 * (dims.d + dims.dv) + 8);
    match flops >= SERIAL_FLOPS {
        true => pool_threads,
        false => 1,
    }
}

/// Query rows per work item: enough items for load balance (8 per thread), at most
/// [`MAX_ITEM_ROWS`], and a scores block of at most [`SCRATCH_BYTES`]. Items whose keys run in
/// chunks ([`flash`]) need no cap, and 4 per thread are enough: each item streams all the keys
/// and values, so fewer, larger items stream them less often.
pub(crate) fn item_rows<T>(dims: Dims, threads: usize, chunked: bool) -> usize {
    let per_thread = if chunked { 4 } else { 8 };
    let rows = (dims.batch * dims.tq)
        .div_ceil(per_thread * threads)
        .clamp(1, MAX_ITEM_ROWS);
    match chunked {
        false => rows.min((SCRATCH_BYTES / std::mem::size_of::<T>() / dims.tv.max(1)).max(1)),
        true => rows,
    }
}

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

/// Whether a call on tiles runs each item's keys in chunks of [`FLASH_KEYS`] with an online
/// softmax (FlashAttention's): beyond [`FLASH_MIN_TV`] keys, when neither the weights are
/// returned (they need the whole row's sum before the first is written), nor dropout nor the
/// causal mask applies. Its scores and weight parts stay in L2 at any Tv, and its items keep
/// their rows where one-block items shrank to keep their scores in cache (streaming the keys and
/// values more often).
pub(crate) fn flash(tv: usize, weights: bool, dropout: bool, causal: bool) -> bool {
    tv > FLASH_MIN_TV && !weights && !dropout && !causal
}

#[cfg(test)]
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
        let rows = |d: Dims| item_rows::<f32>(d, 2, false);
        // Items whose keys run in chunks: 4 per thread, not shrunk by Tv.
        let chunked = |d: Dims| item_rows::<f32>(d, 2, true);
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
}

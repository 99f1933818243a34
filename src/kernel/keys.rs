//! What a thread prepares once per batch element for the fused item ([`KeyCache`]): Kᵀ packed in
//! panels, the concat mode's `e^{2s·k}` panels, the keys and values in AMX tile layout, and
//! buffers recycled across calls.

use ndarray::Axis;

use super::item::Ctx;
use super::plan::{COMBINE_KEYS, CONCAT_EXP_LIMIT, PACK_MIN_TQ};
use super::simd::Simd;
use super::{gemm, softmax};
use crate::config::ScoreMode;
use crate::shape::Dims;
#[cfg(target_arch = "x86_64")]
use {super::amx, crate::cpu::Isa};

/// What the f32 fast path prepares once per batch element, per thread: Kᵀ packed in panels
/// (dot, Tq ≥ PACK_MIN_TQ) or `e^{2s·k}` panels (concat), and two flags. Each thread keeps the
/// batch element it last prepared, so a thread working through its contiguous share of the
/// items packs each batch element's keys once, and no call waits on a separate packing pass
/// (which cost a pool hand-off and a barrier per call). A thread that steals an item of another
/// batch element packs that element again: the same bits, a little more work.
#[derive(Default)]
pub(crate) struct KeyCache {
    /// The batch element the buffer holds, if any.
    b: Option<usize>,
    pub(crate) packed: Vec<f32>,
    /// Whether `packed` holds panels (false: the dot scores read key rows in place).
    pub(crate) has_panels: bool,
    /// The values in the combine's chunked panels (`gemm::pack_value_chunks`), when
    /// `value_panels`.
    pub(crate) values: Vec<f32>,
    pub(crate) value_panels: bool,
    /// Concat: whether the keys allow the exponential form.
    pub(crate) concat_ok: bool,
    /// Causal: whether keys and values are all finite (`causal_lengths`).
    pub(crate) finite: bool,
    /// [`Isa::Amx`]: keys and values in tile layout, when `amx_ready` (the dot mode with
    /// packed keys, and every key and value split exactly); else the AVX-512 path runs.
    #[cfg(target_arch = "x86_64")]
    pub(crate) amx: amx::Packed,
    pub(crate) amx_ready: bool,
}

impl KeyCache {
    /// A cache whose buffer is this thread's buffer from its previous call: fresh pages for
    /// every call cost more in page faults than packing itself.
    pub(crate) fn recycled() -> Self {
        KeyCache {
            packed: PACKED.with(|c| c.take()),
            values: VALUES.with(|c| c.take()),
            #[cfg(target_arch = "x86_64")]
            amx: AMX_PACKED.with(|c| c.take()),
            ..KeyCache::default()
        }
    }

    /// Prepares batch element `b` for family `S` with panels of `NV` vectors, unless this cache
    /// holds it already; with `PACK_VALUES` (and Tq ≥ PACK_MIN_TQ) the values too, in the
    /// combine's chunks and panels of `NV` vectors.
    ///
    /// # Safety
    /// `S`'s instructions must be available (the caller is a family's target-feature
    /// trampoline).
    #[inline(always)]
    pub(crate) unsafe fn prepare<S: Simd, const NV: usize, const PACK_VALUES: bool>(
        &mut self,
        ctx: &Ctx<'_, '_, f32>,
        b: usize,
    ) {
        if self.b == Some(b) {
            return;
        }
        let Dims { tq, tv, d, .. } = ctx.dims;
        let params = ctx.params;
        let key = ctx.key.index_axis(Axis(0), b);
        self.finite =
            ctx.masks.causal && all_finite(key) && all_finite(ctx.value.index_axis(Axis(0), b));
        self.b = Some(b);
        (self.amx_ready, self.value_panels) = (false, false);
        #[cfg(target_arch = "x86_64")]
        {
            // `tiles_or_not` left Isa::Amx only for calls that run on tiles.
            if ctx.isa == Isa::Amx && params.mode == ScoreMode::Dot && tq >= PACK_MIN_TQ {
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
        let nr = NV * S::LANES;
        if PACK_VALUES && tq >= PACK_MIN_TQ {
            let value = ctx.value.index_axis(Axis(0), b);
            gemm::pack_value_chunks(value, COMBINE_KEYS, nr, &mut self.values);
            self.value_panels = true;
        }
        let per_batch = tv.div_ceil(nr) * d * nr;
        let two_s = 2.0 * params.scale.unwrap_or(1.0);
        (self.has_panels, self.concat_ok) = match params.mode {
            ScoreMode::Dot if tq >= PACK_MIN_TQ => {
                // Every element is written below.
                self.packed.resize(per_batch, 0.0);
                // SAFETY: `S`'s instructions are available (this fn's contract); `nr` is
                // `NV · LANES` and `packed` holds `Tv.div_ceil(nr) · D · nr` floats.
                unsafe { gemm::pack::<S>(key, nr, &mut self.packed) };
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
                    // SAFETY: as for the dot panels above; the exp pass needs only `S`.
                    unsafe {
                        gemm::pack::<S>(key, nr, &mut self.packed);
                        softmax::exp_scaled_simd::<S>(&mut self.packed, two_s);
                    }
                }
                (ok, ok)
            }
        };
    }
}

impl Drop for KeyCache {
    /// Keeps the buffers for this thread's next call (up to 64 MiB each).
    fn drop(&mut self) {
        for (buffer, cell) in [(&mut self.packed, &PACKED), (&mut self.values, &VALUES)] {
            let v = std::mem::take(buffer);
            if v.capacity() > 0 && v.capacity() <= (64 << 20) / 4 {
                cell.with(|c| c.set(v));
            }
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
            amx::trim_scratch(KEEP);
        }
    }
}

thread_local! {
    /// The last call's packed keys on this thread (see [`KeyCache::recycled`]).
    static PACKED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// The last call's packed values on this thread.
    static VALUES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The last call's keys and values in tile layout on this thread.
    static AMX_PACKED: std::cell::Cell<amx::Packed> = std::cell::Cell::default();
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

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernel::amx::SCRATCH;

    /// A thread keeps its tile buffers for its next call only up to 64 MiB each: a call with
    /// very long keys does not leave hundreds of MiB behind.
    #[test]
    fn tile_buffers_are_kept_only_up_to_64_mib() {
        let (kept, big) = (1usize << 20, 70usize << 20);
        for (bytes, keep) in [(kept, true), (big, false)] {
            // Scratch of about `bytes` (weight parts: 6 B per score).
            let cols = bytes / (64 * 6);
            SCRATCH.with_borrow_mut(|s| {
                *s = amx::Scratch::default();
                let _ = amx::weight_parts(s, 64, cols);
                assert!(s.bytes() >= bytes * 9 / 10, "{} vs {bytes}", s.bytes());
            });
            drop(KeyCache::recycled());
            let left = SCRATCH.with_borrow(|s| s.bytes());
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

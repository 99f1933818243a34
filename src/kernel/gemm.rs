//! Register-tiled products for the two matrix steps, without packing the left operand:
//! `C (m × n) = op(A (m × k) · B (k × n))`.
//!
//! - scores: A = query rows, B = Kᵀ packed in panels of NR keys (`pack_panels`), op = dot × scale
//!   (or the concat form, see [`Concat`]);
//! - combine: A = weights rows, B = value rows read in place (each row contiguous), op = dot.
//!
//! A tile is R rows × NV vectors; its accumulators stay in registers for the whole k loop, B's
//! vectors are loaded once per k and reused by all R rows, A's entries are broadcast from
//! memory. Every C element is one sequential chain over k, so its bits never depend on the tile
//! it falls in: results are the same for any block split or thread count.

use ndarray::ArrayView2;

use super::simd::Simd;

/// What a tile accumulates per k, and how it finishes.
pub(crate) trait Op<S: Simd>: Copy {
    /// How many B rows ahead the tile prefetches (0: none), for B streamed from memory.
    const PREFETCH: usize = 0;
    unsafe fn step(&self, acc: S::V, a: S::V, b: S::V) -> S::V;
    unsafe fn finish(&self, acc: S::V) -> S::V;
    /// Sees the finished vectors of C's row `row` (of the whole product) as the tile stores
    /// them; `valid` masks the lanes inside C when the panel is partial. Default: nothing.
    #[inline(always)]
    unsafe fn see_row<const NV: usize>(
        &self,
        row: usize,
        xs: &[S::V; NV],
        valid: Option<&[S::M; NV]>,
    ) {
        let _ = (row, xs, valid);
    }
}

/// `Σ_k a·b`, then `× scale` (Keras multiplies the finished dot product by the scale).
#[derive(Clone, Copy)]
pub(crate) struct Dot {
    pub scale: Option<f32>,
}

impl<S: Simd> Op<S> for Dot {
    #[inline(always)]
    unsafe fn step(&self, acc: S::V, a: S::V, b: S::V) -> S::V {
        // SAFETY: `S`'s instructions are available (the `Op` methods run inside the kernels'
        // target-feature code).
        unsafe { S::fma(a, b, acc) }
    }
    #[inline(always)]
    unsafe fn finish(&self, acc: S::V) -> S::V {
        // SAFETY: `S`'s instructions are available (the `Op` methods run inside the kernels'
        // target-feature code).
        unsafe {
            match self.scale {
                Some(s) => S::mul(acc, S::splat(s)),
                None => acc,
            }
        }
    }
}

/// [`Dot`] that also keeps, for each row i of C, a vector of running maxima at
/// `max + i·LANES` (lane-wise over the row's columns; the caller starts them at -inf and takes
/// the horizontal max at the end). The softmax then starts from the row max instead of reading
/// the scores once more to find it.
#[derive(Clone, Copy)]
pub(crate) struct DotMax {
    pub dot: Dot,
    pub max: *mut f32,
}

impl<S: Simd> Op<S> for DotMax {
    #[inline(always)]
    unsafe fn step(&self, acc: S::V, a: S::V, b: S::V) -> S::V {
        // SAFETY: `S`'s instructions are available (the `Op` methods run inside the kernels'
        // target-feature code).
        unsafe { <Dot as Op<S>>::step(&self.dot, acc, a, b) }
    }
    #[inline(always)]
    unsafe fn finish(&self, acc: S::V) -> S::V {
        // SAFETY: `S`'s instructions are available (the `Op` methods run inside the kernels'
        // target-feature code).
        unsafe { <Dot as Op<S>>::finish(&self.dot, acc) }
    }
    #[inline(always)]
    unsafe fn see_row<const NV: usize>(
        &self,
        row: usize,
        xs: &[S::V; NV],
        valid: Option<&[S::M; NV]>,
    ) {
        // SAFETY: `S`'s instructions are available; `max` has a vector per row of C (`DotMax`'s
        // contract), so `row`'s is in bounds.
        unsafe {
            let p = self.max.add(row * S::LANES);
            let mut m = S::load(p);
            for (v, &x) in xs.iter().enumerate() {
                let x = match valid {
                    Some(masks) => S::select(masks[v], x, S::splat(f32::NEG_INFINITY)),
                    None => x,
                };
                m = S::max(m, x);
            }
            S::store(p, m);
        }
    }
}

/// [`Dot`] with B prefetched `PF` rows ahead: the decoding combine streams value rows from
/// memory once, with too few query rows for the loads to hide the latency.
#[derive(Clone, Copy)]
pub(crate) struct DotPrefetch<const PF: usize>;

impl<S: Simd, const PF: usize> Op<S> for DotPrefetch<PF> {
    const PREFETCH: usize = PF;
    #[inline(always)]
    unsafe fn step(&self, acc: S::V, a: S::V, b: S::V) -> S::V {
        // SAFETY: `S`'s instructions are available (the `Op` methods run inside the kernels'
        // target-feature code).
        unsafe { S::fma(a, b, acc) }
    }
    #[inline(always)]
    unsafe fn finish(&self, acc: S::V) -> S::V {
        acc
    }
}

/// Concat scores from exponentials: with `a = e^{2s·q_d}` and `b = e^{2s·k_d}`,
/// `tanh(s·(q_d + k_d)) = 1 - 2 / (1 + a·b)`, so `w · Σ_d tanh(...) = w · (D - 2 Σ_d 1/(1 + a·b))`.
/// One FMA and one reciprocal per term instead of a tanh. Callers guarantee `|2s·q|, |2s·k| ≤ 40`
/// so `a·b` stays well inside f32's range (else they use the plain tanh path).
#[derive(Clone, Copy)]
pub(crate) struct Concat {
    pub weight: f32,
    pub d: f32,
}

impl<S: Simd> Op<S> for Concat {
    #[inline(always)]
    unsafe fn step(&self, acc: S::V, a: S::V, b: S::V) -> S::V {
        // SAFETY: `S`'s instructions are available (the `Op` methods run inside the kernels'
        // target-feature code).
        unsafe { S::add(acc, S::recip(S::fma(a, b, S::splat(1.0)))) }
    }
    #[inline(always)]
    unsafe fn finish(&self, acc: S::V) -> S::V {
        // SAFETY: `S`'s instructions are available (the `Op` methods run inside the kernels'
        // target-feature code).
        unsafe {
            let sum_tanh = S::fma(acc, S::splat(-2.0), S::splat(self.d));
            S::mul(S::splat(self.weight), sum_tanh)
        }
    }
}

/// The operands of one product. Pointers are valid for the ranges the sizes describe.
#[derive(Clone, Copy)]
pub(crate) struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Row i of A starts at `a + i·lda`; its k entries are contiguous.
    pub a: *const f32,
    pub lda: usize,
    /// B(kk, j) for j in panel p is at `b + p·b_panel + kk·b_row + (j mod NR)`.
    pub b: *const f32,
    pub b_row: usize,
    pub b_panel: usize,
    /// C(i, j) is at `c + i·ldc + j`.
    pub c: *mut f32,
    pub ldc: usize,
}

/// Runs the product with tiles of `mr` rows (1..=14) and NV vectors per row.
///
/// # Safety
/// The ISA of `S` must be available; `g`'s pointers must cover the described ranges (B may be
/// read past column n only inside zero-padded panels, which full-width loads need; partial
/// panels of a row-major B are read with masked loads).
#[inline(always)]
pub(crate) unsafe fn gemm<S: Simd, O: Op<S>, const NV: usize>(g: &Gemm, op: O, mr: usize) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe { gemm_with::<S, O, NV, false, false>(g, op, mr) }
}

/// [`gemm`] with two variations the backward needs: with `TA`, A is read transposed (`A(i, kk)`
/// at `a + kk·lda + i`, so `Pᵀ · dO` reads the weights block as stored); with `ACC`, the tile
/// adds into C (`C = op(C + A·B)`; callers pass an `op` whose `finish` is the identity).
///
/// # Safety
/// As [`gemm`]; with `TA`, A has `k` readable rows of `m` floats at stride `lda`; with `ACC`, C's
/// `m × n` entries are initialised.
#[inline(always)]
pub(crate) unsafe fn gemm_with<
    S: Simd,
    O: Op<S>,
    const NV: usize,
    const TA: bool,
    const ACC: bool,
>(
    g: &Gemm,
    op: O,
    mr: usize,
) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let nr = NV * S::LANES;
        for p in 0..g.n.div_ceil(nr) {
            let cols = (g.n - p * nr).min(nr);
            let b = g.b.add(p * g.b_panel);
            let mut i = 0;
            while i < g.m {
                let rows = (g.m - i).min(mr);
                let a = if TA { g.a.add(i) } else { g.a.add(i * g.lda) };
                let c = g.c.add(i * g.ldc + p * nr);
                let t = Tile {
                    row0: i,
                    a,
                    lda: g.lda,
                    b,
                    b_row: g.b_row,
                    k: g.k,
                    c,
                    ldc: g.ldc,
                    cols,
                };
                match rows {
                    1 => tile::<S, O, 1, NV, TA, ACC>(&t, op),
                    2 => tile::<S, O, 2, NV, TA, ACC>(&t, op),
                    3 => tile::<S, O, 3, NV, TA, ACC>(&t, op),
                    4 => tile::<S, O, 4, NV, TA, ACC>(&t, op),
                    5 => tile::<S, O, 5, NV, TA, ACC>(&t, op),
                    6 => tile::<S, O, 6, NV, TA, ACC>(&t, op),
                    7 => tile::<S, O, 7, NV, TA, ACC>(&t, op),
                    8 => tile::<S, O, 8, NV, TA, ACC>(&t, op),
                    9 => tile::<S, O, 9, NV, TA, ACC>(&t, op),
                    10 => tile::<S, O, 10, NV, TA, ACC>(&t, op),
                    11 => tile::<S, O, 11, NV, TA, ACC>(&t, op),
                    12 => tile::<S, O, 12, NV, TA, ACC>(&t, op),
                    13 => tile::<S, O, 13, NV, TA, ACC>(&t, op),
                    _ => tile::<S, O, 14, NV, TA, ACC>(&t, op),
                }
                i += rows;
            }
        }
    }
}

struct Tile {
    /// The tile's first row in C (for [`Op::see_row`]).
    row0: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    b_row: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
}

/// One `R × NV·LANES` tile of C.
///
/// # Safety
/// As [`gemm`]: rows `0..R` of A have `k` readable floats, B has `k` readable rows of at least
/// `cols` floats (whole panels when `cols == NV·LANES`), C has `R` writable rows of `cols`.
#[inline(always)]
unsafe fn tile<
    S: Simd,
    O: Op<S>,
    const R: usize,
    const NV: usize,
    const TA: bool,
    const ACC: bool,
>(
    t: &Tile,
    op: O,
) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let l = S::LANES;
        let mut acc = [[S::zero(); NV]; R];
        // Row pointers once, so each broadcast is a plain base + index load.
        // (`wrapping_add`: with TA these are never read, and need not point inside A.)
        let ap: [*const f32; R] = std::array::from_fn(|r| t.a.wrapping_add(r * t.lda));
        if t.cols == NV * l {
            if ACC {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = S::load(t.c.add(r * t.ldc + v * l));
                    }
                }
            }
            for kk in 0..t.k {
                let bp = t.b.add(kk * t.b_row);
                if O::PREFETCH > 0 {
                    S::prefetch(bp.wrapping_add(O::PREFETCH * t.b_row));
                }
                let bv: [S::V; NV] = std::array::from_fn(|v| S::load(bp.add(v * l)));
                let at = t.a.wrapping_add(kk * t.lda); // read only with TA
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = S::splat(if TA { *at.add(r) } else { *ap[r].add(kk) });
                    for (x, &b) in row.iter_mut().zip(&bv) {
                        *x = op.step(*x, av, b);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                let xs: [S::V; NV] = std::array::from_fn(|v| op.finish(row[v]));
                for (v, &x) in xs.iter().enumerate() {
                    S::store(t.c.add(r * t.ldc + v * l), x);
                }
                op.see_row(t.row0 + r, &xs, None);
            }
        } else {
            let masks: [S::M; NV] = std::array::from_fn(|v| S::mask(t.cols.saturating_sub(v * l)));
            if ACC {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = S::load_masked(t.c.add(r * t.ldc + v * l), masks[v]);
                    }
                }
            }
            for kk in 0..t.k {
                let bp = t.b.add(kk * t.b_row);
                if O::PREFETCH > 0 {
                    S::prefetch(bp.wrapping_add(O::PREFETCH * t.b_row));
                }
                let bv: [S::V; NV] =
                    std::array::from_fn(|v| S::load_masked(bp.add(v * l), masks[v]));
                let at = t.a.wrapping_add(kk * t.lda); // read only with TA
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = S::splat(if TA { *at.add(r) } else { *ap[r].add(kk) });
                    for (x, &b) in row.iter_mut().zip(&bv) {
                        *x = op.step(*x, av, b);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                let xs: [S::V; NV] = std::array::from_fn(|v| op.finish(row[v]));
                for (v, &x) in xs.iter().enumerate() {
                    S::store_masked(t.c.add(r * t.ldc + v * l), masks[v], x);
                }
                op.see_row(t.row0 + r, &xs, Some(&masks));
            }
        }
    }
}

/// Packs the transpose of `key` (`(Tv, D)`, contiguous rows) into panels of `nr` columns as
/// [`pack_panels`] does, with gathers on ISA `S` when the row stride allows them.
///
/// # Safety
/// `S`'s instructions must be available; `nr` is a multiple of `S::LANES`; `out` has
/// `Tv.div_ceil(nr) · D · nr` elements.
#[inline(always)]
pub(crate) unsafe fn pack<S: Simd>(key: ArrayView2<'_, f32>, nr: usize, out: &mut [f32]) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let (tv, d) = key.dim();
        let ld = key.stride_of(ndarray::Axis(0));
        match usize::try_from(ld) {
            Ok(ld)
                if ld.saturating_mul(S::LANES) < 1 << 31
                    && key.stride_of(ndarray::Axis(1)) == 1 =>
            {
                pack_panels_simd::<S>(key.as_ptr(), ld, tv, d, nr, out)
            }
            _ => pack_panels(key, nr, out),
        }
    }
}

/// [`pack_panels`] on ISA `S` (`nr` a multiple of `S::LANES`): each `LANES` keys of a panel are
/// `S::transpose_rows` of their rows; past Tv the lanes are 0, which is the padding.
///
/// # Safety
/// `S`'s instructions must be available; `key` has `tv` rows of `d` readable floats at stride
/// `ld`, with `(LANES - 1) · ld < 2^31`; `out` has `tv.div_ceil(nr) · d · nr` elements.
#[inline(always)]
pub(crate) unsafe fn pack_panels_simd<S: Simd>(
    key: *const f32,
    ld: usize,
    tv: usize,
    d: usize,
    nr: usize,
    out: &mut [f32],
) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let l = S::LANES;
        debug_assert!(nr.is_multiple_of(l) && out.len() == tv.div_ceil(nr) * d * nr);
        for (p, panel) in out.chunks_exact_mut(d * nr).enumerate() {
            for v in 0..nr / l {
                let j0 = p * nr + v * l;
                let rows = tv.saturating_sub(j0).min(l);
                let src = key.wrapping_add(j0 * ld); // read only in its first `rows` rows
                S::transpose_rows(src, ld, rows, d, panel.as_mut_ptr().add(v * l), nr);
            }
        }
    }
}

/// Packs `value` (`(Tv, Dv)`) for the fused combine: in chunks of `chunk` keys (the last one
/// shorter), each chunk as the panels of `nr` columns of its rows, panel p of a chunk of `kc`
/// keys being `[kc][nr]` (zero-padded past Dv) at `k0 · Dv' + p · kc · nr`, where k0 is the
/// chunk's first key and `Dv' = Dv.div_ceil(nr) · nr`. A combine tile then reads one contiguous
/// stream per panel instead of a strided one. `out` is resized to `Tv · Dv'`.
pub(crate) fn pack_value_chunks(
    value: ArrayView2<'_, f32>,
    chunk: usize,
    nr: usize,
    out: &mut Vec<f32>,
) {
    let (tv, dv) = value.dim();
    let dv_padded = dv.div_ceil(nr) * nr;
    out.resize(tv * dv_padded, 0.0);
    for k0 in (0..tv).step_by(chunk.max(1)) {
        let kc = chunk.min(tv - k0);
        let block = &mut out[k0 * dv_padded..(k0 + kc) * dv_padded];
        for (p, panel) in block.chunks_exact_mut(kc * nr).enumerate() {
            let (c0, w) = (p * nr, (dv - p * nr).min(nr));
            for (k, dst) in panel.chunks_exact_mut(nr).enumerate() {
                let row = value.row(k0 + k);
                for (j, x) in dst.iter_mut().enumerate() {
                    *x = if j < w { row[c0 + j] } else { 0.0 };
                }
            }
        }
    }
}

/// Packs the transpose of `key` (`(Tv, D)`) into panels of `nr` columns: panel p holds
/// `[D][nr]`, zero-padded past Tv. `out` has `Tv.div_ceil(nr) · D · nr` elements. The portable
/// form of [`pack`], which tests hold equal.
pub(crate) fn pack_panels(key: ArrayView2<'_, f32>, nr: usize, out: &mut [f32]) {
    let (tv, d) = key.dim();
    debug_assert_eq!(out.len(), tv.div_ceil(nr) * d * nr);
    for (p, panel) in out.chunks_exact_mut(d * nr).enumerate() {
        let keys = (tv - p * nr).min(nr);
        for j in 0..keys {
            let row = key.row(p * nr + j);
            for (x, &v) in row.iter().enumerate() {
                panel[x * nr + j] = v;
            }
        }
        if keys < nr {
            for x in 0..d {
                panel[x * nr + keys..(x + 1) * nr].fill(0.0);
            }
        }
    }
}

/// How many key rows ahead [`dot_rows`] prefetches.
const KEY_PREFETCH_ROWS: usize = 6;

/// `out[j] = (query · key_j) × scale` for key rows `key_j` (each `query.len()` contiguous floats,
/// row j at `key + j·ld`). Lane partial sums, then a fixed-order
/// horizontal sum.
///
/// # Safety
/// `S`'s instructions must be available; key rows `0..out.len()` at `key + j·ld` must each have
/// `query.len()` readable floats. The tail of each row is read with masked loads only.
#[inline(always)]
pub(crate) unsafe fn dot_rows<S: Simd>(
    query: &[f32],
    key: *const f32,
    ld: usize,
    out: &mut [f32],
    scale: Option<f32>,
) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let (l, d) = (S::LANES, query.len());
        let full = d - d % l;
        let m = S::mask(d - full);
        for (j, o) in out.iter_mut().enumerate() {
            let k = key.add(j * ld);
            // Key rows stream from memory once each (decoding: one query row per batch element);
            // asking for row j + 6 now hides the latency the few FMAs per row cannot (measured:
            // docs/performance.md, "Where the thresholds come from"). A prefetch past the end
            // does not fault.
            S::prefetch(key.wrapping_add((j + KEY_PREFETCH_ROWS) * ld));
            let mut acc = S::zero();
            let mut x = 0;
            while x < full {
                acc = S::fma(S::load(query.as_ptr().add(x)), S::load(k.add(x)), acc);
                x += l;
            }
            if full < d {
                acc = S::fma(
                    S::load_masked(query.as_ptr().add(full), m),
                    S::load_masked(k.add(full), m),
                    acc,
                );
            }
            let s = S::sum(acc);
            *o = scale.map_or(s, |c| s * c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::kernel::Isa;

    /// The SIMD packer equals the portable one on every ISA this CPU has: partial panels
    /// (Tv not a multiple of the panel or of the lanes), strided rows (a key view sliced out of
    /// wider rows), and a single key.
    #[test]
    fn simd_packing_equals_portable() {
        let wide = ndarray::Array2::from_shape_fn((77, 40), |(i, j)| (i * 40 + j) as f32 - 0.5);
        for (tv, d) in [(77usize, 40usize), (77, 33), (1, 7), (16, 16), (35, 1)] {
            let key = wide.slice(ndarray::s![..tv, ..d]);
            for nr in [16, 32, 64] {
                let len = tv.div_ceil(nr) * d * nr;
                let mut want = vec![f32::NAN; len];
                pack_panels(key, nr, &mut want);
                assert!(want.iter().all(|x| !x.is_nan()), "every element written");
                #[cfg(target_arch = "aarch64")]
                {
                    let mut got = vec![f32::NAN; len];
                    // SAFETY: NEON is part of the target; `got` has the panel length.
                    unsafe { pack::<crate::kernel::simd::Neon>(key, nr, &mut got) };
                    assert_eq!(got, want, "neon, Tv {tv}, D {d}, NR {nr}");
                }
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f")]
                    unsafe fn avx512(k: ArrayView2<'_, f32>, nr: usize, out: &mut [f32]) {
                        // SAFETY: AVX-512F was detected above; `out` has the size `pack` needs.
                        unsafe { pack::<crate::kernel::simd::Avx512>(k, nr, out) }
                    }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2(k: ArrayView2<'_, f32>, nr: usize, out: &mut [f32]) {
                        // SAFETY: AVX2 and FMA were detected above; `out` has the size `pack`
                        // needs.
                        unsafe { pack::<crate::kernel::simd::Avx2>(k, nr, out) }
                    }
                    let best = Isa::detect();
                    let mut got = vec![f32::NAN; len];
                    if matches!(best, Isa::Avx512 | Isa::Amx) {
                        // SAFETY: detected; nr is a multiple of 16; `got` has the panel length.
                        unsafe { avx512(key, nr, &mut got) };
                        assert_eq!(got, want, "avx512, Tv {tv}, D {d}, NR {nr}");
                    }
                    if best != Isa::Scalar {
                        got.fill(f32::NAN);
                        // SAFETY: AVX2 + FMA are present whenever the best ISA is not scalar.
                        unsafe { avx2(key, nr, &mut got) };
                        assert_eq!(got, want, "avx2, Tv {tv}, D {d}, NR {nr}");
                    }
                }
            }
        }
    }
}

//! The bf16 split: each f32 into three bf16 parts, written in the rows, A-tile and tile layouts
//! (queries, weights, and keys and values in [`Packed::pack`]). Everything that writes parts is
//! here, so the order of k within a block of 32 is decided in one file.

use std::arch::x86_64::*;

use super::buf::{mut_ptrs, Packed, Scratch};

/// Rounds to the nearest bf16 (ties away from zero) and returns the f32 whose top 16 bits it
/// is. (Below 2^127 in magnitude the carry cannot reach infinity.)
#[inline(always)]
unsafe fn round_bf16(x: __m512) -> __m512 {
    // SAFETY: register-only AVX-512F operations, and every caller runs with AVX-512F.
    unsafe {
        let r = _mm512_add_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(0x8000));
        _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(-65536)))
    }
}

/// The three parts of 16 floats, each an f32 whose low 16 bits are zero. The last needs no
/// rounding: `x - x0` is a multiple of x's ulp below half a bf16 ulp of x (16 bits), and taking
/// its nearest bf16 leaves at most 8 bits.
#[inline(always)]
unsafe fn split3(x: __m512) -> [__m512; 3] {
    // SAFETY: register-only AVX-512F operations, and every caller runs with AVX-512F.
    unsafe {
        let p0 = round_bf16(x);
        let r1 = _mm512_sub_ps(x, p0);
        let p1 = round_bf16(r1);
        [p0, p1, _mm512_sub_ps(r1, p1)]
    }
}

/// The lanes whose split is not exact: not finite, or `|x| ≥ 2^127`.
#[inline(always)]
unsafe fn inexact(x: __m512) -> __mmask16 {
    // SAFETY: register-only AVX-512F operations, and every caller runs with AVX-512F.
    unsafe {
        let abs = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fff_ffff));
        _mm512_cmpge_epu32_mask(abs, _mm512_set1_epi32(0x7f00_0000))
    }
}

/// VNNI pairs: lane n holds the top half of `even[n]` in its low half and the top half of
/// `odd[n]` in its high half.
#[inline(always)]
unsafe fn pair(even: __m512, odd: __m512) -> __m512i {
    // SAFETY: register-only AVX-512F operations, and every caller runs with AVX-512F.
    unsafe {
        // (even >> 16) | (odd & 0xffff0000): the truth table of A | (B & C) is 0xf8.
        _mm512_ternarylogic_epi32::<0xf8>(
            _mm512_srli_epi32::<16>(_mm512_castps_si512(even)),
            _mm512_castps_si512(odd),
            _mm512_set1_epi32(-65536),
        )
    }
}

/// Splits `len` floats at `src` into one row of the three parts at `dst[p]`, chunk `x / 32` of
/// 32 at `dst[p] + (x / 32) · cs` (32 in the rows layout, 512 in A tiles), zero-filling up to
/// `padded` (a multiple of 32). Within each block of 32, element `j` goes to position `2j` and
/// element `16 + j` to `2j + 1` ([`pair`] of the block's halves: no shuffles); the tile layout
/// orders k the same way ([`block_row`]), so the products sum the same terms.
///
/// Returns whether the split was exact ([`inexact`]).
///
/// # Safety
/// AVX-512F; `src` has `len` readable floats; each chunk `dst[p] + (x / 32) · cs` for
/// `x < padded` is 64-byte aligned with 32 writable elements.
#[inline(always)]
pub(super) unsafe fn split_row(
    src: *const f32,
    len: usize,
    padded: usize,
    dst: [*mut u16; 3],
    cs: usize,
) -> bool {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let (mut x, mut bad) = (0, 0);
        while x < padded {
            let v = load32(src, x, len, 0.0);
            bad |= inexact(v[0]) | inexact(v[1]);
            store_parts::<false>(dst.map(|p| p.add(x / 32 * cs)), v);
            x += 32;
        }
        bad == 0
    }
}

/// The two k (of `32 ks ..`) that row `r` of a tile pairs, in the order [`split_row`] gives.
#[inline(always)]
fn block_row(ks: usize, r: usize) -> (usize, usize) {
    (ks * 32 + r, ks * 32 + 16 + r)
}

/// Query rows `q0 + r · ld` (`rows × d`) into the rows layout of `s.q`, `d` padded to a multiple
/// of 32; returns that padded width, or None when a query does not split exactly.
///
/// # Safety
/// AVX-512F; the rows are readable for `d` floats each.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn split_queries(
    s: &mut Scratch,
    q0: *const f32,
    ld: usize,
    rows: usize,
    d: usize,
) -> Option<usize> {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let dp = d.next_multiple_of(32);
        for b in &mut s.q {
            b.reserve(rows.next_multiple_of(32) * dp);
        }
        let dst = mut_ptrs(&mut s.q);
        let mut exact = true;
        for r in 0..rows {
            exact &= split_row(q0.add(r * ld), d, dp, dst.map(|p| p.add(r * dp)), 32);
        }
        exact.then_some(dp)
    }
}

impl Packed {
    /// Packs Kᵀ from key rows `key + j · ld` (`tv × d`) and V from value rows `value + j · ldv`
    /// (`tv × dv`). Returns whether every key and value split exactly ([`inexact`]).
    ///
    /// # Safety
    /// AVX-512F; the rows are readable for `d` (keys) and `dv` (values) floats each.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn pack(
        &mut self,
        key: *const f32,
        ld: usize,
        value: *const f32,
        ldv: usize,
        (tv, d, dv): (usize, usize, usize),
    ) -> bool {
        // SAFETY: within this function's `# Safety` contract, which the caller upholds.
        unsafe {
            let mut bad = 0;
            // Kᵀ: element (k, n) = key[n][k]; tile row r of (nt, ks) pairs the two dims of
            // `block_row(ks, r)` of keys 16 nt .. 16 nt + 16, gathered down the key rows.
            let (k_kt, k_nt) = (d.div_ceil(32), tv.div_ceil(32) * 2);
            for b in &mut self.k {
                b.reserve(k_nt * k_kt * 512);
            }
            let dst = mut_ptrs(&mut self.k);
            for nt in 0..k_nt {
                let n = tv.saturating_sub(nt * 16).min(16);
                let base = key.add((nt * 16).min(tv) * ld);
                for ks in 0..k_kt {
                    // Dims ks·32 .. ks·32 + 16 (even) and the next 16 (odd), each 16 keys × 16
                    // dims transposed into one vector per dim.
                    let [even, odd] =
                        [0, 16].map(|h| transposed_columns(base, ld, n, ks * 32 + h, d));
                    for r in 0..16 {
                        let (even, odd) = (even[r], odd[r]);
                        bad |= inexact(even) | inexact(odd);
                        let (even, odd) = (split3(even), split3(odd));
                        let at = (nt * k_kt + ks) * 512 + r * 32;
                        for p in 0..3 {
                            _mm512_store_si512(dst[p].add(at).cast(), pair(even[p], odd[p]));
                        }
                    }
                }
            }
            // V: element (k, n) = value[k][n]; tile row r pairs the value rows of `block_row(ks,
            // r)`.
            let (v_kt, v_nt) = (tv.div_ceil(32), dv.div_ceil(32) * 2);
            for b in &mut self.v {
                b.reserve(v_nt * v_kt * 512);
            }
            let dst = mut_ptrs(&mut self.v);
            for ks in 0..v_kt {
                for r in 0..16 {
                    for nt in 0..v_nt {
                        let n = dv.saturating_sub(nt * 16).min(16);
                        let m: __mmask16 = ((1u32 << n) - 1) as u16;
                        let col = (nt * 16).min(dv);
                        let (k0, k1) = block_row(ks, r);
                        let even = load_row(value, ldv, m, (k0, col), tv);
                        let odd = load_row(value, ldv, m, (k1, col), tv);
                        bad |= inexact(even) | inexact(odd);
                        let (even, odd) = (split3(even), split3(odd));
                        let at = (nt * v_kt + ks) * 512 + r * 32;
                        for p in 0..3 {
                            _mm512_store_si512(dst[p].add(at).cast(), pair(even[p], odd[p]));
                        }
                    }
                }
            }
            (self.k_kt, self.v_kt) = (k_kt, v_kt);
            bad == 0
        }
    }
}

/// Columns `c0 .. c0 + 16` of the `n ≤ 16` rows at `base + i · ld` as 16 vectors, vector `j`
/// holding column `c0 + j` of every row (zero past row `n` and column `d`): 16 masked loads and
/// a 16 × 16 transpose in 64 shuffles, which took the place of 32 gathers per 32 columns.
///
/// # Safety
/// AVX-512F; each of the `n` rows has `d` readable floats.
#[inline(always)]
unsafe fn transposed_columns(
    base: *const f32,
    ld: usize,
    n: usize,
    c0: usize,
    d: usize,
) -> [__m512; 16] {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let m: __mmask16 = ((1u32 << d.saturating_sub(c0).min(16)) - 1) as u16;
        let at = c0.min(d);
        let r: [__m512; 16] = std::array::from_fn(|i| {
            if i < n && m != 0 {
                _mm512_maskz_loadu_ps(m, base.add(i * ld + at))
            } else {
                _mm512_setzero_ps()
            }
        });
        // Rows interleaved in pairs, then in fours: u[4g + c] holds columns c, c + 4, c + 8 and
        // c + 12 (its four 128-bit lanes) of rows 4g .. 4g + 4.
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (g, c) = (i / 4, i % 4);
            let a = _mm512_castps_pd(t[4 * g + c / 2]);
            let b = _mm512_castps_pd(t[4 * g + 2 + c / 2]);
            _mm512_castpd_ps(if c % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        // Then the lanes: column c + 4L is lane L of u[c], u[4 + c], u[8 + c] and u[12 + c].
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let v1 = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
            let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(v0, w0);
            out[c + 8] = _mm512_shuffle_f32x4::<0xdd>(v0, w0);
            out[c + 4] = _mm512_shuffle_f32x4::<0x88>(v1, w1);
            out[c + 12] = _mm512_shuffle_f32x4::<0xdd>(v1, w1);
        }
        out
    }
}

/// Columns `col ..` (where `m` is set) of row `k` of `rows` (`ld` floats apart); zero when
/// `k ≥ n_rows`.
///
/// # Safety
/// AVX-512F; for `k < n_rows`, the selected columns of row `k` are readable.
#[inline(always)]
unsafe fn load_row(
    rows: *const f32,
    ld: usize,
    m: __mmask16,
    (k, col): (usize, usize),
    n_rows: usize,
) -> __m512 {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        if k < n_rows {
            _mm512_maskz_loadu_ps(m, rows.add(k * ld + col))
        } else {
            _mm512_setzero_ps()
        }
    }
}

/// Sizes the weight parts (A tiles) for `rows × cols` weights; returns their width (`cols` padded
/// to 32) and the three parts (for [`split_weights`] and [`exp_split`](super::exp::exp_split)).
pub(crate) fn weight_parts(s: &mut Scratch, rows: usize, cols: usize) -> (usize, [*mut u16; 3]) {
    let kp = cols.next_multiple_of(32);
    for b in &mut s.p {
        b.reserve(rows.next_multiple_of(32) * kp);
    }
    (kp, mut_ptrs(&mut s.p))
}

/// Splits row `r` of the weights (`w`, zero from its end to `kp`) into the weight parts.
///
/// # Safety
/// AVX-512F; `parts` and `kp` come from [`weight_parts`] for at least `r + 1` rows.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn split_weights(parts: [*mut u16; 3], r: usize, w: &[f32], kp: usize) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        // Weights are finite or NaN (a NaN row gives a NaN output row either way).
        split_row(w.as_ptr(), w.len(), kp, weight_row(parts, r, kp), 512);
    }
}

/// Where row `r` of the weight parts starts (A tiles, `kp / 32` along k): its chunk `x / 32` is
/// 512 elements further per chunk.
#[inline(always)]
pub(super) fn weight_row(parts: [*mut u16; 3], r: usize, kp: usize) -> [*mut u16; 3] {
    // SAFETY (of the pointer arithmetic): inside the parts sized by `weight_parts` for row r.
    parts.map(|p| p.wrapping_add((r / 16) * (kp / 32) * 512 + (r % 16) * 32))
}

/// 32 floats of `src` from `x` as two vectors, lanes at or past `len` set to `fill`.
///
/// # Safety
/// AVX-512F; `src` has `len` readable floats.
#[inline(always)]
pub(super) unsafe fn load32(src: *const f32, x: usize, len: usize, fill: f32) -> [__m512; 2] {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        if x + 32 <= len {
            return [
                _mm512_loadu_ps(src.add(x)),
                _mm512_loadu_ps(src.add(x + 16)),
            ];
        }
        let mask = |x: usize| -> __mmask16 { ((1u32 << len.saturating_sub(x).min(16)) - 1) as u16 };
        let f = _mm512_set1_ps(fill);
        [
            _mm512_mask_loadu_ps(f, mask(x), src.add(x.min(len))),
            _mm512_mask_loadu_ps(f, mask(x + 16), src.add((x + 16).min(len))),
        ]
    }
}

/// Splits 32 floats (two vectors) into the three parts at `dst[p]` (see [`split_row`]): rounded
/// ([`split3`]), or with `CUT` truncated ([`split3_cut`]).
///
/// # Safety
/// AVX-512F; each `dst[p]` is 64-byte aligned with 32 writable elements.
#[inline(always)]
pub(super) unsafe fn store_parts<const CUT: bool>(dst: [*mut u16; 3], v: [__m512; 2]) {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let split = |x| if CUT { split3_cut(x) } else { split3(x) };
        let (lo, hi) = (split(v[0]), split(v[1]));
        for p in 0..3 {
            _mm512_store_si512(dst[p].cast(), pair(lo[p], hi[p]));
        }
    }
}

/// The three parts of 16 floats by truncation: each holds the next 8 significant bits, so they sum
/// to x exactly (24 bits), in two operations fewer per vector than [`split3`]'s rounding. The first
/// part is x itself ([`pair`] keeps its top half). For the weights `e^(s - max)` in [0, 1] (the
/// values keep [`split3`]): the products the tiles leave out (part 1 · part 2 and smaller) stay
/// below 2^-24 of each term, against 2^-25 with rounded parts. With the unclamped exp
/// ([`exp_table`](crate::kernel::simd::exp_table)), calls take less time and their outputs barely
/// move (measured: docs/performance.md, "Where the thresholds come from").
#[inline(always)]
unsafe fn split3_cut(x: __m512) -> [__m512; 3] {
    // SAFETY: register-only AVX-512F operations, and every caller runs with AVX-512F.
    unsafe {
        let top = _mm512_set1_epi32(-65536);
        let p0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), top));
        let r1 = _mm512_sub_ps(x, p0);
        let p1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r1), top));
        [x, p1, _mm512_sub_ps(r1, p1)]
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A deterministic stream of floats over many binades (xorshift).
    pub(crate) struct Floats(pub(crate) u64);

    impl Floats {
        fn next_bits(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 32) as u32
        }
        /// Uniform in [-1, 1) times `scale`.
        pub(crate) fn uniform(&mut self, scale: f32) -> f32 {
            (self.next_bits() as f64 / 2f64.powi(31) - 1.0) as f32 * scale
        }
    }

    /// The parts of 16 floats, rounded ([`split3`]) or truncated ([`split3_cut`], its first part
    /// as the tiles see it), and the lanes [`inexact`] flags.
    #[target_feature(enable = "avx512f")]
    unsafe fn split16<const CUT: bool>(x: &[f32; 16]) -> ([[f32; 16]; 3], u16) {
        // SAFETY: AVX-512F is enabled on this function (the test checked for it); `x` is 16 floats.
        unsafe {
            let v = _mm512_loadu_ps(x.as_ptr());
            let mut out = [[0f32; 16]; 3];
            let mut parts = if CUT { split3_cut(v) } else { split3(v) };
            if CUT {
                // The first part is x itself: `pair` keeps its top half.
                let top =
                    _mm512_and_si512(_mm512_castps_si512(parts[0]), _mm512_set1_epi32(-65536));
                parts[0] = _mm512_castsi512_ps(top);
            }
            for (o, p) in out.iter_mut().zip(parts) {
                _mm512_storeu_ps(o.as_mut_ptr(), p);
            }
            (out, inexact(v))
        }
    }

    /// Every float the packers accept is the exact sum of its three parts, each a bf16 (low 16
    /// bits zero) within the bounds the module's error argument uses; the rest are flagged.
    #[test]
    fn three_parts_hold_each_float_exactly() {
        if !is_x86_feature_detected!("avx512f") {
            return; // no AVX-512F, no tiles: nothing here runs on this CPU
        }
        let mut rng = Floats(0x9e37_79b9_7f4a_7c15);
        let mut xs: Vec<f32> = (0..20_000)
            .map(|_| {
                // Any sign and mantissa, exponents 2^-100 .. 2^126.
                let bits = rng.next_bits();
                let exp = 27 + bits % 227; // biased exponent 27 ..= 253
                f32::from_bits((bits & 0x807f_ffff) | (exp << 23))
            })
            .collect();
        xs.extend([
            0.0,
            -0.0,
            1.0,
            -1.5,
            f32::from_bits(0x7eff_ffff),
            2f32.powi(-100),
        ]);
        xs.resize(xs.len().next_multiple_of(16), 1.0);
        for chunk in xs.chunks_exact(16) {
            let x: [f32; 16] = chunk.try_into().unwrap();
            // SAFETY: AVX-512F was detected above.
            let (rounded, bad) = unsafe { split16::<false>(&x) };
            assert_eq!(bad, 0, "{x:?}");
            // Truncated parts (the softmax's weights) are exact too, each at most twice as large.
            // SAFETY: as above.
            let (cut, _) = unsafe { split16::<true>(&x) };
            for (parts, bound) in [(rounded, 1.0), (cut, 2.0)] {
                for (l, &xl) in x.iter().enumerate() {
                    let p = [parts[0][l], parts[1][l], parts[2][l]];
                    assert!(p.iter().all(|v| v.to_bits() & 0xffff == 0), "{xl:e}: {p:?}");
                    let sum = p[0] as f64 + p[1] as f64 + p[2] as f64;
                    assert_eq!(sum, xl as f64, "{xl:e} = {p:?}");
                    let ax = (xl as f64).abs();
                    let (p1, p2) = ((p[1] as f64).abs(), (p[2] as f64).abs());
                    assert!(p1 <= bound * ax * 2f64.powi(-8), "{xl:e}: {p:?}");
                    assert!(p2 <= bound * bound * ax * 2f64.powi(-16), "{xl:e}: {p:?}");
                }
            }
        }
        let big = 2f32.powi(127);
        let odd = [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            big,
            -big,
            f32::MAX,
        ];
        let mut x = [1.0f32; 16];
        x[..odd.len()].copy_from_slice(&odd);
        // SAFETY: as above.
        let (_, bad) = unsafe { split16::<false>(&x) };
        assert_eq!(
            bad,
            (1 << odd.len()) - 1,
            "exactly the lanes that do not split"
        );
    }
}

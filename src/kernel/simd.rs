//! The vector operations the kernels are written in, for AVX-512 (16 lanes), AVX2 + FMA (8 lanes)
//! and NEON (4 lanes). Kernels are generic over [`Simd`] and instantiated inside
//! `#[target_feature]` functions (`kernel/mod.rs`; NEON is part of every aarch64 target, so its
//! family needs none), where these `#[inline(always)]` bodies inline and compile to the right
//! instructions.
//!
//! Safety: every method is `unsafe` because it uses instructions the CPU must support; callers
//! reach them only through functions selected after `is_x86_feature_detected!`. Pointer methods
//! additionally need the (unmasked) lanes they touch to be in bounds; masked loads and stores
//! never touch masked-off lanes (they do not fault there), which is what the tails rely on.

#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// One SIMD instruction set, as the kernels need it.
pub(crate) trait Simd: Copy {
    /// f32 lanes per vector.
    const LANES: usize;
    /// A vector of f32.
    type V: Copy;
    /// A lane mask for partial loads and stores.
    type M: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Lanes `0..n` on (n ≤ LANES).
    unsafe fn mask(n: usize) -> Self::M;
    unsafe fn load_masked(p: *const f32, m: Self::M) -> Self::V;
    unsafe fn store_masked(p: *mut f32, m: Self::M, v: Self::V);
    /// Lane i is `p[i · ld]` for the lanes of `m`, 0 elsewhere (a strided gather; the lanes of
    /// `m` must be readable and `(LANES - 1) · ld < 2^31`).
    unsafe fn gather(p: *const f32, ld: usize, m: Self::M) -> Self::V;
    /// Rows into columns: the `rows ≤ LANES` rows of `d` floats at `p + j·ld` become `d`
    /// vectors at `out + x·out_ld`, lane j of vector x being row j's column x (lanes of rows
    /// past `rows` are 0). The default gathers down the rows, one vector per column;
    /// `(LANES - 1) · ld < 2^31`.
    #[inline(always)]
    unsafe fn transpose_rows(
        p: *const f32,
        ld: usize,
        rows: usize,
        d: usize,
        out: *mut f32,
        out_ld: usize,
    ) {
        // SAFETY: the rows' lanes that the mask keeps are readable and `out`'s `d` vectors
        // writable (this method's contract, which the caller upholds).
        unsafe {
            let m = Self::mask(rows);
            for x in 0..d {
                Self::store(out.add(x * out_ld), Self::gather(p.wrapping_add(x), ld, m));
            }
        }
    }
    /// Hints the 256 bytes from `p` into L1 (no fault, whatever `p` is).
    #[inline(always)]
    unsafe fn prefetch(p: *const f32) {
        // SAFETY: a prefetch never faults, whatever the address.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let p = p as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(128));
        }
        // (No stable prefetch intrinsic elsewhere: a hint, so nothing.)
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }
    /// `a · b + c`, one rounding.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    /// Lanes of `m` from `a`, the others from `b`.
    unsafe fn select(m: Self::M, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise max that returns `b` when either is NaN (so `max(acc, x)` keeps a NaN `x`).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// Sum of the lanes, in a fixed order.
    unsafe fn sum(v: Self::V) -> f32;
    /// Max of the lanes.
    unsafe fn hmax(v: Self::V) -> f32;
    /// `e^x` within about 1 ulp for normal results up to x = 88 (every caller stays at or below
    /// 40), exactly 0 below the denormal range, NaN for NaN (see `exp` below for the method).
    unsafe fn exp(x: Self::V) -> Self::V;
    /// `1 / x` to about 1 ulp.
    unsafe fn recip(x: Self::V) -> Self::V;
}

// Cody–Waite reduction: e^x = 2^(n/m) · e^r with r = x - (n/m)·ln 2, ln 2 split in two so that
// (n/m)·C1 is exact.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;

/// Below this, `exp` returns 0: e^-86.5 = 2.7e-38 is the smallest result that stays a normal
/// float for every polynomial value (y ≥ 2^-0.5 times 2^-125). Zero instead of a denormal there
/// changes a weight by less than 3e-38.
pub(crate) const EXP_LO: f32 = -86.5;

/// `2^(k/16)` for k = 0..16, each rounded to f32.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const EXP2_SIXTEENTHS: [f32; 16] = [
    1.0,
    1.044_273_7,
    1.090_507_7,
    1.138_788_6,
    1.189_207_1,
    1.241_857_8,
    1.296_839_6,
    1.354_255_6,
    std::f32::consts::SQRT_2,
    1.476_826_2,
    1.542_210_8,
    1.610_490_3,
    1.681_792_9,
    1.756_252_2,
    1.834_008_1,
    1.915_206_6,
];

/// `2^(k/8)` for k = 0..8: every other sixteenth.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const EXP2_EIGHTHS: [f32; 8] = {
    let s = EXP2_SIXTEENTHS;
    [s[0], s[2], s[4], s[6], s[8], s[10], s[12], s[14]]
};

/// AVX-512's `e^x`: `2^(n/16) · e^r` with n = round(16 x log2 e) and `|r| ≤ ln 2 / 32`,
/// `2^(n/16)` as `2^⌊n/16⌋` (`vscalefps`) times a table entry picked by the low four bits of n
/// (`vpermps`), and `e^r` from a degree-4 polynomial: within 0.98 ulp on [-86.4, 88] (AVX2's
/// form is the same with eighths: `Avx2::exp`).
/// Below `EXP_LO` the result is written as 0 (scalef's zero mask) instead of letting scalef
/// underflow: an underflowing result costs a microcode assist of ~150 cycles per lane, and masked
/// scores (s - 1e9) would hit it on every entry. Those lanes are not clamped first: a masked-off
/// lane takes no assist, and its garbage (NaN for -inf) is dropped, which saves one operation in
/// ~22 per vector of the AMX softmax. NaN lanes keep NaN.
/// `CLAMP_HI` clamps x to at most 89 (above, scalef overflows to inf as e^x does; `min(c, x)`
/// returns x when x is NaN); without it x must stay below 2^17 (the rounding of n), which the
/// softmax's `s - max ≤ 0` does.
///
/// The AMX softmax takes less time per call with it than with the polynomial-only form (measured:
/// docs/performance.md, "Where the thresholds come from").
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp_table<const CLAMP_HI: bool>(x: __m512) -> __m512 {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let lo = _mm512_set1_ps(EXP_LO);
        // Lanes with x >= EXP_LO or NaN (not-less-than, unordered: true) keep the result; the
        // others' arithmetic runs on x as it is and is dropped by the zero-masked scalef.
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, lo);
        let mut xc = x;
        if CLAMP_HI {
            xc = _mm512_min_ps(_mm512_set1_ps(89.0), xc);
        }
        // 1.5 · 2^19: the sum rounds to a sixteenth, n/16 (the same n as rounding 16 x log2 e to
        // an integer, one multiply fewer: scalef takes n/16 as it is).
        let magic = _mm512_set1_ps(786_432.0);
        let t = _mm512_fmadd_ps(xc, _mm512_set1_ps(LOG2E), magic);
        let n16 = _mm512_sub_ps(t, magic);
        // (n/16)·C1 is exact (C1 has 9 significant bits, n at most 11).
        let r = _mm512_fnmadd_ps(n16, _mm512_set1_ps(C1), xc);
        let r = _mm512_fnmadd_ps(n16, _mm512_set1_ps(C2), r);
        // The low bits of t's pattern are n mod 16 (t is in the binade where the ulp is 1/16).
        let table = _mm512_loadu_ps(EXP2_SIXTEENTHS.as_ptr());
        let tab = _mm512_permutexvar_ps(_mm512_castps_si512(t), table);
        let mut p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0 / 24.0), _mm512_set1_ps(1.0 / 6.0));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
        let y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), tab, tab); // tab · e^r
        _mm512_maskz_scalef_ps(keep, y, n16)
    }
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx512 {
    const LANES: usize = 16;
    type V = __m512;
    type M = __mmask16;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: AVX-512F (the `Simd` contract).
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        // SAFETY: AVX-512F (the `Simd` contract).
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: AVX-512F, and the lanes touched are in bounds (the `Simd` contract).
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: AVX-512F, and the lanes touched are in bounds (the `Simd` contract).
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn mask(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as u16
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, m: __mmask16) -> __m512 {
        // SAFETY: AVX-512F, and the lanes touched are in bounds (the `Simd` contract).
        unsafe { _mm512_maskz_loadu_ps(m, p) }
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, m: __mmask16, v: __m512) {
        // SAFETY: AVX-512F, and the lanes touched are in bounds (the `Simd` contract).
        unsafe { _mm512_mask_storeu_ps(p, m, v) }
    }
    #[inline(always)]
    unsafe fn gather(p: *const f32, ld: usize, m: __mmask16) -> __m512 {
        // SAFETY: AVX-512F, and the lanes touched are in bounds (the `Simd` contract).
        unsafe {
            let idx = _mm512_mullo_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                _mm512_set1_epi32(ld as i32),
            );
            _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, idx, p)
        }
    }
    /// Rows 0..8 and 8..16 each through AVX2's loads and in-register 8 × 8 transposes, into the
    /// two halves of each column vector: 16-lane gathers are slow on AMD Zen 4 (perf put 5 % of
    /// the backward in them).
    #[inline(always)]
    unsafe fn transpose_rows(
        p: *const f32,
        ld: usize,
        rows: usize,
        d: usize,
        out: *mut f32,
        out_ld: usize,
    ) {
        // SAFETY: AVX-512F implies AVX2 and FMA; each half reads only its own rows (none when
        // `rows <= 8` for the second) and writes 8 lanes of each of the `d` output vectors.
        unsafe {
            Avx2::transpose_rows(p, ld, rows.min(8), d, out, out_ld);
            let rest = rows.saturating_sub(8);
            Avx2::transpose_rows(p.wrapping_add(8 * ld), ld, rest, d, out.add(8), out_ld);
        }
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: AVX-512F (the `Simd` contract).
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F (the `Simd` contract).
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F (the `Simd` contract).
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F (the `Simd` contract).
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn select(m: __mmask16, a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F (the `Simd` contract).
        unsafe { _mm512_mask_mov_ps(b, m, a) }
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F (the `Simd` contract).
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sum(v: __m512) -> f32 {
        // SAFETY: AVX-512F (the `Simd` contract).
        unsafe { _mm512_reduce_add_ps(v) }
    }
    #[inline(always)]
    unsafe fn hmax(v: __m512) -> f32 {
        // SAFETY: AVX-512F (the `Simd` contract).
        unsafe { _mm512_reduce_max_ps(v) }
    }
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        // SAFETY: AVX-512F (the `Simd` contract).
        unsafe { exp_table::<true>(x) }
    }
    #[inline(always)]
    unsafe fn recip(x: __m512) -> __m512 {
        // SAFETY: AVX-512F (the `Simd` contract).
        unsafe {
            // rcp14 (14 bits) and one Newton step, r' = r + r·(1 - x·r): about 1 ulp.
            let r = _mm512_rcp14_ps(x);
            _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.0)), r)
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
static MASK_WINDOW: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

/// The 8 × 8 transpose: vector x of the result holds lane x of each input, in order.
///
/// # Safety
/// AVX must be available.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: register-only AVX operations (this fn's contract).
    unsafe {
        // Pairs of rows interleaved, then 2 × 2 blocks, then the 128-bit halves; t[2i] and
        // t[2i + 1] hold rows 2i and 2i + 1, u[4h + c] columns c and c + 4 of rows 4h..4h + 4.
        let mut t = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm256_setzero_ps(); 8];
        for h in 0..2 {
            for c in 0..2 {
                let (a, b) = (t[4 * h + c], t[4 * h + c + 2]);
                u[4 * h + 2 * c] = _mm256_shuffle_ps::<0x44>(a, b);
                u[4 * h + 2 * c + 1] = _mm256_shuffle_ps::<0xEE>(a, b);
            }
        }
        let mut out = [_mm256_setzero_ps(); 8];
        for x in 0..4 {
            out[x] = _mm256_permute2f128_ps::<0x20>(u[x], u[x + 4]);
            out[x + 4] = _mm256_permute2f128_ps::<0x31>(u[x], u[x + 4]);
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
impl Simd for Avx2 {
    const LANES: usize = 8;
    type V = __m256;
    type M = __m256i;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: AVX2 and FMA, and the lanes touched are in bounds (the `Simd` contract).
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: AVX2 and FMA, and the lanes touched are in bounds (the `Simd` contract).
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn mask(n: usize) -> __m256i {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe {
            // Eight lanes of the window starting at 8 - n: n ones, then zeros.
            _mm256_loadu_si256(MASK_WINDOW.as_ptr().add(8 - n.min(8)) as *const __m256i)
        }
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, m: __m256i) -> __m256 {
        // SAFETY: AVX2 and FMA, and the lanes touched are in bounds (the `Simd` contract).
        unsafe { _mm256_maskload_ps(p, m) }
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, m: __m256i, v: __m256) {
        // SAFETY: AVX2 and FMA, and the lanes touched are in bounds (the `Simd` contract).
        unsafe { _mm256_maskstore_ps(p, m, v) }
    }
    #[inline(always)]
    unsafe fn gather(p: *const f32, ld: usize, m: __m256i) -> __m256 {
        // SAFETY: AVX2 and FMA, and the lanes touched are in bounds (the `Simd` contract).
        unsafe {
            let idx = _mm256_mullo_epi32(
                _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                _mm256_set1_epi32(ld as i32),
            );
            _mm256_mask_i32gather_ps::<4>(_mm256_setzero_ps(), p, idx, _mm256_castsi256_ps(m))
        }
    }
    /// Eight rows at a time, loaded whole and transposed in registers: AVX2 gathers cost about
    /// one element per cycle on AMD Zen 3.
    #[inline(always)]
    unsafe fn transpose_rows(
        p: *const f32,
        ld: usize,
        rows: usize,
        d: usize,
        out: *mut f32,
        out_ld: usize,
    ) {
        // SAFETY: AVX2 and FMA; each of the first `rows` rows is read only in its `d` columns
        // (masked loads past them) and `out` gets `d` vectors (this method's contract).
        unsafe {
            let mut x0 = 0;
            while x0 < d {
                let w = (d - x0).min(8);
                let m = Self::mask(w);
                // (Loops, not `array::from_fn`: a closure would not inherit the target features,
                // and its intrinsics would be calls.)
                let mut r = [_mm256_setzero_ps(); 8];
                for (j, x) in r.iter_mut().enumerate().take(rows) {
                    *x = if w == 8 {
                        _mm256_loadu_ps(p.add(j * ld + x0))
                    } else {
                        _mm256_maskload_ps(p.add(j * ld + x0), m)
                    };
                }
                let cols = transpose8(r);
                for (x, &c) in cols.iter().enumerate().take(w) {
                    _mm256_storeu_ps(out.add((x0 + x) * out_ld), c);
                }
                x0 += w;
            }
        }
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn select(m: __m256i, a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe { _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)) }
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sum(v: __m256) -> f32 {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    unsafe fn hmax(v: __m256) -> f32 {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe {
            // AVX-512's form (`exp_table`) with eighths: `2^(n/8) · e^r` with |r| ≤ ln 2 / 16,
            // `2^(n/8)` as a table entry picked by n mod 8 (vpermps reads the low three bits of
            // each index) times `2^⌊n/8⌋` built in an exponent field, and `e^r` from a degree-4
            // polynomial. The shortest chain found, which is what bounds it (the exp of a
            // softmax runs out of scheduler entries before it runs out of FMA pipes). The
            // multiply by `2^⌊n/8⌋` keeps NaN (the min below passes it on); `⌊n/8⌋ ≤ 127` holds
            // with x clamped to 88.67 (e^88.67 = 3.2e38 above it), and x below EXP_LO gives 0.
            let lo = _mm256_set1_ps(EXP_LO);
            let xc = _mm256_min_ps(_mm256_set1_ps(88.67), x);
            // 1.5 · 2^20: the sum rounds to an eighth, n/8 (in that binade the ulp is 1/8), and
            // the low bits of t's pattern hold n.
            let magic = _mm256_set1_ps(1_572_864.0);
            let t = _mm256_fmadd_ps(xc, _mm256_set1_ps(LOG2E), magic);
            let n8 = _mm256_sub_ps(t, magic);
            // (n/8)·C1 is exact (C1 has 9 significant bits, n at most 11).
            let r = _mm256_fnmadd_ps(n8, _mm256_set1_ps(C1), xc);
            let r = _mm256_fnmadd_ps(n8, _mm256_set1_ps(C2), r);
            let table = _mm256_loadu_ps(EXP2_EIGHTHS.as_ptr());
            let tab = _mm256_permutevar8x32_ps(table, _mm256_castps_si256(t));
            let mut p = _mm256_fmadd_ps(r, _mm256_set1_ps(1.0 / 24.0), _mm256_set1_ps(1.0 / 6.0));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
            let y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), tab, tab); // tab · e^r
                                                                    // ⌊n/8⌋ in the exponent field: n's bits shifted up by 20, the three below it cleared
                                                                    // (1.5·2^20's pattern shifts out), plus the bias.
            let high = _mm256_slli_epi32::<20>(_mm256_castps_si256(t));
            let k = _mm256_and_si256(high, _mm256_set1_epi32(0xff80_0000_u32 as i32));
            let pow = _mm256_castsi256_ps(_mm256_add_epi32(k, _mm256_set1_epi32(127 << 23)));
            _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, lo), _mm256_mul_ps(y, pow))
        }
    }
    #[inline(always)]
    unsafe fn recip(x: __m256) -> __m256 {
        // SAFETY: AVX2 and FMA (the `Simd` contract).
        unsafe { _mm256_div_ps(_mm256_set1_ps(1.0), x) }
    }
}

/// NEON (aarch64's baseline: 32 registers of 4 floats).
#[cfg(target_arch = "aarch64")]
#[derive(Clone, Copy)]
pub(crate) struct Neon;

#[cfg(target_arch = "aarch64")]
static NEON_MASK_WINDOW: [u32; 8] = [u32::MAX, u32::MAX, u32::MAX, u32::MAX, 0, 0, 0, 0];

#[cfg(target_arch = "aarch64")]
impl Neon {
    /// The lanes of `m` that are on (each lane of a mask is all ones or all zeros).
    #[inline(always)]
    unsafe fn lanes_on(m: uint32x4_t) -> [bool; 4] {
        let mut bits = [0u32; 4];
        // SAFETY: NEON (the `Simd` contract); `bits` holds four u32.
        unsafe { vst1q_u32(bits.as_mut_ptr(), m) };
        bits.map(|b| b != 0)
    }
}

#[cfg(target_arch = "aarch64")]
impl Simd for Neon {
    const LANES: usize = 4;
    type V = float32x4_t;
    type M = uint32x4_t;
    #[inline(always)]
    unsafe fn zero() -> float32x4_t {
        // SAFETY: NEON (the `Simd` contract).
        unsafe { vdupq_n_f32(0.0) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> float32x4_t {
        // SAFETY: NEON (the `Simd` contract).
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        // SAFETY: NEON, and the lanes touched are in bounds (the `Simd` contract).
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: float32x4_t) {
        // SAFETY: NEON, and the lanes touched are in bounds (the `Simd` contract).
        unsafe { vst1q_f32(p, v) }
    }
    #[inline(always)]
    unsafe fn mask(n: usize) -> uint32x4_t {
        // SAFETY: NEON; four lanes of the window starting at 4 - n: n ones, then zeros.
        unsafe { vld1q_u32(NEON_MASK_WINDOW.as_ptr().add(4 - n.min(4))) }
    }
    /// NEON has no masked load: the lanes on are read one by one (tails only).
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, m: uint32x4_t) -> float32x4_t {
        // SAFETY: NEON; only the lanes of `m`, which the `Simd` contract makes readable, are read.
        unsafe {
            let mut lanes = [0.0f32; 4];
            for (i, on) in Self::lanes_on(m).into_iter().enumerate() {
                if on {
                    lanes[i] = *p.add(i);
                }
            }
            vld1q_f32(lanes.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, m: uint32x4_t, v: float32x4_t) {
        // SAFETY: NEON; only the lanes of `m`, which the `Simd` contract makes writable, are
        // written.
        unsafe {
            let mut lanes = [0.0f32; 4];
            vst1q_f32(lanes.as_mut_ptr(), v);
            for (i, on) in Self::lanes_on(m).into_iter().enumerate() {
                if on {
                    *p.add(i) = lanes[i];
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn gather(p: *const f32, ld: usize, m: uint32x4_t) -> float32x4_t {
        // SAFETY: NEON; only the lanes of `m`, readable by the `Simd` contract, are read.
        unsafe {
            let mut lanes = [0.0f32; 4];
            for (i, on) in Self::lanes_on(m).into_iter().enumerate() {
                if on {
                    lanes[i] = *p.add(i * ld);
                }
            }
            vld1q_f32(lanes.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn fma(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        // SAFETY: NEON (the `Simd` contract).
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON (the `Simd` contract).
        unsafe { vmulq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON (the `Simd` contract).
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON (the `Simd` contract).
        unsafe { vsubq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn select(m: uint32x4_t, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON (the `Simd` contract).
        unsafe { vbslq_f32(m, a, b) }
    }
    /// x86's rule (`a > b ? a : b`): vmaxq_f32 would return NaN when `a` is NaN.
    #[inline(always)]
    unsafe fn max(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON (the `Simd` contract).
        unsafe { vbslq_f32(vcgtq_f32(a, b), a, b) }
    }
    #[inline(always)]
    unsafe fn sum(v: float32x4_t) -> f32 {
        // SAFETY: NEON (the `Simd` contract); faddp's fixed order, (v0 + v1) + (v2 + v3).
        unsafe { vaddvq_f32(v) }
    }
    #[inline(always)]
    unsafe fn hmax(v: float32x4_t) -> f32 {
        // SAFETY: NEON (the `Simd` contract).
        unsafe { vmaxvq_f32(v) }
    }
    #[inline(always)]
    unsafe fn exp(x: float32x4_t) -> float32x4_t {
        // SAFETY: NEON (the `Simd` contract).
        unsafe {
            // AVX2's form (`Avx2::exp`): `2^(n/8) · e^r`, the table entry for n mod 8 picked by
            // a byte lookup (tbl: lane bytes 4j..4j + 3 of the 32-byte table), `2^⌊n/8⌋` built
            // in an exponent field and multiplied in (which keeps NaN), 0 below EXP_LO.
            let xc = vminq_f32(vdupq_n_f32(88.67), x); // NaN stays NaN
            let magic = vdupq_n_f32(1_572_864.0); // 1.5 · 2^20: the sum rounds to n/8
            let t = vfmaq_f32(magic, xc, vdupq_n_f32(LOG2E));
            let n8 = vsubq_f32(t, magic);
            let r = vfmsq_f32(xc, n8, vdupq_n_f32(C1));
            let r = vfmsq_f32(r, n8, vdupq_n_f32(C2));
            let tb = vreinterpretq_u32_f32(t);
            let j4 = vandq_u32(vshlq_n_u32::<2>(tb), vdupq_n_u32(0x1c));
            let idx = vmlaq_u32(vdupq_n_u32(0x0302_0100), j4, vdupq_n_u32(0x0101_0101));
            let table = uint8x16x2_t(
                vld1q_u8(EXP2_EIGHTHS.as_ptr().cast::<u8>()),
                vld1q_u8(EXP2_EIGHTHS.as_ptr().add(4).cast::<u8>()),
            );
            let tab = vreinterpretq_f32_u8(vqtbl2q_u8(table, vreinterpretq_u8_u32(idx)));
            let mut p = vfmaq_f32(vdupq_n_f32(1.0 / 6.0), r, vdupq_n_f32(1.0 / 24.0));
            p = vfmaq_f32(vdupq_n_f32(0.5), p, r);
            p = vfmaq_f32(vdupq_n_f32(1.0), p, r);
            let y = vfmaq_f32(tab, vmulq_f32(p, r), tab); // tab · e^r
            let k = vandq_u32(vshlq_n_u32::<20>(tb), vdupq_n_u32(0xff80_0000));
            let pow = vreinterpretq_f32_u32(vaddq_u32(k, vdupq_n_u32(127 << 23)));
            let e = vmulq_f32(y, pow);
            let below = vcltq_f32(x, vdupq_n_f32(EXP_LO));
            vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(e), below))
        }
    }
    #[inline(always)]
    unsafe fn recip(x: float32x4_t) -> float32x4_t {
        // SAFETY: NEON (the `Simd` contract).
        unsafe { vdivq_f32(vdupq_n_f32(1.0), x) }
    }
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;

    /// Worst error of `S::exp` in ulps of the f64 result rounded to f32, over `n` points evenly
    /// spread on [-86.4, 88], and its results at special values.
    #[inline(always)]
    unsafe fn sweep<S: Simd>(n: usize) -> (f64, Vec<f32>) {
        // SAFETY: within this function's `# Safety` contract, which the caller upholds.
        unsafe {
            let l = S::LANES;
            let (lo, hi) = (-86.4f64, 88.0f64);
            let mut worst = 0.0f64;
            let (mut xs, mut ys) = ([0f32; 16], [0f32; 16]);
            for i in 0..n / l {
                for (j, x) in xs[..l].iter_mut().enumerate() {
                    *x = (lo + (hi - lo) * ((i * l + j) as f64 / n as f64)) as f32;
                }
                S::store(ys.as_mut_ptr(), S::exp(S::load(xs.as_ptr())));
                for j in 0..l {
                    let e = (xs[j] as f64).exp();
                    let ulp = f32::from_bits((e as f32).to_bits() + 1) as f64 - (e as f32) as f64;
                    worst = worst.max(((ys[j] as f64) - e).abs() / ulp);
                }
            }
            let special = [
                f32::NAN,
                f32::NEG_INFINITY,
                -1e9,
                -86.6,
                0.0,
                -0.0,
                1e-30,
                -40.0,
                f32::from_bits(0x7fc0_0001), // NaNs with payloads and a sign
                f32::from_bits(0xffc0_1234),
                88.5,
            ];
            let mut out = Vec::new();
            for c in special.chunks(l) {
                xs[..c.len()].copy_from_slice(c);
                S::store(ys.as_mut_ptr(), S::exp(S::load(xs.as_ptr())));
                out.extend_from_slice(&ys[..c.len()]);
            }
            (worst, out)
        }
    }

    fn check((worst, special): (f64, Vec<f32>), isa: &str) {
        assert!(worst <= 1.05, "{isa}: {worst} ulp");
        assert!(special[0].is_nan(), "{isa}: e^NaN = {}", special[0]);
        // e^-86.6 = 2.46e-38 is above f32's smallest normal but below EXP_LO: written as 0.
        assert_eq!(&special[1..6], &[0.0, 0.0, 0.0, 1.0, 1.0], "{isa}");
        assert_eq!(special[6], 1.0, "{isa}");
        assert!(
            special[8].is_nan() && special[9].is_nan(),
            "{isa}: {:?}",
            &special[8..10]
        );
        let e88 = 88.5f64.exp();
        assert!(
            ((special[10] as f64) - e88).abs() <= 2e-7 * e88,
            "{isa}: {}",
            special[10]
        );
        let e40 = (-40f64).exp();
        assert!(
            ((special[7] as f64) - e40).abs() <= 2e-7 * e40,
            "{isa}: {}",
            special[7]
        );
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn exp_within_its_ulp_bound_on_neon() {
        // SAFETY: NEON is part of the target.
        check(unsafe { sweep::<Neon>(2_000_000) }, "neon");
    }

    /// The masked loads and stores NEON emulates touch exactly the lanes of the mask.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_masks_touch_only_their_lanes() {
        for n in 0..=4 {
            let src = [1.0f32, 2.0, 3.0, 4.0];
            let mut dst = [-1.0f32; 4];
            // SAFETY: NEON; `src` and `dst` hold four floats.
            let got = unsafe {
                let m = Neon::mask(n);
                let v = Neon::load_masked(src.as_ptr(), m);
                Neon::store_masked(dst.as_mut_ptr(), m, v);
                let mut lanes = [0.0f32; 4];
                Neon::store(lanes.as_mut_ptr(), v);
                lanes
            };
            for i in 0..4 {
                let (want_load, want_store) = if i < n { (src[i], src[i]) } else { (0.0, -1.0) };
                assert_eq!((got[i], dst[i]), (want_load, want_store), "n {n}, lane {i}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_within_its_ulp_bound_on_each_isa() {
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            unsafe fn run() -> (f64, Vec<f32>) {
                // SAFETY: the ISA was detected above.
                unsafe { sweep::<Avx512>(2_000_000) }
            }
            // SAFETY: AVX-512F was detected.
            check(unsafe { run() }, "avx512");
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn run() -> (f64, Vec<f32>) {
                // SAFETY: the ISA was detected above.
                unsafe { sweep::<Avx2>(2_000_000) }
            }
            // SAFETY: AVX2 and FMA were detected.
            check(unsafe { run() }, "avx2");
        }
    }
}

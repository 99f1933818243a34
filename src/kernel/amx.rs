//! The f32 forward's two products on AMX tiles (`tdpbf16ps`), at float32 accuracy.
//!
//! A tile multiply takes bfloat16 operands (8 significant bits) and accumulates in f32. Each
//! f32 operand `x` is split into three bf16 parts, `x = x0 + x1 + x2` (each part the nearest
//! bf16 to what the earlier parts leave: exact for `2^-100 ≤ |x| < 2^127`, as 3 × 8 bits hold
//! f32's 24), and the six cross products `xi · yj` with `i + j ≤ 2` are accumulated: as
//! `|x1| ≤ 2^-9 |x|` and `|x2| ≤ 2^-18 |x|`, the three dropped ones sum to at most `2^-25 |x y|`. Measured on 64 × 512 × 64
//! and 64 × 64 × 512 products: the largest error is 7–9e-8 of `Σ |x y|`, against 1.8–2.2e-7
//! for a sequential f32 FMA chain. A tile multiply does 16 × 16 × 32 multiply-adds; with six per
//! product this core's AMX unit still runs the products at about twice its AVX-512 FMA rate.
//!
//! Layouts (bf16 as `u16`, every buffer 64-byte aligned: a tile row that straddles two cache
//! lines loads about 7× slower):
//! - **rows** (the left operand A: query rows, weight rows): part `p` is a row-major
//!   `rows × k` matrix, `k` padded with zeros to a multiple of 32;
//! - **tiles** (the right operand B, `k × n`: Kᵀ, V): part `p` is a sequence of 1 KiB tiles, tile
//!   `(nt, ks)` at `(nt · kt + ks) · 512` holding rows `32 ks .. 32 ks + 32` and columns
//!   `16 nt .. 16 nt + 16` in VNNI order: row `r` of the tile, `r · 32 + n · 2 + e`, pairs the
//!   k of `block_row(ks, r)` for column `n`. Rows past `k` and columns past `n` are zero.
//!
//! Within each block of 32 along k both layouts put element `j` at position `2j` and `16 + j` at
//! `2j + 1`, the order in which two vectors of 16 pack into one of 32 bf16 without a shuffle.
//!
//! Availability ([`available`]): the CPU has AMX-TILE and AMX-BF16, the OS enables their state
//! in XCR0, and Linux grants this process the tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM)`).
//! Callers use these kernels only for operands the split holds exactly ([`splits_exactly`]):
//! finite, below `2^127` (a larger value can round up to infinity), and the batch's products
//! then see the same infinities and NaNs an f32 product would not get from them.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Whether this process can run the tile kernels (checked once; asks Linux for the tile state).
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx() && os_grants_tiles())
}

fn cpu_has_amx() -> bool {
    if !is_x86_feature_detected!("avx512f") || !is_x86_feature_detected!("xsave") {
        return false;
    }
    // CPUID leaf 7 exists on every CPU with AVX-512F.
    let leaf7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS saves and restores tile state.
    // SAFETY: OSXSAVE is set whenever is_x86_feature_detected!("xsave") holds with OS support;
    // XGETBV with ECX = 0 reads XCR0.
    let xcr0 = unsafe { _xgetbv(0) };
    xcr0 >> 17 & 3 == 3
}

#[cfg(target_os = "linux")]
fn os_grants_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    const SYS_ARCH_PRCTL: i64 = 158;
    let ret: i64;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) only asks for permission; it reads and
    // writes no user memory. The syscall clobbers rcx and r11, declared here.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn os_grants_tiles() -> bool {
    false
}

/// Whether the three-part split of every element of `xs` is exact (see the module docs):
/// finite, and below `2^127` in magnitude. Branch-free over the slice so it vectorises.
pub(crate) fn splits_exactly(xs: &[f32]) -> bool {
    xs.iter().fold(0u32, |acc, x| {
        acc | ((x.to_bits() & 0x7fff_ffff >= 0x7f00_0000) as u32)
    }) == 0
}

/// A 64-byte aligned buffer of bf16 (as `u16`) that keeps its allocation between uses.
#[derive(Default)]
pub(crate) struct Buf {
    lines: Vec<Line>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

impl Buf {
    /// At least `len` elements, contents unspecified (the packers write all they use).
    fn reserve(&mut self, len: usize) {
        let lines = len.div_ceil(32);
        if self.lines.len() < lines {
            self.lines.resize(lines, Line([0; 32]));
        }
    }
    fn ptr(&self) -> *const u16 {
        self.lines.as_ptr().cast()
    }
    fn mut_ptr(&mut self) -> *mut u16 {
        self.lines.as_mut_ptr().cast()
    }
    /// The buffer as `len` f32 (the kernels' f32 scratch shares the alignment).
    fn f32_ptr(&mut self) -> *mut f32 {
        self.lines.as_mut_ptr().cast()
    }
}

/// Keys and values of one batch element in tile layout: `Kᵀ` (`D × Tv`) and `V` (`Tv × Dv`),
/// three parts each.
#[derive(Default)]
pub(crate) struct Packed {
    k: [Buf; 3],
    v: [Buf; 3],
    /// Tiles along `k` of Kᵀ (`⌈D / 32⌉`) and of V (`⌈Tv / 32⌉`).
    k_kt: usize,
    v_kt: usize,
}

/// Per-thread scratch of one work item: the query parts, the raw scores, the weight parts and
/// the output, at 64-byte alignment.
#[derive(Default)]
pub(crate) struct Scratch {
    q: [Buf; 3],
    scores: Buf,
    p: [Buf; 3],
    out: Buf,
}

/// Rounds to the nearest bf16 (ties away from zero) and returns the f32 whose top 16 bits it
/// is. (Below 2^127 in magnitude the carry cannot reach infinity.)
#[inline(always)]
unsafe fn round_bf16(x: __m512) -> __m512 {
    let r = _mm512_add_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(0x8000));
    _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(-65536)))
}

/// The three parts of 16 floats, each an f32 with its low 16 bits zero.
#[inline(always)]
unsafe fn split3(x: __m512) -> [__m512; 3] {
    let p0 = round_bf16(x);
    let r1 = _mm512_sub_ps(x, p0);
    let p1 = round_bf16(r1);
    let p2 = round_bf16(_mm512_sub_ps(r1, p1));
    [p0, p1, p2]
}

/// VNNI pairs: lane n holds `even[n]` in its low half and `odd[n]` in its high half.
#[inline(always)]
unsafe fn pair(even: __m512, odd: __m512) -> __m512i {
    _mm512_or_si512(
        _mm512_srli_epi32::<16>(_mm512_castps_si512(even)),
        _mm512_castps_si512(odd),
    )
}

/// Splits `len` floats at `src` into the three rows layout at `dst[p] + 0 ..`, zero-filling up to
/// `padded` (a multiple of 32). Within each block of 32, element `j` goes to position `2j` and
/// element `16 + j` to `2j + 1` ([`pair`] of the block's halves: no shuffles); the tile layout
/// orders k the same way ([`block_row`]), so the products sum the same terms.
///
/// # Safety
/// AVX-512F; `src` has `len` readable floats; each `dst[p]` is 64-byte aligned with `padded`
/// writable elements.
#[inline(always)]
unsafe fn split_row(src: *const f32, len: usize, padded: usize, dst: [*mut u16; 3]) {
    let mask = |x: usize| -> __mmask16 { ((1u32 << len.saturating_sub(x).min(16)) - 1) as u16 };
    let mut x = 0;
    while x < padded {
        let (lo, hi) = if x + 32 <= len {
            (_mm512_loadu_ps(src.add(x)), _mm512_loadu_ps(src.add(x + 16)))
        } else {
            (
                _mm512_maskz_loadu_ps(mask(x), src.add(x.min(len))),
                _mm512_maskz_loadu_ps(mask(x + 16), src.add((x + 16).min(len))),
            )
        };
        let (lo, hi) = (split3(lo), split3(hi));
        for p in 0..3 {
            _mm512_store_si512(dst[p].add(x).cast(), pair(lo[p], hi[p]));
        }
        x += 32;
    }
}

/// The two k (of `32 ks ..`) that row `r` of a tile pairs, in the order [`split_row`] gives.
#[inline(always)]
fn block_row(ks: usize, r: usize) -> (usize, usize) {
    (ks * 32 + r, ks * 32 + 16 + r)
}

/// Query rows `q0 + r · ld` (`rows × d`) into the rows layout of `s.q`, `d` padded to a multiple
/// of 32; returns that padded width.
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
) -> usize {
    let dp = d.next_multiple_of(32);
    for b in &mut s.q {
        b.reserve(rows.next_multiple_of(32) * dp);
    }
    let dst = [s.q[0].mut_ptr(), s.q[1].mut_ptr(), s.q[2].mut_ptr()];
    for r in 0..rows {
        let d_r = dst.map(|p| p.add(r * dp));
        split_row(q0.add(r * ld), d, dp, d_r);
    }
    dp
}

impl Packed {
    /// Packs Kᵀ from key rows `key + j · ld` (`tv × d`) and V from value rows `value + j · ldv`
    /// (`tv × dv`).
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
    ) {
        // Kᵀ: element (k, n) = key[n][k]; tile row r of (nt, ks) pairs the two dims of
        // `block_row(ks, r)` of keys 16 nt .. 16 nt + 16, gathered down the key rows.
        let (k_kt, k_nt) = (d.div_ceil(32), tv.div_ceil(32) * 2);
        for b in &mut self.k {
            b.reserve(k_nt * k_kt * 512);
        }
        let dst = [
            self.k[0].mut_ptr(),
            self.k[1].mut_ptr(),
            self.k[2].mut_ptr(),
        ];
        let lanes = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(ld as i32),
        );
        for nt in 0..k_nt {
            let n = tv.saturating_sub(nt * 16).min(16);
            let m: __mmask16 = ((1u32 << n) - 1) as u16;
            let base = key.add((nt * 16).min(tv) * ld);
            for ks in 0..k_kt {
                for r in 0..16 {
                    let (k0, k1) = block_row(ks, r);
                    let even = split3(gather_column(base, lanes, m, k0, d));
                    let odd = split3(gather_column(base, lanes, m, k1, d));
                    let at = (nt * k_kt + ks) * 512 + r * 32;
                    for p in 0..3 {
                        _mm512_store_si512(dst[p].add(at).cast(), pair(even[p], odd[p]));
                    }
                }
            }
        }
        // V: element (k, n) = value[k][n]; tile row r pairs the value rows of `block_row(ks, r)`.
        let (v_kt, v_nt) = (tv.div_ceil(32), dv.div_ceil(32) * 2);
        for b in &mut self.v {
            b.reserve(v_nt * v_kt * 512);
        }
        let dst = [
            self.v[0].mut_ptr(),
            self.v[1].mut_ptr(),
            self.v[2].mut_ptr(),
        ];
        for nt in 0..v_nt {
            let n = dv.saturating_sub(nt * 16).min(16);
            let m: __mmask16 = ((1u32 << n) - 1) as u16;
            let col = (nt * 16).min(dv);
            for ks in 0..v_kt {
                for r in 0..16 {
                    let (k0, k1) = block_row(ks, r);
                    let even = split3(load_row(value, ldv, m, (k0, col), tv));
                    let odd = split3(load_row(value, ldv, m, (k1, col), tv));
                    let at = (nt * v_kt + ks) * 512 + r * 32;
                    for p in 0..3 {
                        _mm512_store_si512(dst[p].add(at).cast(), pair(even[p], odd[p]));
                    }
                }
            }
        }
        (self.k_kt, self.v_kt) = (k_kt, v_kt);
    }
}

/// Column `k` of 16 rows at `base + lanes[n]` (lanes where `m` is set; zero elsewhere, and zero
/// throughout when `k ≥ d`).
///
/// # Safety
/// AVX-512F; for `k < d`, every selected row has `d` readable floats.
#[inline(always)]
unsafe fn gather_column(
    base: *const f32,
    lanes: __m512i,
    m: __mmask16,
    k: usize,
    d: usize,
) -> __m512 {
    if k < d {
        _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, lanes, base.add(k))
    } else {
        _mm512_setzero_ps()
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
    if k < n_rows {
        _mm512_maskz_loadu_ps(m, rows.add(k * ld + col))
    } else {
        _mm512_setzero_ps()
    }
}

/// The tile configuration: all eight tiles 16 rows × 64 bytes (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Tiles configured for the kernels on this thread until dropped (`tilerelease`, so the thread
/// does not carry tile state through context switches between items).
pub(crate) struct Tiles(());

impl Tiles {
    /// # Safety
    /// [`available`] returned true.
    pub(crate) unsafe fn configure() -> Tiles {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        cfg.colsb[..8].fill(64);
        cfg.rows[..8].fill(16);
        asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
        Tiles(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured (`configure`), so AMX is available.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// `C = Σ_{i+j≤2} A_i · B_j` over `kt` tiles of 32 along k: A in the rows layout (`lda`
/// elements per row, `32 · mb` rows), B in the tile layout (`b_kt` tiles along k per column
/// tile, `2 · nb` column tiles used), C row-major f32 (`ldc` floats per row, `32 · mb` rows ×
/// `32 · nb` columns). Blocks of 32 × 32 (four accumulator tiles); B's column block outside, so
/// its 3 · 2 · kt tiles are reused by every row block from L1.
///
/// # Safety
/// `_tiles` is configured; every pointer is 64-byte aligned and covers the extents above.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    _tiles: &Tiles,
    a: [*const u16; 3],
    lda: usize,
    b: [*const u16; 3],
    b_kt: usize,
    kt: usize,
    (mb, nb): (usize, usize),
    c: *mut f32,
    ldc: usize,
) {
    let (sa, sb, sc) = (lda * 2, 64usize, ldc * 4);
    for nj in 0..nb {
        for mi in 0..mb {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for ks in 0..kt {
                for (ai, a) in a.iter().enumerate() {
                    let pa = a.add(mi * 32 * lda + ks * 32);
                    asm!(
                        "tileloadd tmm4, [{pa} + {sa} * 1]",
                        "tileloadd tmm5, [{pa2} + {sa} * 1]",
                        pa = in(reg) pa,
                        pa2 = in(reg) pa.add(16 * lda),
                        sa = in(reg) sa,
                        options(nostack, readonly),
                    );
                    for b in &b[..3 - ai] {
                        let pb = b.add((2 * nj * b_kt + ks) * 512);
                        asm!(
                            "tileloadd tmm6, [{pb} + {sb} * 1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tileloadd tmm7, [{pb2} + {sb} * 1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            pb = in(reg) pb,
                            pb2 = in(reg) pb.add(b_kt * 512),
                            sb = in(reg) sb,
                            options(nostack, readonly),
                        );
                    }
                }
            }
            let pc = c.add(mi * 32 * ldc + nj * 32);
            asm!(
                "tilestored [{c0} + {sc} * 1], tmm0",
                "tilestored [{c1} + {sc} * 1], tmm1",
                "tilestored [{c2} + {sc} * 1], tmm2",
                "tilestored [{c3} + {sc} * 1], tmm3",
                c0 = in(reg) pc,
                c1 = in(reg) pc.add(16),
                c2 = in(reg) pc.add(16 * ldc),
                c3 = in(reg) pc.add(16 * ldc + 16),
                sc = in(reg) sc,
                options(nostack),
            );
        }
    }
}

/// Raw scores of one item: `S = Q Kᵀ` for `rows` query rows (split by [`split_queries`], `dp`
/// wide) against the first `cols` keys. Returns S (`ldc` floats per row, `ldc ≥ cols`).
///
/// # Safety
/// As [`product`]; `s.q` holds the split queries, `keys` a batch element with `⌈cols/32⌉ · 32`
/// keys or more.
pub(crate) unsafe fn scores(
    tiles: &Tiles,
    s: &mut Scratch,
    keys: &Packed,
    (rows, cols, dp): (usize, usize, usize),
) -> (*mut f32, usize) {
    let (mb, nb) = (rows.div_ceil(32), cols.div_ceil(32));
    let ldc = nb * 32;
    s.scores.reserve(mb * 32 * ldc * 2);
    let c = s.scores.f32_ptr();
    let a = [s.q[0].ptr(), s.q[1].ptr(), s.q[2].ptr()];
    let b = [keys.k[0].ptr(), keys.k[1].ptr(), keys.k[2].ptr()];
    product(tiles, a, dp, b, keys.k_kt, keys.k_kt, (mb, nb), c, ldc);
    (c, ldc)
}

/// Sizes the weight parts for `rows × cols` weights; returns their row width (`cols` padded to
/// 32) and the three parts (for [`split_weights`]).
pub(crate) fn weight_parts(s: &mut Scratch, rows: usize, cols: usize) -> (usize, [*mut u16; 3]) {
    let kp = cols.next_multiple_of(32);
    for b in &mut s.p {
        b.reserve(rows.next_multiple_of(32) * kp);
    }
    (kp, [s.p[0].mut_ptr(), s.p[1].mut_ptr(), s.p[2].mut_ptr()])
}

/// Splits row `r` of the weights (`w`, zero from its end to `kp`) into the weight parts.
///
/// # Safety
/// AVX-512F; `parts` and `kp` come from [`weight_parts`] for at least `r + 1` rows.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn split_weights(parts: [*mut u16; 3], r: usize, w: &[f32], kp: usize) {
    split_row(w.as_ptr(), w.len(), kp, parts.map(|p| p.add(r * kp)));
}

/// `O = P V` for `rows` weight rows (split, `kp` wide) and the value parts; returns O
/// (`ldc` floats per row, `ldc ≥ dv`).
///
/// # Safety
/// As [`product`]; the weight parts hold `rows` rows of width `kp`, and `values` a batch
/// element with at least `kp` rows of `dv` columns.
pub(crate) unsafe fn combine(
    tiles: &Tiles,
    s: &mut Scratch,
    values: &Packed,
    (rows, kp, dv): (usize, usize, usize),
) -> (*const f32, usize) {
    let (mb, nb) = (rows.div_ceil(32), dv.div_ceil(32));
    let ldc = nb * 32;
    s.out.reserve(mb * 32 * ldc * 2);
    let c = s.out.f32_ptr();
    let a = [s.p[0].ptr(), s.p[1].ptr(), s.p[2].ptr()];
    let b = [values.v[0].ptr(), values.v[1].ptr(), values.v[2].ptr()];
    product(tiles, a, kp, b, values.v_kt, kp / 32, (mb, nb), c, ldc);
    (c, ldc)
}

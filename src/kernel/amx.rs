//! The f32 forward's two products on AMX tiles (`tdpbf16ps`), at float32 accuracy.
//!
//! A tile multiply takes bfloat16 operands (8 significant bits) and accumulates in f32. Each
//! f32 operand `x` is split into three bf16 parts, `x = x0 + x1 + x2` (each part the nearest
//! bf16 to what the earlier parts leave: exact for `2^-100 ≤ |x| < 2^127`, as 3 × 8 bits hold
//! f32's 24), and the six cross products `xi · yj` with `i + j ≤ 2` are accumulated: as
//! `|x1| ≤ 2^-8 |x|` and `|x2| ≤ 2^-16 |x|`, the three dropped ones sum to at most about
//! `2^-23 |x y|`, and much less on average. Measured on 64 × 512 × 64
//! and 64 × 64 × 512 products: the largest error is 7–9e-8 of `Σ |x y|`, against 1.8–2.2e-7
//! for a sequential f32 FMA chain. A tile multiply does 16 × 16 × 32 multiply-adds; with six per
//! product this core's AMX unit still runs the products at about twice its AVX-512 FMA rate.
//!
//! Layouts (bf16 as `u16`, every buffer 64-byte aligned: a tile row that straddles two cache
//! lines loads about 7× slower):
//! - **rows** (the left operand A for the queries): part `p` is a row-major `rows × k` matrix,
//!   `k` padded with zeros to a multiple of 32;
//! - **A tiles** (the left operand for the weights, whose rows are long): the same elements in
//!   1 KiB tiles of 16 rows × 32, tile `(mt, ks)` at `(mt · kt + ks) · 512`, so a tile load
//!   reads 1 KiB in a row instead of 16 rows `2k` bytes apart (at Tv = 2048, 16 pages);
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
//! The packers report whether the split held every query, key and value exactly: finite and
//! below `2^127` (a larger value can round up to infinity, and infinity splits into NaN); when
//! not, the caller runs the AVX-512 path, so infinities and NaN in the inputs give what they
//! give there.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;

use super::simd::exp_table;

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
    fn bytes(&self) -> usize {
        self.lines.capacity() * 64
    }
    fn ptr(&self) -> *const u16 {
        self.lines.as_ptr().cast()
    }
    fn mut_ptr(&mut self) -> *mut u16 {
        self.lines.as_mut_ptr().cast()
    }
    /// The buffer as a row-major f32 matrix of `mb` blocks of 32 rows by `nb` blocks of 32
    /// columns (a product's C, sharing the alignment): its first element and row stride.
    fn f32_block(&mut self, mb: usize, nb: usize) -> (*mut f32, usize) {
        let ld = nb * 32;
        self.reserve(mb * 32 * ld * 2); // two bf16 elements per float
        (self.lines.as_mut_ptr().cast(), ld)
    }
}

/// The three parts' buffers, for reading.
fn ptrs(parts: &[Buf; 3]) -> [*const u16; 3] {
    [parts[0].ptr(), parts[1].ptr(), parts[2].ptr()]
}

/// The three parts' buffers, for writing.
fn mut_ptrs(parts: &mut [Buf; 3]) -> [*mut u16; 3] {
    let [a, b, c] = parts;
    [a.mut_ptr(), b.mut_ptr(), c.mut_ptr()]
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

impl Packed {
    /// The bytes its buffers hold.
    pub(crate) fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(Buf::bytes).sum()
    }
}

/// Per-thread scratch of one work item: the query parts, the raw scores, the weight parts and
/// the output, at 64-byte alignment.
#[derive(Default)]
pub(crate) struct Scratch {
    q: [Buf; 3],
    /// Which query rows `q` holds when a [`SplitAhead`] split them, and whether exactly.
    ahead: Option<(QueryRows, bool)>,
    scores: Buf,
    p: [Buf; 3],
    out: Buf,
}

impl Scratch {
    /// The bytes its buffers hold.
    pub(crate) fn bytes(&self) -> usize {
        let parts = self.q.iter().chain(&self.p);
        parts.map(Buf::bytes).sum::<usize>() + self.scores.bytes() + self.out.bytes()
    }
}

/// Rounds to the nearest bf16 (ties away from zero) and returns the f32 whose top 16 bits it
/// is. (Below 2^127 in magnitude the carry cannot reach infinity.)
#[inline(always)]
unsafe fn round_bf16(x: __m512) -> __m512 {
    let r = _mm512_add_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(0x8000));
    _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(-65536)))
}

/// The three parts of 16 floats, each an f32 whose low 16 bits are zero. The last needs no
/// rounding: `x - x0` is a multiple of x's ulp below half a bf16 ulp of x (16 bits), and taking
/// its nearest bf16 leaves at most 8 bits.
#[inline(always)]
unsafe fn split3(x: __m512) -> [__m512; 3] {
    let p0 = round_bf16(x);
    let r1 = _mm512_sub_ps(x, p0);
    let p1 = round_bf16(r1);
    [p0, p1, _mm512_sub_ps(r1, p1)]
}

/// The lanes whose split is not exact: not finite, or `|x| ≥ 2^127`.
#[inline(always)]
unsafe fn inexact(x: __m512) -> __mmask16 {
    let abs = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fff_ffff));
    _mm512_cmpge_epu32_mask(abs, _mm512_set1_epi32(0x7f00_0000))
}

/// VNNI pairs: lane n holds the top half of `even[n]` in its low half and the top half of
/// `odd[n]` in its high half.
#[inline(always)]
unsafe fn pair(even: __m512, odd: __m512) -> __m512i {
    // (even >> 16) | (odd & 0xffff0000): the truth table of A | (B & C) is 0xf8.
    _mm512_ternarylogic_epi32::<0xf8>(
        _mm512_srli_epi32::<16>(_mm512_castps_si512(even)),
        _mm512_castps_si512(odd),
        _mm512_set1_epi32(-65536),
    )
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
unsafe fn split_row(
    src: *const f32,
    len: usize,
    padded: usize,
    dst: [*mut u16; 3],
    cs: usize,
) -> bool {
    let (mut x, mut bad) = (0, 0);
    while x < padded {
        let v = load32(src, x, len, 0.0);
        bad |= inexact(v[0]) | inexact(v[1]);
        store_parts::<false>(dst.map(|p| p.add(x / 32 * cs)), v);
        x += 32;
    }
    bad == 0
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
                let [even, odd] = [0, 16].map(|h| transposed_columns(base, ld, n, ks * 32 + h, d));
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
        // V: element (k, n) = value[k][n]; tile row r pairs the value rows of `block_row(ks, r)`.
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

/// Where the left operand's tiles are: tile `(mt, ks)` at `mt · ra + ks · ka` elements, its
/// rows `sa` bytes apart.
#[derive(Clone, Copy)]
struct ARows {
    ra: usize,
    ka: usize,
    sa: usize,
}

impl ARows {
    /// The rows layout, `lda` elements per row.
    fn rows(lda: usize) -> ARows {
        ARows {
            ra: 16 * lda,
            ka: 32,
            sa: 2 * lda,
        }
    }
    /// A tiles, `kt` of them along k.
    fn tiles(kt: usize) -> ARows {
        ARows {
            ra: kt * 512,
            ka: 512,
            sa: 64,
        }
    }

    /// The first of the two row tiles (rows 0-15; rows 16-31 are `ra` further) of 32-row block
    /// `mi` at k step `ks` of the part at `a`.
    #[inline(always)]
    fn at(self, a: *const u16, mi: usize, ks: usize) -> *const u16 {
        // (Pointer arithmetic only; the products' safety contracts cover the reads.)
        a.wrapping_add(2 * mi * self.ra + ks * self.ka)
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

/// Vector work a tile product runs between its groups of tile products: the tile unit takes 16
/// cycles per product and the core goes on issuing meanwhile. Measured (one thread, medians of
/// 2000): a 64 × 512 × 64 combine took 10.5 µs; 512 steps of 32 scores' exp and split took
/// 3.1 µs alone and added 0.3 µs to it when run between its groups (0.4 µs storing to L1,
/// 1.7 µs of 4.5 storing to the weight parts in L2). Vector work beyond about 16 operations per
/// tile product, or a whole row's pass at once, is not hidden: the vector units get one port
/// while tiles compute (4 tile products absorbed 64 FMAs, and 128 took twice as long).
pub(crate) trait SideWork {
    /// Steps of work left.
    fn units(&self) -> usize;
    /// Does one step (nothing when none is left).
    ///
    /// # Safety
    /// As the implementation documents; runs inside code compiled for AVX-512F.
    unsafe fn step(&mut self);
}

/// No side work.
pub(crate) struct NoWork;

impl SideWork for NoWork {
    fn units(&self) -> usize {
        0
    }
    #[inline(always)]
    unsafe fn step(&mut self) {}
}

/// Side work that asks for memory to be brought into L2 ([`_MM_HINT_T1`] prefetches), 4 cache
/// lines per step: `rows` runs of `row_bytes`, `stride` bytes apart. A prefetch never faults,
/// whatever the memory holds. For the rows of returned weights an item is about to write,
/// during its scores: their stores then find the lines in L2 instead of fetching each for
/// ownership from L3 in the middle of the softmax (about 6.6k of its 35k cycles per 64 × 512
/// item, measured with the weights going to an L2-resident buffer instead). The fills cost the
/// scores' tile products about 2.5k; the call gains 2-4%: (8, 512, 512, 64) with returned
/// weights 1.32-1.40 against 1.29-1.33 ms (2 threads, the two alternating, medians of 300). And
/// for the next item's query rows ([`SplitAhead`]).
pub(crate) struct Prefetch {
    next: *const i8,
    end: *const i8,
    row: *const i8,
    rows_left: usize,
    row_bytes: usize,
    stride: usize,
}

impl Prefetch {
    /// Cache lines per step.
    const LINES: usize = 4;

    /// The `bytes` at `p` (any alignment).
    pub(crate) fn new(p: *const i8, bytes: usize) -> Prefetch {
        Prefetch::rows(p, 1, bytes, bytes)
    }

    /// `rows` runs of `row_bytes` from `p`, `stride` bytes apart (one run when they touch).
    pub(crate) fn rows(p: *const i8, rows: usize, row_bytes: usize, stride: usize) -> Prefetch {
        let (rows, row_bytes) = match stride == row_bytes {
            true => (rows.min(1), rows * row_bytes),
            false => (rows, row_bytes),
        };
        Prefetch {
            next: p.wrapping_sub(p as usize % 64),
            end: p.wrapping_add(if rows == 0 { 0 } else { row_bytes }),
            row: p,
            rows_left: rows.saturating_sub(1),
            row_bytes,
            stride,
        }
    }

    /// Whether every line was asked for.
    fn done(&self) -> bool {
        self.next >= self.end && self.rows_left == 0
    }
}

impl SideWork for Prefetch {
    fn units(&self) -> usize {
        let first = (self.end as usize).saturating_sub(self.next as usize);
        let lines = first.div_ceil(64) + self.rows_left * (self.row_bytes.div_ceil(64) + 1);
        lines.div_ceil(Self::LINES)
    }

    #[inline(always)]
    unsafe fn step(&mut self) {
        for _ in 0..Self::LINES {
            if self.next >= self.end {
                if self.rows_left == 0 {
                    return;
                }
                self.rows_left -= 1;
                self.row = self.row.wrapping_add(self.stride);
                self.next = self.row.wrapping_sub(self.row as usize % 64);
                self.end = self.row.wrapping_add(self.row_bytes);
            }
            _mm_prefetch::<_MM_HINT_T1>(self.next);
            self.next = self.next.wrapping_add(64);
        }
    }
}

/// Spreads a side work's steps evenly over a product's `groups` groups of tile products
/// (Bresenham: `units / groups` steps per group, the remainder spread).
struct Spread {
    units: usize,
    groups: usize,
    credit: usize,
}

impl Spread {
    fn new<S: SideWork>(side: &S, groups: usize) -> Spread {
        Spread {
            units: side.units(),
            groups: groups.max(1),
            credit: 0,
        }
    }
    /// After one group: its share of the steps.
    #[inline(always)]
    unsafe fn group<S: SideWork>(&mut self, side: &mut S) {
        if self.units == 0 {
            return;
        }
        self.credit += self.units;
        while self.credit >= self.groups {
            self.credit -= self.groups;
            side.step();
        }
    }
}

/// `C = Σ_{i+j≤2} A_i · B_j` over `kt` tiles of 32 along k: A's tile `(mt, ks)` at
/// `mt · ra + ks · ka` with rows `sa` bytes apart (`32 · mb` rows; see [`ARows`]), B in the tile
/// layout (`b_kt` tiles along k per column tile, `2 · nb` column tiles used), C row-major f32
/// (`ldc` floats per row, `32 · mb` rows × `32 · nb` columns), for the 32-row blocks `blocks`.
/// Blocks of 32 × 32 (four accumulator tiles, tmm0-3); B's column block outside, so its 3 · 2 · kt
/// tiles (1 KB each) are reused by every row block, from L1 while they fit. Each group of four
/// tile products (one part pair, A in tmm4-5, B in tmm6-7) loads the next group's tiles right after
/// the last product that reads their register, so a load has one or two products' time to land
/// before it is needed; loaded just before their products, as before, a 64 × 512 × 64 combine took
/// 6.6-7.0 ns per tile product against 6.2-6.6 now (one thread, hot, medians of 3000, 5 rounds
/// alternating). The same sums in the same order as one pair at a time, so the same bits.
///
/// # Safety
/// `_tiles` is configured; every pointer is 64-byte aligned and covers the extents above.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn product<S: SideWork>(
    _tiles: &Tiles,
    a: [*const u16; 3],
    rows: ARows,
    b: [*const u16; 3],
    b_kt: usize,
    kt: usize,
    (blocks, nb): (Range<usize>, usize),
    c: *mut f32,
    ldc: usize,
    side: &mut S,
) {
    let (sa, sb, sc) = (rows.sa, 64usize, ldc * 4);
    let (mb0, nm) = (blocks.start, blocks.len());
    let nblk = nm * nb;
    let mut spread = Spread::new(side, nblk * kt * 6);
    if nblk == 0 {
        return;
    }
    // C block `blk`: column block nj outside, row block mi inside.
    let coords = |blk: usize| (blk / nm, mb0 + blk % nm);
    let pa = |mi: usize, ai: usize, ks: usize| rows.at(a[ai], mi, ks);
    let pb = |nj: usize, bj: usize, ks: usize| b[bj].wrapping_add((2 * nj * b_kt + ks) * 512);
    let (ra, rb) = (rows.ra, b_kt * 512);
    // One group, then the next group's B tiles (A stays).
    macro_rules! group_b {
        ($pb:expr) => {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm6, [{pb} + {sb} * 1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm7, [{pb2} + {sb} * 1]",
                pb = in(reg) $pb,
                pb2 = in(reg) $pb.wrapping_add(rb),
                sb = in(reg) sb,
                options(nostack, readonly),
            )
        };
    }
    // One group, then all four tiles of the next.
    macro_rules! group_ab {
        ($pa:expr, $pb:expr) => {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm6, [{pb} + {sb} * 1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm4, [{pa} + {sa} * 1]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm7, [{pb2} + {sb} * 1]",
                "tileloadd tmm5, [{pa2} + {sa} * 1]",
                pa = in(reg) $pa,
                pa2 = in(reg) $pa.wrapping_add(ra),
                sa = in(reg) sa,
                pb = in(reg) $pb,
                pb2 = in(reg) $pb.wrapping_add(rb),
                sb = in(reg) sb,
                options(nostack, readonly),
            )
        };
    }
    let (nj0, mi0) = coords(0);
    let (p4, p6) = (pa(mi0, 0, 0), pb(nj0, 0, 0));
    load_first((p4, p4.wrapping_add(ra), sa), (p6, p6.wrapping_add(rb)));
    for blk in 0..nblk {
        let (nj, mi) = coords(blk);
        // After the last block, harmless loads of its own first tiles.
        let last = if blk + 1 < nblk {
            coords(blk + 1)
        } else {
            (nj, mi)
        };
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for ks in 0..kt {
            let (nnj, nmi, nks) = if ks + 1 < kt {
                (nj, mi, ks + 1)
            } else {
                (last.0, last.1, 0)
            };
            // Part pairs (0,0) (0,1) (0,2) (1,0) (1,1) (2,0), each group loading the next's tiles
            // (the last, the next k step's or block's first).
            group_b!(pb(nj, 1, ks));
            spread.group(side);
            group_b!(pb(nj, 2, ks));
            spread.group(side);
            group_ab!(pa(mi, 1, ks), pb(nj, 0, ks));
            spread.group(side);
            group_b!(pb(nj, 1, ks));
            spread.group(side);
            group_ab!(pa(mi, 2, ks), pb(nj, 0, ks));
            spread.group(side);
            group_ab!(pa(nmi, 0, nks), pb(nnj, 0, nks));
            spread.group(side);
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

/// Loads the first group's tiles: A's two at `p4` and `p5` (rows `sa` bytes apart) into
/// tmm4-5, and B's at `p6` and `p7` (rows 64 bytes apart) into tmm6-7.
///
/// # Safety
/// Tiles are configured; the four tiles are readable.
#[inline(always)]
unsafe fn load_first(
    (p4, p5, sa): (*const u16, *const u16, usize),
    (p6, p7): (*const u16, *const u16),
) {
    asm!(
        "tileloadd tmm4, [{p4} + {sa} * 1]",
        "tileloadd tmm5, [{p5} + {sa} * 1]",
        "tileloadd tmm6, [{p6} + {sb} * 1]",
        "tileloadd tmm7, [{p7} + {sb} * 1]",
        p4 = in(reg) p4,
        p5 = in(reg) p5,
        p6 = in(reg) p6,
        p7 = in(reg) p7,
        sa = in(reg) sa,
        sb = in(reg) 64usize,
        options(nostack, readonly),
    );
}

/// [`product`] in blocks of 32 rows × 16 columns (two accumulator tiles) with two sets of
/// accumulators taking turns: each block's stores are issued after the next block's first tile
/// products, so the tile unit does not drain at every block. For the scores, whose k (D = 64) gives
/// a 32 × 32 block only 48 tile products between drains: a 64 × 512 × 64 product took 10.7 against
/// 11.6 µs (one thread, medians of 2000), whole calls 1-3% less ((8, 512, 512, 64): 1.424 against
/// 1.467 ms, (2, 2048, 2048, 64) 5.65 against 5.73; 2 threads, calls alternating). Not for the
/// combine, whose A (the weight parts, from L2) it loads once per 16 columns instead of 32: 14.1
/// against 11.4 µs, and with both pipelined 8.4 against 6.6 ns per tile product. B's tile
/// alternates between tmm6 and tmm7 pair by pair, each loaded right after the products of the pair
/// before it, so it has a pair's two products to land, and A's two tiles follow their last product
/// as in [`product`]: 6.1-6.4 against 6.3-6.6 ns per tile product (64 × 512 × 64, one thread, hot,
/// medians of 3000, 5 rounds alternating). The same sums in the same order as [`product`], so the
/// same bits.
///
/// # Safety
/// As [`product`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn product_in_turns<S: SideWork>(
    _tiles: &Tiles,
    a: [*const u16; 3],
    rows: ARows,
    b: [*const u16; 3],
    b_kt: usize,
    kt: usize,
    (blocks, nb): (Range<usize>, usize),
    c: *mut f32,
    ldc: usize,
    side: &mut S,
) {
    let (sb, sc, sa) = (64usize, ldc * 4, rows.sa);
    let (mb0, nm) = (blocks.start, blocks.len());
    let nblk = nm * 2 * nb;
    let mut spread = Spread::new(side, nblk * kt * 6);
    if nblk == 0 {
        return;
    }
    let ra = rows.ra;
    // Block `blk`: column tile nt outside, row block mi inside.
    let coords = |blk: usize| (blk / nm, mb0 + blk % nm);
    let pa = |mi: usize, ai: usize, ks: usize| rows.at(a[ai], mi, ks);
    let pb = |nt: usize, bj: usize, ks: usize| b[bj].wrapping_add((nt * b_kt + ks) * 512);
    // One pair: the two tile products with B in $r, then (with $pa) A's two tiles for the next
    // pair, each right after the last product that reads its register, then B for the pair
    // after next into $r (the next pair's B is in the other register).
    macro_rules! pair {
        ($c0:literal, $c1:literal, $r:literal, $pb:expr) => {
            asm!(
                concat!("tdpbf16ps ", $c0, ", tmm4, ", $r),
                concat!("tdpbf16ps ", $c1, ", tmm5, ", $r),
                concat!("tileloadd ", $r, ", [{pb} + {sb} * 1]"),
                pb = in(reg) $pb,
                sb = in(reg) sb,
                options(nostack, readonly),
            )
        };
        ($c0:literal, $c1:literal, $r:literal, $pb:expr, $pa:expr) => {
            asm!(
                concat!("tdpbf16ps ", $c0, ", tmm4, ", $r),
                "tileloadd tmm4, [{pa} + {sa} * 1]",
                concat!("tdpbf16ps ", $c1, ", tmm5, ", $r),
                "tileloadd tmm5, [{pa2} + {sa} * 1]",
                concat!("tileloadd ", $r, ", [{pb} + {sb} * 1]"),
                pa = in(reg) $pa,
                pa2 = in(reg) $pa.wrapping_add(ra),
                sa = in(reg) sa,
                pb = in(reg) $pb,
                sb = in(reg) sb,
                options(nostack, readonly),
            )
        };
    }
    macro_rules! store {
        ($c0:literal, $c1:literal, $blk:expr) => {{
            let (nt, mi) = coords($blk);
            let pc = c.add(mi * 32 * ldc + nt * 16);
            asm!(
                concat!("tilestored [{c0} + {sc} * 1], ", $c0),
                concat!("tilestored [{c1} + {sc} * 1], ", $c1),
                c0 = in(reg) pc,
                c1 = in(reg) pc.add(16 * ldc),
                sc = in(reg) sc,
                options(nostack),
            );
        }};
    }
    // Pairs in [`product`]'s order: (0,0) (0,1) (0,2) (1,0) (1,1) (2,0); even pairs take B from
    // tmm6, odd from tmm7 (six per k step: the same register each k step).
    macro_rules! block {
        ($c0:literal, $c1:literal, $blk:expr, $after:expr) => {{
            asm!(
                concat!("tilezero ", $c0),
                concat!("tilezero ", $c1),
                options(nostack, nomem)
            );
            let (nt, mi) = coords($blk);
            // Where the k steps go on: this block's next, or the next block's first (or, after
            // the last, harmless loads of this block's own tiles).
            let (nx_nt, nx_mi) = if $blk + 1 < nblk {
                coords($blk + 1)
            } else {
                (nt, mi)
            };
            for ks in 0..kt {
                let (nn, nmi, nks) = if ks + 1 < kt {
                    (nt, mi, ks + 1)
                } else {
                    (nx_nt, nx_mi, 0)
                };
                pair!($c0, $c1, "tmm6", pb(nt, 2, ks));
                if ks == 0 {
                    $after;
                }
                spread.group(side);
                pair!($c0, $c1, "tmm7", pb(nt, 0, ks));
                spread.group(side);
                pair!($c0, $c1, "tmm6", pb(nt, 1, ks), pa(mi, 1, ks));
                spread.group(side);
                pair!($c0, $c1, "tmm7", pb(nt, 0, ks));
                spread.group(side);
                pair!($c0, $c1, "tmm6", pb(nn, 0, nks), pa(mi, 2, ks));
                spread.group(side);
                pair!($c0, $c1, "tmm7", pb(nn, 1, nks), pa(nmi, 0, nks));
                spread.group(side);
            }
        }};
    }
    // Prologue: the first pair's A and the first two pairs' B.
    let (nt0, mi0) = coords(0);
    let p4 = pa(mi0, 0, 0);
    load_first(
        (p4, p4.wrapping_add(ra), sa),
        (pb(nt0, 0, 0), pb(nt0, 1, 0)),
    );
    for blk in 0..nblk {
        if blk % 2 == 0 {
            block!(
                "tmm0",
                "tmm1",
                blk,
                if blk > 0 {
                    store!("tmm2", "tmm3", blk - 1)
                }
            );
        } else {
            block!("tmm2", "tmm3", blk, store!("tmm0", "tmm1", blk - 1));
        }
    }
    if nblk % 2 == 1 {
        store!("tmm0", "tmm1", nblk - 1);
    } else {
        store!("tmm2", "tmm3", nblk - 1);
    }
}

/// Raw scores of one item: `S = Q Kᵀ` for `rows` query rows (split by [`split_queries`], `dp`
/// wide) against keys `c0 .. c0 + cols` (`c0` a multiple of 32), of the 32-row blocks `blocks`
/// (all `⌈rows/32⌉` of them, or a part, the buffer sized for all), with `side` between its
/// tile products. Returns S (`ldc` floats per row, `ldc ≥ cols`).
///
/// # Safety
/// As [`product`]; `s.q` holds the split queries, `keys` a batch element with
/// `c0 + ⌈cols/32⌉ · 32` keys or more; `side` as it documents.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn scores<S: SideWork>(
    tiles: &Tiles,
    s: &mut Scratch,
    keys: &Packed,
    (rows, c0, cols, dp): (usize, usize, usize, usize),
    blocks: Option<Range<usize>>,
    side: &mut S,
) -> (*mut f32, usize) {
    let (mb, nb) = (rows.div_ceil(32), cols.div_ceil(32));
    let (c, ldc) = s.scores.f32_block(mb, nb);
    let a = ptrs(&s.q);
    // Keys from c0 (a multiple of 32): column tile c0 / 16 on.
    let b = ptrs(&keys.k).map(|p| p.add(c0 / 16 * keys.k_kt * 512));
    let rows = ARows::rows(dp);
    let blocks = blocks.unwrap_or(0..mb);
    product_in_turns(
        tiles,
        a,
        rows,
        b,
        keys.k_kt,
        keys.k_kt,
        (blocks, nb),
        c,
        ldc,
        side,
    );
    (c, ldc)
}

/// Query rows of one item: `rows` rows of `d` floats from `q0`, `ld` apart, in call `call`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct QueryRows {
    pub(crate) call: u64,
    pub(crate) q0: *const f32,
    pub(crate) ld: usize,
    pub(crate) rows: usize,
    pub(crate) d: usize,
}

/// [`split_queries`] for `at`, unless a [`SplitAhead`] already split these rows in this call.
///
/// # Safety
/// As [`split_queries`].
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn queries_for(s: &mut Scratch, at: QueryRows) -> Option<usize> {
    let dp = at.d.next_multiple_of(32);
    match s.ahead.take() {
        Some((held, exact)) if held == at => exact.then_some(dp),
        _ => split_queries(s, at.q0, at.ld, at.rows, at.d),
    }
}

/// Side work that splits the next item's query rows into the query parts, once the item's own
/// scores no longer need them: first its steps prefetch the rows ([`Prefetch`]), then each
/// step splits one row ([`split_row`]); [`SplitAhead::finish`] records what the parts hold, for
/// [`queries_for`]. Without a next item it does nothing.
pub(crate) struct SplitAhead {
    at: Option<QueryRows>,
    rows_ahead: Prefetch,
    dst: [*mut u16; 3],
    dp: usize,
    r: usize,
    exact: bool,
}

impl SplitAhead {
    /// Sizes the query parts for `at` (the item's own scores are done with them), to run
    /// between the `groups` groups of tile products of a product: only if it has at most a
    /// step per group (a row's split, ~50 vector operations, is about what a group's four tile
    /// products hide). Denser, it slowed (32, 128, 128, 64) calls by 4%, where its combines have
    /// 48-96 groups for 128 steps.
    pub(crate) fn new(s: &mut Scratch, at: Option<QueryRows>, groups: usize) -> SplitAhead {
        s.ahead = None;
        let rows_ahead = |a: QueryRows| Prefetch::rows(a.q0.cast(), a.rows, a.d * 4, a.ld * 4);
        let mut ahead = SplitAhead {
            at,
            rows_ahead: Prefetch::new(std::ptr::null(), 0),
            dst: [std::ptr::null_mut(); 3],
            dp: 0,
            r: 0,
            exact: true,
        };
        if let Some(a) = at {
            ahead.rows_ahead = rows_ahead(a);
            ahead.dp = a.d.next_multiple_of(32);
        }
        // The filter counts the steps the product will run (`SideWork::units`).
        if ahead.units() > groups {
            ahead.at = None;
            return ahead;
        }
        for b in &mut s.q {
            b.reserve(ahead.at.map_or(0, |a| a.rows.next_multiple_of(32)) * ahead.dp);
        }
        ahead.dst = mut_ptrs(&mut s.q);
        ahead
    }

    /// Splits row `r`.
    ///
    /// # Safety
    /// AVX-512F; `at`'s rows are readable (the caller's contract for the next item's queries).
    #[inline(always)]
    unsafe fn split(&mut self, at: QueryRows) {
        let r = self.r;
        let dst = self.dst.map(|p| p.add(r * self.dp));
        self.exact &= split_row(at.q0.add(r * at.ld), at.d, self.dp, dst, 32);
        self.r += 1;
    }

    /// Splits what is left and records the rows in `s`.
    ///
    /// # Safety
    /// As [`SplitAhead::split`].
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn finish(mut self, s: &mut Scratch) {
        if let Some(at) = self.at {
            while self.r < at.rows {
                self.split(at);
            }
            s.ahead = Some((at, self.exact));
        }
    }
}

impl SideWork for SplitAhead {
    fn units(&self) -> usize {
        self.at.map_or(0, |a| self.rows_ahead.units() + a.rows)
    }

    #[inline(always)]
    unsafe fn step(&mut self) {
        let Some(at) = self.at else {
            return;
        };
        if !self.rows_ahead.done() {
            self.rows_ahead.step();
        } else if self.r < at.rows {
            self.split(at);
        }
    }
}

/// Sizes the weight parts (A tiles) for `rows × cols` weights; returns their width (`cols`
/// padded to 32) and the three parts (for [`split_weights`] and [`exp_split`]).
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
    // Weights are finite or NaN (a NaN row gives a NaN output row either way).
    split_row(w.as_ptr(), w.len(), kp, weight_row(parts, r, kp), 512);
}

/// Where row `r` of the weight parts starts (A tiles, `kp / 32` along k): its chunk `x / 32` is
/// 512 elements further per chunk.
#[inline(always)]
fn weight_row(parts: [*mut u16; 3], r: usize, kp: usize) -> [*mut u16; 3] {
    // SAFETY (of the pointer arithmetic): inside the parts sized by `weight_parts` for row r.
    parts.map(|p| p.wrapping_add((r / 16) * (kp / 32) * 512 + (r % 16) * 32))
}

/// 32 floats of `src` from `x` as two vectors, lanes at or past `len` set to `fill`.
///
/// # Safety
/// AVX-512F; `src` has `len` readable floats.
#[inline(always)]
unsafe fn load32(src: *const f32, x: usize, len: usize, fill: f32) -> [__m512; 2] {
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

/// Stores `v` to `dst + x ..`, only the lanes before `len`.
///
/// # Safety
/// AVX-512F; `dst` has `len` writable floats.
#[inline(always)]
unsafe fn store32(dst: *mut f32, x: usize, len: usize, v: [__m512; 2]) {
    if x + 32 <= len {
        _mm512_storeu_ps(dst.add(x), v[0]);
        _mm512_storeu_ps(dst.add(x + 16), v[1]);
        return;
    }
    let mask = |x: usize| -> __mmask16 { ((1u32 << len.saturating_sub(x).min(16)) - 1) as u16 };
    _mm512_mask_storeu_ps(dst.add(x.min(len)), mask(x), v[0]);
    _mm512_mask_storeu_ps(dst.add((x + 16).min(len)), mask(x + 16), v[1]);
}

/// Splits 32 floats (two vectors) into the three parts at `dst[p]` (see [`split_row`]): rounded
/// ([`split3`]), or with `CUT` truncated ([`split3_cut`]).
///
/// # Safety
/// AVX-512F; each `dst[p]` is 64-byte aligned with 32 writable elements.
#[inline(always)]
unsafe fn store_parts<const CUT: bool>(dst: [*mut u16; 3], v: [__m512; 2]) {
    let split = |x| if CUT { split3_cut(x) } else { split3(x) };
    let (lo, hi) = (split(v[0]), split(v[1]));
    for p in 0..3 {
        _mm512_store_si512(dst[p].cast(), pair(lo[p], hi[p]));
    }
}

/// The three parts of 16 floats by truncation: each holds the next 8 significant bits, so they
/// sum to x exactly (24 bits), in two operations fewer per vector than [`split3`]'s rounding.
/// The first part is x itself ([`pair`] keeps its top half). For the weights `e^(s - max)` in
/// [0, 1] (the values keep [`split3`]): the products the tiles leave out (part 1 · part 2 and
/// smaller) stay below 2^-24 of each term, against 2^-25 with rounded parts. With the unclamped
/// exp ([`exp_table`]), 3-6% less time per call at (8, 512, 512, 64) and 1-2% with returned
/// weights (Rust, 2 threads, calls alternating, medians of 300); outputs within 1.4e-8.
#[inline(always)]
unsafe fn split3_cut(x: __m512) -> [__m512; 3] {
    let top = _mm512_set1_epi32(-65536);
    let p0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), top));
    let r1 = _mm512_sub_ps(x, p0);
    let p1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r1), top));
    [x, p1, _mm512_sub_ps(r1, p1)]
}

/// The softmax's one pass over a row of (masked) scores: `e^(x - max)` split straight into row
/// `r` of the weight parts (width `kp`, zero past the row), whose sum it returns; the caller
/// divides the output row by it. `max` is the row's max, from [`super::rows::max_of_row`] or from
/// this pass on the row before. Alongside, from the same scores block in L2:
/// - `next`, the next row, gives its max (returned; -inf when empty): a pass of its own waits on
///   those loads (6.5% of a call at (8, 512, 512, 64)), here the exp's arithmetic hides them;
/// - with `copy` (`row.len()` floats: the returned weights) `e^(x - max)` is stored there too;
/// - `prev`, the row before's returned weights (`len` floats) with its `1 / sum`, are normalised:
///   the weights are `e^(x - max) · (1 / sum)` as before, without a pass of their own (1.2-1.8% of
///   a call with returned weights at (8, 512, 512, 64)), and not what is split, so the output is
///   `(Σ e_j v_j) / sum` with or without them, Keras's `Σ w_j v_j` to rounding.
///
/// The caller normalises the last row's weights ([`scale_weights`]). As in
/// [`super::rows::softmax_row`], NaN anywhere makes the row's output NaN.
///
/// # Safety
/// AVX-512F; `parts` and `kp` come from [`weight_parts`] for at least `r + 1` rows, and
/// `kp ≥ row.len(), next.len(), len`; `copy` has `row.len()` and `prev` `len` writable floats.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp_split(
    row: &[f32],
    max: f32,
    parts: ([*mut u16; 3], usize, usize),
    copy: Option<*mut f32>,
    next: &[f32],
    prev: Option<(*mut f32, usize, f32)>,
) -> (f32, f32) {
    let mut pass = ExpPass::new(row, max, parts, copy, next, prev);
    while !pass.done() {
        pass.chunk();
    }
    pass.finish()
}

/// [`exp_split`]'s pass over one row, 32 scores at a time ([`ExpPass::chunk`]), so that it can
/// run between tile products ([`SideWork`]); the same operations in the same order.
pub(crate) struct ExpPass {
    mv: __m512,
    src: *const f32,
    len: usize,
    nsrc: *const f32,
    nlen: usize,
    pw: *mut f32,
    plen: usize,
    pinv: __m512,
    dst: [*mut u16; 3],
    copy: Option<*mut f32>,
    sum: [__m512; 2],
    max: [__m512; 2],
    x: usize,
    kp: usize,
}

impl ExpPass {
    /// The pass of [`exp_split`] with these arguments, before its first chunk.
    ///
    /// # Safety
    /// As [`exp_split`]; the slices outlive the pass.
    #[inline(always)]
    pub(crate) unsafe fn new(
        row: &[f32],
        max: f32,
        (parts, r, kp): ([*mut u16; 3], usize, usize),
        copy: Option<*mut f32>,
        next: &[f32],
        prev: Option<(*mut f32, usize, f32)>,
    ) -> ExpPass {
        let (pw, plen, pinv) = prev.unwrap_or((std::ptr::null_mut(), 0, 1.0));
        let neg = _mm512_set1_ps(f32::NEG_INFINITY);
        ExpPass {
            mv: _mm512_set1_ps(max),
            src: row.as_ptr(),
            len: row.len(),
            nsrc: next.as_ptr(),
            nlen: next.len(),
            pw,
            plen,
            pinv: _mm512_set1_ps(pinv),
            dst: weight_row(parts, r, kp),
            copy,
            sum: [_mm512_setzero_ps(); 2],
            max: [neg; 2],
            x: 0,
            kp,
        }
    }

    /// Whether every chunk is done.
    #[inline(always)]
    pub(crate) fn done(&self) -> bool {
        self.x >= self.kp
    }

    /// The next 32 scores (the caller checks [`ExpPass::done`] first).
    ///
    /// # Safety
    /// AVX-512F, as [`exp_split`].
    #[inline(always)]
    pub(crate) unsafe fn chunk(&mut self) {
        let x = self.x;
        if x < self.plen {
            scale32(self.pw, x, self.plen, self.pinv);
        }
        if x < self.nlen {
            let [lo, hi] = load32(self.nsrc, x, self.nlen, f32::NEG_INFINITY);
            self.max = [
                _mm512_max_ps(self.max[0], lo),
                _mm512_max_ps(self.max[1], hi),
            ];
        }
        // Past the row: e^-inf = 0, zero weight parts.
        let [lo, hi] = load32(self.src, x, self.len, f32::NEG_INFINITY);
        let e = [
            // x - max ≤ 0 (or NaN): no upper clamp.
            exp_table::<false>(_mm512_sub_ps(lo, self.mv)),
            exp_table::<false>(_mm512_sub_ps(hi, self.mv)),
        ];
        self.sum = [
            _mm512_add_ps(self.sum[0], e[0]),
            _mm512_add_ps(self.sum[1], e[1]),
        ];
        if let Some(c) = self.copy {
            store32(c, x, self.len, e);
        }
        store_parts::<true>(self.dst.map(|p| p.add(x / 32 * 512)), e);
        self.x = x + 32;
    }

    /// The row's sum and the next row's max (-inf when it is empty), as [`exp_split`] returns.
    ///
    /// # Safety
    /// AVX-512F.
    #[inline(always)]
    pub(crate) unsafe fn finish(&self) -> (f32, f32) {
        let sum = _mm512_reduce_add_ps(_mm512_add_ps(self.sum[0], self.sum[1]));
        (
            sum,
            _mm512_reduce_max_ps(_mm512_max_ps(self.max[0], self.max[1])),
        )
    }
}

/// Floats `x .. x + 32` of the `len` at `w`, times `inv`.
///
/// # Safety
/// AVX-512F; `w` has `len` writable floats.
#[inline(always)]
unsafe fn scale32(w: *mut f32, x: usize, len: usize, inv: __m512) {
    let [lo, hi] = load32(w, x, len, 0.0);
    store32(w, x, len, [_mm512_mul_ps(lo, inv), _mm512_mul_ps(hi, inv)]);
}

/// `len` weights at `w` times `inv` (the last row's, after [`exp_split`]).
///
/// # Safety
/// AVX-512F; `w` has `len` writable floats.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn scale_weights(w: *mut f32, len: usize, inv: f32) {
    let inv = _mm512_set1_ps(inv);
    let mut x = 0;
    while x < len {
        scale32(w, x, len, inv);
        x += 32;
    }
}

/// `O = P V` for `rows` weight rows (split, `kp` wide) and value rows `c0 .. c0 + kp` (`c0` a
/// multiple of 32) of the value parts, of the 32-row blocks `blocks` (as in [`scores`]), with
/// `side` between its tile products; returns O (`ldc` floats per row, `ldc ≥ dv`).
///
/// # Safety
/// As [`product`]; the weight parts hold `rows` rows of width `kp`, and `values` a batch
/// element with at least `c0 + kp` rows of `dv` columns; `side` as it documents.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn combine<S: SideWork>(
    tiles: &Tiles,
    s: &mut Scratch,
    values: &Packed,
    (rows, c0, kp, dv): (usize, usize, usize, usize),
    blocks: Option<Range<usize>>,
    side: &mut S,
) -> (*const f32, usize) {
    let (mb, nb) = (rows.div_ceil(32), dv.div_ceil(32));
    let (c, ldc) = s.out.f32_block(mb, nb);
    let a = ptrs(&s.p);
    // Value rows from c0 (a multiple of 32): tile c0 / 32 along k.
    let b = ptrs(&values.v).map(|p| p.add(c0 / 32 * 512));
    let kt = kp / 32;
    let blocks = blocks.unwrap_or(0..mb);
    product(
        tiles,
        a,
        ARows::tiles(kt),
        b,
        values.v_kt,
        kt,
        (blocks, nb),
        c,
        ldc,
        side,
    );
    (c, ldc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_at(p: *const u16, i: usize) -> f64 {
        // SAFETY: callers index inside the buffers they sized.
        f32::from_bits((unsafe { *p.add(i) } as u32) << 16) as f64
    }

    /// A deterministic stream of floats over many binades (xorshift).
    struct Floats(u64);
    impl Floats {
        fn next_bits(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 32) as u32
        }
        /// Uniform in [-1, 1) times `scale`.
        fn uniform(&mut self, scale: f32) -> f32 {
            (self.next_bits() as f64 / 2f64.powi(31) - 1.0) as f32 * scale
        }
    }

    /// The parts of 16 floats, rounded ([`split3`]) or truncated ([`split3_cut`], its first part
    /// as the tiles see it), and the lanes [`inexact`] flags.
    #[target_feature(enable = "avx512f")]
    unsafe fn split16<const CUT: bool>(x: &[f32; 16]) -> ([[f32; 16]; 3], u16) {
        let v = _mm512_loadu_ps(x.as_ptr());
        let mut out = [[0f32; 16]; 3];
        let mut parts = if CUT { split3_cut(v) } else { split3(v) };
        if CUT {
            // The first part is x itself: `pair` keeps its top half.
            let top = _mm512_and_si512(_mm512_castps_si512(parts[0]), _mm512_set1_epi32(-65536));
            parts[0] = _mm512_castsi512_ps(top);
        }
        for (o, p) in out.iter_mut().zip(parts) {
            _mm512_storeu_ps(o.as_mut_ptr(), p);
        }
        (out, inexact(v))
    }

    /// Every float the packers accept is the exact sum of its three parts, each a bf16 (low 16
    /// bits zero) within the bounds the module's error argument uses; the rest are flagged.
    /// The softmax's exp (the table method without the upper clamp, which `Avx512::exp` has and
    /// `simd::tests` sweeps): within 1 ulp of e^x (f64, rounded to f32) over the whole range of
    /// `s - max` it sees, 0 below EXP_LO, NaN for NaN, 0 for -inf, 1 for 0.
    #[test]
    fn table_exp_is_within_an_ulp() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let n = 1 << 21;
        let mut worst = 0.0f64;
        let mut xs = [0f32; 16];
        for i in (0..n).step_by(16) {
            for (l, x) in xs.iter_mut().enumerate() {
                // Even steps over [-86.5, 0] and a few of 0 < x < 88.
                let f = (i + l) as f64 / n as f64;
                *x = if (i + l) % 97 == 0 {
                    (88.0 * f) as f32
                } else {
                    (super::super::simd::EXP_LO as f64 * f) as f32
                };
            }
            let mut ys = [0f32; 16];
            // SAFETY: AVX-512F was detected.
            unsafe {
                _mm512_storeu_ps(
                    ys.as_mut_ptr(),
                    exp_table::<false>(_mm512_loadu_ps(xs.as_ptr())),
                )
            };
            for (&x, &y) in xs.iter().zip(&ys) {
                let e = (x as f64).exp();
                let ulp = f32::from_bits((e as f32).to_bits() + 1) as f64 - (e as f32) as f64;
                worst = worst.max((y as f64 - e).abs() / ulp);
            }
        }
        assert!(worst <= 1.0, "{worst} ulp");
        let special = [
            0.0,
            -0.0,
            f32::NAN,
            f32::NEG_INFINITY,
            -1e9,
            -86.4,
            -86.6,
            -1e-30,
        ];
        let mut xs = [0f32; 16];
        xs[..special.len()].copy_from_slice(&special);
        let mut ys = [0f32; 16];
        // SAFETY: AVX-512F was detected.
        unsafe {
            _mm512_storeu_ps(
                ys.as_mut_ptr(),
                exp_table::<false>(_mm512_loadu_ps(xs.as_ptr())),
            )
        };
        assert_eq!(&ys[..2], &[1.0, 1.0]);
        assert!(ys[2].is_nan());
        assert_eq!(&ys[3..5], &[0.0, 0.0]);
        assert!(
            ys[5] > 0.0 && ys[5] < 4e-38 && ys[5].is_normal(),
            "{}",
            ys[5]
        );
        assert_eq!(ys[6], 0.0);
        assert_eq!(ys[7], 1.0);
        println!("table exp worst {worst} ulp");
    }

    /// The query rows the parts hold, rebuilt from them (`rows × d`, rows `dp` apart; within a
    /// chunk of 32, element j at position 2j and element 16 + j at 2j + 1).
    fn held_queries(s: &Scratch, rows: usize, d: usize, dp: usize) -> Vec<f64> {
        let parts = ptrs(&s.q);
        let at = |r: usize, k: usize| r * dp + k / 32 * 32 + (k % 32 % 16) * 2 + k % 32 / 16;
        let sum = |i: usize| parts.iter().map(|&p| bf16_at(p, i)).sum::<f64>();
        (0..rows * d).map(|x| sum(at(x / d, x % d))).collect()
    }

    /// A split ahead serves only the rows and the call it was made for, and only when its
    /// product had room for it.
    #[test]
    fn queries_split_ahead_serve_only_their_call() {
        if !is_x86_feature_detected!("avx512f") {
            return; // no AVX-512F: nothing here runs on this CPU
        }
        let (rows, d, ld) = (37usize, 40usize, 43usize);
        let mut rng = Floats(11);
        let mut q: Vec<f32> = (0..rows * ld).map(|_| rng.uniform(2.0)).collect();
        let wanted = |q: &[f32]| -> Vec<f64> {
            (0..rows * d)
                .map(|x| q[x / d * ld + x % d] as f64)
                .collect()
        };
        let first = wanted(&q);
        let at = |call: u64, q: &[f32]| QueryRows {
            call,
            q0: q.as_ptr(),
            ld,
            rows,
            d,
        };
        let mut s = Scratch::default();
        // SAFETY: AVX-512F was detected; the rows are readable for `d` floats each.
        unsafe {
            let change = |q: &mut Vec<f32>| q.iter_mut().for_each(|x| *x = -*x * 0.75);
            SplitAhead::new(&mut s, Some(at(1, &q)), usize::MAX).finish(&mut s);
            change(&mut q);
            // Same rows, same call: the parts split ahead are used as they are.
            assert_eq!(queries_for(&mut s, at(1, &q)), Some(64));
            assert_eq!(held_queries(&s, rows, d, 64), first);
            // Same rows in a later call (the queries changed in place since): split again.
            SplitAhead::new(&mut s, Some(at(1, &q)), usize::MAX).finish(&mut s);
            let stale = wanted(&q);
            change(&mut q);
            assert_eq!(queries_for(&mut s, at(2, &q)), Some(64));
            assert_ne!(held_queries(&s, rows, d, 64), stale);
            assert_eq!(held_queries(&s, rows, d, 64), wanted(&q));
            // A product with too few groups for the split: nothing is split ahead.
            SplitAhead::new(&mut s, Some(at(3, &q)), rows).finish(&mut s);
            assert!(s.ahead.is_none());
            let stale = wanted(&q);
            change(&mut q);
            assert_eq!(queries_for(&mut s, at(3, &q)), Some(64));
            assert_ne!(held_queries(&s, rows, d, 64), stale);
            assert_eq!(held_queries(&s, rows, d, 64), wanted(&q));
        }
    }

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

    /// `C = Σ_{i+j≤2} A_i B_j` computed from the layouts alone, in f64, as `product` walks them.
    fn emulate(
        a: [*const u16; 3],
        a_at: impl Fn(usize, usize) -> usize,
        b: [*const u16; 3],
        b_kt: usize,
        kt: usize,
        (m, n): (usize, usize),
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for (ai, &pa) in a.iter().enumerate() {
                    for &pb in &b[..3 - ai] {
                        for ks in 0..kt {
                            let tile = ((j / 16) * b_kt + ks) * 512;
                            for r in 0..16 {
                                for e in 0..2 {
                                    let x = bf16_at(pa, a_at(i, ks * 32 + 2 * r + e));
                                    let y = bf16_at(pb, tile + r * 32 + (j % 16) * 2 + e);
                                    acc += x * y;
                                }
                            }
                        }
                    }
                }
                c[i * n + j] = acc;
            }
        }
        c
    }

    /// `Σ_k x[i][k] y[k][j]` and `Σ_k |x y|` in f64 for row-major `x` (`m × k`, stride `ldx`) and
    /// `y` given as `y(k, j)`.
    fn exact(
        x: &[f32],
        ldx: usize,
        y: impl Fn(usize, usize) -> f32,
        (m, k, n): (usize, usize, usize),
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut c, mut abs) = (vec![0f64; m * n], vec![0f64; m * n]);
        for i in 0..m {
            for j in 0..n {
                for t in 0..k {
                    let p = x[i * ldx + t] as f64 * y(t, j) as f64;
                    c[i * n + j] += p;
                    abs[i * n + j] += p.abs();
                }
            }
        }
        (c, abs)
    }

    fn assert_within(label: &str, got: &[f64], want: &[f64], abs: &[f64], rel: f64) {
        for (i, ((g, w), a)) in got.iter().zip(want).zip(abs).enumerate() {
            assert!(
                (g - w).abs() <= rel * a,
                "{label}[{i}]: {g} vs {w} (Σ|terms| {a})"
            );
        }
    }

    /// The packers' layouts hold the products: emulating the tile walk over them gives Q Kᵀ and
    /// P V to the split's accuracy, with strided inputs, sizes off every tile multiple, and
    /// scratch left dirty by a larger call (so every pad must be written as zeros). Where the
    /// tiles are available the tile kernels give the emulated sums to f32 accumulation.
    #[test]
    fn tile_layouts_hold_the_products() {
        if !is_x86_feature_detected!("avx512f") {
            return; // no AVX-512F, no tiles: nothing here runs on this CPU
        }
        let mut rng = Floats(7);
        let mut s = Scratch::default();
        let mut packed = Packed::default();
        // Dirty the buffers with a larger problem of large values.
        let dirty: Vec<f32> = (0..200 * 96).map(|_| rng.uniform(3e4)).collect();
        // SAFETY: AVX-512F was detected; the dirty rows are 96 floats, 200 of them.
        unsafe {
            assert!(split_queries(&mut s, dirty.as_ptr(), 96, 64, 96).is_some());
            assert!(packed.pack(dirty.as_ptr(), 96, dirty.as_ptr(), 96, (200, 96, 96)));
            let (kp, parts) = weight_parts(&mut s, 64, 200);
            for r in 0..64 {
                split_weights(parts, r, &dirty[r * 96..r * 96 + 96], kp);
            }
        }
        for (rows, d, tv, dv) in [
            (37usize, 40usize, 77usize, 24usize),
            (64, 64, 128, 64),
            (5, 7, 3, 1),
        ] {
            let (ldq, ldk, ldv) = (d + 3, d + 1, dv + 5);
            let q: Vec<f32> = (0..rows * ldq).map(|_| rng.uniform(2.0)).collect();
            let k: Vec<f32> = (0..tv * ldk).map(|_| rng.uniform(2.0)).collect();
            let v: Vec<f32> = (0..tv * ldv).map(|_| rng.uniform(1.0)).collect();
            let p: Vec<f32> = (0..rows * tv).map(|_| rng.uniform(0.5) + 0.5).collect();
            // SAFETY: AVX-512F; every row is readable for its length (strides ≥ lengths).
            let (dp, kp, parts) = unsafe {
                let dp = split_queries(&mut s, q.as_ptr(), ldq, rows, d).unwrap();
                assert!(packed.pack(k.as_ptr(), ldk, v.as_ptr(), ldv, (tv, d, dv)));
                let (kp, parts) = weight_parts(&mut s, rows, tv);
                for r in 0..rows {
                    split_weights(parts, r, &p[r * tv..(r + 1) * tv], kp);
                }
                (dp, kp, parts)
            };
            let label = format!("rows {rows}, D {d}, Tv {tv}, Dv {dv}");
            let qa = ptrs(&s.q);
            let kb = ptrs(&packed.k);
            let pa = parts.map(|x| x as *const u16);
            let vb = ptrs(&packed.v);
            let s_emul = emulate(
                qa,
                |i, k| i * dp + k,
                kb,
                packed.k_kt,
                packed.k_kt,
                (rows, tv),
            );
            let (want, abs) = exact(&q, ldq, |t, j| k[j * ldk + t], (rows, d, tv));
            assert_within(
                &format!("{label}: scores"),
                &s_emul,
                &want,
                &abs,
                2f64.powi(-22),
            );
            let kt = kp / 32;
            let a_tiles =
                |i: usize, k: usize| ((i / 16) * kt + k / 32) * 512 + (i % 16) * 32 + k % 32;
            let o_emul = emulate(pa, a_tiles, vb, packed.v_kt, kt, (rows, dv));
            let (want, abs) = exact(&p, tv, |t, j| v[t * ldv + j], (rows, tv, dv));
            assert_within(
                &format!("{label}: combine"),
                &o_emul,
                &want,
                &abs,
                2f64.powi(-22),
            );
            if !crate::cpu::amx_available() {
                continue; // the layouts are checked; this CPU has no tiles to run them
            }
            // SAFETY: available() holds; the buffers were sized above for these shapes.
            unsafe {
                let tiles = Tiles::configure();
                let (c, ldc) = scores(
                    &tiles,
                    &mut s,
                    &packed,
                    (rows, 0, tv, dp),
                    None,
                    &mut NoWork,
                );
                let got: Vec<f64> = (0..rows * tv)
                    .map(|x| *c.add((x / tv) * ldc + x % tv) as f64)
                    .collect();
                assert_within(
                    &format!("{label}: tile scores"),
                    &got,
                    &s_emul,
                    &abs_of(&q, ldq, &k, ldk, (rows, d, tv)),
                    2f64.powi(-20),
                );
                // The scores' block order (accumulators in turns) gives product's bits.
                let (mb, nb) = (rows.div_ceil(32), tv.div_ceil(32));
                let (c2, ld2) = s.out.f32_block(mb, nb);
                product(
                    &tiles,
                    qa,
                    ARows::rows(dp),
                    kb,
                    packed.k_kt,
                    packed.k_kt,
                    (0..mb, nb),
                    c2,
                    ld2,
                    &mut NoWork,
                );
                for x in 0..rows * tv {
                    let (i, j) = (x / tv, x % tv);
                    let (a, b) = (*c.add(i * ldc + j), *c2.add(i * ld2 + j));
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{label}: scores [{i}, {j}] in turns"
                    );
                }
                let (o, ldo) = combine(
                    &tiles,
                    &mut s,
                    &packed,
                    (rows, 0, kp, dv),
                    None,
                    &mut NoWork,
                );
                let got: Vec<f64> = (0..rows * dv)
                    .map(|x| *o.add((x / dv) * ldo + x % dv) as f64)
                    .collect();
                assert_within(
                    &format!("{label}: tile combine"),
                    &got,
                    &o_emul,
                    &abs,
                    2f64.powi(-20),
                );
            }
        }
    }

    fn abs_of(
        q: &[f32],
        ldq: usize,
        k: &[f32],
        ldk: usize,
        (m, d, n): (usize, usize, usize),
    ) -> Vec<f64> {
        exact(q, ldq, |t, j| k[j * ldk + t], (m, d, n)).1
    }
}

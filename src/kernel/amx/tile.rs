//! The tile products: the tile configuration ([`Tiles`]), the two product loops in inline
//! assembly, and an item's two products on them, [`scores`] (`Q Kᵀ`) and [`combine`] (`P V`).

use std::arch::asm;
use std::ops::Range;

use super::buf::{ptrs, Packed, Scratch};
use super::side_work::{SideWork, Spread};

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
    /// [`amx_available`](crate::cpu::amx_available) returned true.
    pub(crate) unsafe fn configure() -> Tiles {
        // SAFETY: within this function's `# Safety` contract, which the caller upholds.
        unsafe {
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
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured (`configure`), so AMX is available.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
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
/// before it is needed, which beats loading them just before their products (measured:
/// docs/performance.md, "Where the thresholds come from"). The same sums in the same order as one
/// pair at a time, so the same bits.
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
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
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
                // Part pairs (0,0) (0,1) (0,2) (1,0) (1,1) (2,0), each group loading the next's
                // tiles (the last, the next k step's or block's first).
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
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
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
}

/// [`product`] in blocks of 32 rows × 16 columns (two accumulator tiles) with two sets of
/// accumulators taking turns: each block's stores are issued after the next block's first tile
/// products, so the tile unit does not drain at every block. For the scores, whose k (D = 64) gives
/// a 32 × 32 block only 48 tile products between drains; not for the combine, whose A (the weight
/// parts, from L2) it loads once per 16 columns instead of 32, which is slower there. B's tile
/// alternates between tmm6 and tmm7 pair by pair, each loaded right after the products of the pair
/// before it, so it has a pair's two products to land, and A's two tiles follow their last product
/// as in [`product`] (measured: docs/performance.md, "Where the thresholds come from"). The same
/// sums in the same order as [`product`], so the same bits.
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
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
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
}

/// Raw scores of one item: `S = Q Kᵀ` for `rows` query rows (split by
/// [`split_queries`](super::split::split_queries), `dp` wide) against keys `c0 .. c0 + cols` (`c0`
/// a multiple of 32), of the 32-row blocks `blocks` (all `⌈rows/32⌉` of them, or a part, the buffer
/// sized for all), with `side` between its tile products. Returns S (`ldc` floats per row, `ldc ≥
/// cols`).
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
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
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
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
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
}

#[cfg(test)]
mod tests {
    use super::super::side_work::tests::bf16_at;
    use super::super::side_work::NoWork;
    use super::super::split::tests::Floats;
    use super::super::split::{split_queries, split_weights, weight_parts};
    use super::*;

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

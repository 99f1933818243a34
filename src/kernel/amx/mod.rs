//! The AMX family: the f32 forward on AMX tiles (`tdpbf16ps`) at float32 accuracy, its own
//! item because its products and softmax overlap differently from the vector families'.
//!
//! A tile multiply takes bfloat16 operands (8 significant bits) and accumulates in f32. Each
//! f32 operand `x` is split into three bf16 parts, `x = x0 + x1 + x2` (each part the nearest
//! bf16 to what the earlier parts leave: exact for `2^-100 ≤ |x| < 2^127`, as 3 × 8 bits hold
//! f32's 24), and the six cross products `xi · yj` with `i + j ≤ 2` are accumulated: as
//! `|x1| ≤ 2^-8 |x|` and `|x2| ≤ 2^-16 |x|`, the three dropped ones sum to at most about
//! `2^-23 |x y|`, and much less on average: below a sequential f32 FMA chain's error (measured:
//! docs/performance.md, "Where the thresholds come from"). A tile multiply does 16 × 16 × 32
//! multiply-adds; with six per product this core's AMX unit still runs the products at about
//! twice its AVX-512 FMA rate.
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
//! Availability ([`amx_available`](crate::cpu::amx_available)): the CPU has AMX-TILE and AMX-BF16,
//! the OS enables their state in XCR0, and Linux grants this process the tile data
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`). The packers report whether the split held every query, key
//! and value exactly: finite and below `2^127` (a larger value can round up to infinity, and
//! infinity splits into NaN); when not, the caller runs the AVX-512 path, so infinities and NaN in
//! the inputs give what they give there.
//!
//! Files, each importing only from those before it: `buf` (the buffers, packed keys and values,
//! and scratch), `split` (the bf16 split into the three layouts), `side_work` (vector work run
//! between tile products), `tile` (the tile products: scores and combine), `exp` (the
//! softmax's pass into the weight parts), `softmax` (a row's softmax, alone or as side work)
//! and `item` (the forward item on tiles, and its chunked form for long keys).

mod buf;
mod exp;
mod item;
mod side_work;
mod softmax;
mod split;
mod tile;

pub(crate) use buf::Packed;
#[cfg(test)]
pub(crate) use buf::Scratch;
#[cfg(test)]
pub(crate) use item::SCRATCH;
pub(crate) use item::{block_amx, trim_scratch};
#[cfg(test)]
pub(crate) use split::weight_parts;

#[cfg(test)]
mod tests {
    use std::arch::x86_64::*;

    use super::super::simd::exp_table;

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
}

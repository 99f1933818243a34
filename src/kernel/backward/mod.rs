//! The backward's kernels: the work item's context and the portable item ([`ctx`]), the f32 item
//! on a SIMD family's micro-kernels ([`fused`]), and `Δ = dO · O` row by row ([`row_dots_f32`]).
//! The entry layer (`crate::backward`) plans the items and sums their results.

pub(crate) mod ctx;
pub(crate) mod fused;

#[cfg(target_arch = "x86_64")]
use crate::cpu::Isa;

/// `out[i] = dO_i · O_i`, each a sequential FMA chain over the features in order: the order in
/// which the products compute `dP_ij = dO_i · v_j`. Where a row sees one key (weight exactly 1,
/// so `O_i` is that value row, bit for bit) `Δ_i` then equals `dP_ij` exactly and the row's dS
/// is exactly 0, as it is mathematically; in general the two roundings stay alike. Eight rows
/// at a time hide the FMA latency. Falls back to ndarray's dot without FMA.
pub(crate) fn row_dots_f32(
    d_out: ndarray::ArrayView2<'_, f32>,
    out: ndarray::ArrayView2<'_, f32>,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if Isa::detect() != Isa::Scalar && is_x86_feature_detected!("fma") {
            // SAFETY: FMA was detected just above.
            return unsafe { row_dots_fma(d_out, out) };
        }
    }
    d_out
        .rows()
        .into_iter()
        .zip(out.rows())
        .map(|(a, b)| a.dot(&b))
        .collect()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn row_dots_fma(
    a: ndarray::ArrayView2<'_, f32>,
    b: ndarray::ArrayView2<'_, f32>,
) -> Vec<f32> {
    const ROWS: usize = 8;
    let (n, d) = a.dim();
    let mut result = vec![0.0f32; n];
    let (a, b) = (a.as_standard_layout(), b.as_standard_layout());
    let (a, b) = (
        a.as_slice().expect("standard layout"),
        b.as_slice().expect("standard layout"),
    );
    if d == 0 {
        return result;
    }
    for ((out, ra), rb) in result
        .chunks_mut(ROWS)
        .zip(a.chunks(ROWS * d))
        .zip(b.chunks(ROWS * d))
    {
        for kk in 0..d {
            for (r, acc) in out.iter_mut().enumerate() {
                *acc = ra[r * d + kk].mul_add(rb[r * d + kk], *acc);
            }
        }
    }
    result
}

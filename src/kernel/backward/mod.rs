//! The backward's kernels: the work item's context and the portable item ([`ctx`]), the f32 item
//! on a SIMD family's micro-kernels ([`fused`]), and `Δ = dO · O` row by row ([`row_dots_f32`]).
//! The entry layer (`crate::backward`) plans the items and sums their results.

pub(crate) mod ctx;
pub(crate) mod fused;

/// `out[i] = dO_i · O_i` for the f32 items of a SIMD family (`simd_items`), each a sequential
/// FMA chain over the features in order: the order in which their products compute
/// `dP_ij = dO_i · v_j`. Where a row sees one key (weight exactly 1, so `O_i` is that value
/// row, bit for bit) `Δ_i` then equals `dP_ij` exactly and the row's dS is exactly 0, as it is
/// mathematically; in general the two roundings stay alike. Eight rows at a time hide the FMA
/// latency. Otherwise (the portable item, whose dP is ndarray's matrix product) the rows' dots
/// come from that same product ([`row_dots_matmul`]).
pub(crate) fn row_dots_f32(
    d_out: ndarray::ArrayView2<'_, f32>,
    out: ndarray::ArrayView2<'_, f32>,
    simd_items: bool,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if simd_items && is_x86_feature_detected!("fma") {
            // SAFETY: FMA was detected just above.
            return unsafe { row_dots_fma(d_out, out) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if simd_items {
            // SAFETY: aarch64 has FMA (`fmadd`) in its baseline.
            return unsafe { row_dots_fma(d_out, out) };
        }
    }
    row_dots_matmul(d_out, out)
}

/// `out[i] = a_i · b_i` as the diagonal of `A · Bᵀ` over blocks of 8 rows: the matrix product
/// computes each element in the same order whatever its shape, so `Δ_i` matches the portable
/// item's `dP = dO · Vᵀ` as the FMA chains match the SIMD items'.
pub(crate) fn row_dots_matmul<T: ndarray::LinalgScalar>(
    a: ndarray::ArrayView2<'_, T>,
    b: ndarray::ArrayView2<'_, T>,
) -> Vec<T> {
    const ROWS: usize = 8;
    let n = a.nrows();
    let mut result = Vec::with_capacity(n);
    for i0 in (0..n).step_by(ROWS) {
        let rows = ndarray::s![i0..(i0 + ROWS).min(n), ..];
        let block = a.slice(rows).dot(&b.slice(rows).t());
        result.extend((0..block.nrows()).map(|r| block[[r, r]]));
    }
    result
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "fma"))]
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

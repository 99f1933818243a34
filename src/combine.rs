//! Step 5, combine: the output is the weighted sum of value rows,
//! `output[b, i, :] = Σ_j weights[b, i, j] · value[b, j, :]`. Keras's `matmul(weights, value)`.
//!
//! Shapes: weights `(B, Tq, Tv)`, value `(B, Tv, Dv)`, output `(B, Tq, Dv)`. Each output row is
//! accumulated over j in order, as a sequence of `axpy`s over contiguous value rows, so the
//! compiler vectorises along Dv and the bits never depend on the thread count.

use ndarray::{Array3, ArrayView2, ArrayView3, Axis};

use crate::error::{AttentionError, Result};
use crate::float::Float;
use crate::shape::rows_contiguous;

/// One output row: `out = Σ_j weights[j] · value[j, :]`. `value` is `(Tv, Dv)` with contiguous
/// rows; `out` has length Dv and is overwritten.
#[inline]
pub(crate) fn combine_row<T: Float>(weights: &[T], value: ArrayView2<'_, T>, out: &mut [T]) {
    debug_assert_eq!(weights.len(), value.nrows());
    out.fill(T::zero());
    for (&w, v) in weights.iter().zip(value.rows()) {
        let v = v.to_slice().expect("value rows are contiguous");
        for (o, &x) in out.iter_mut().zip(v) {
            *o = *o + w * x;
        }
    }
}

/// `weights (B, Tq, Tv) × value (B, Tv, Dv) → (B, Tq, Dv)`.
///
/// # Errors
/// [`AttentionError::Mismatch`] when B or Tv differ;
/// [`AttentionError::TooLarge`] when the output does not fit in memory.
pub fn combine<T: Float>(
    weights: ArrayView3<'_, T>,
    value: ArrayView3<'_, T>,
) -> Result<Array3<T>> {
    let ((b, tq, tv), (bv, tvv, dv)) = (weights.dim(), value.dim());
    if b != bv || tv != tvv {
        return Err(AttentionError::Mismatch {
            arg: "value",
            shape: value.shape().to_vec(),
            other: "weights",
            other_shape: weights.shape().to_vec(),
            rule: "weights (B, Tq, Tv) need value (B, Tv, Dv)",
        });
    }
    let (weights, value) = (rows_contiguous(weights), rows_contiguous(value));
    let mut out = crate::alloc::zeros::<T>([b, tq, dv], "output")?;
    for (bi, mut ob) in out.axis_iter_mut(Axis(0)).enumerate() {
        for (i, mut row) in ob.axis_iter_mut(Axis(0)).enumerate() {
            let w = weights.slice(ndarray::s![bi, i, ..]);
            let w = w.to_slice().expect("weight rows are contiguous");
            let row = row.as_slice_mut().expect("fresh arrays are contiguous");
            combine_row(w, value.index_axis(Axis(0), bi), row);
        }
    }
    Ok(out)
}

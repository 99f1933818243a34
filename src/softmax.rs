//! Step 3, softmax over the keys: `weights[i, j] = e^(s_ij - max_j s) / Σ_j e^(s_ij - max_j s)`.
//!
//! The readable reference, written as Keras's NumPy backend computes it: subtract the row's
//! maximum (so `exp` never overflows), exponentiate, divide each term by the sum (a division,
//! not a multiplication by the reciprocal, to round as Keras does). NaN anywhere in a row makes
//! the whole row NaN, as in NumPy.

use ndarray::{ArrayViewMut3, Axis};

use crate::float::Float;

/// Softmax of one row in place. An empty row stays empty.
#[inline]
pub(crate) fn softmax_row<T: Float>(row: &mut [T]) {
    // NaN never wins `x > m`, but it makes `x - m`, then the sum, then every weight NaN.
    let max = row
        .iter()
        .fold(T::neg_infinity(), |m, &x| if x > m { x } else { m });
    let mut sum = T::zero();
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum = sum + *x;
    }
    for x in row.iter_mut() {
        *x = *x / sum;
    }
}

/// Softmax over the last axis of scores `(B, Tq, Tv)`, in place.
pub fn softmax_rows<T: Float>(mut scores: ArrayViewMut3<'_, T>) {
    for mut row in scores.lanes_mut(Axis(2)) {
        match row.as_slice_mut() {
            Some(s) => softmax_row(s),
            None => {
                let mut buf = row.to_vec();
                softmax_row(&mut buf);
                row.assign(&ndarray::ArrayView1::from(&buf));
            }
        }
    }
}

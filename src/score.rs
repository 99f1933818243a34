//! Step 1, scores: how well each query row matches each key row. Keras's `_calculate_scores`.
//!
//! - dot: `scores[b, i, j] = Σ_d query[b, i, d] · key[b, j, d]`, then `× scale` when set.
//! - concat: `scores[b, i, j] = concat_score_weight · Σ_d tanh(scale · (query[b, i, d] + key[b, j, d]))`
//!   (no `scale ·` when unset), computed row by row without ever building Keras's
//!   `(B, Tq, Tv, D)` tensor.
//!
//! Shapes: query `(B, Tq, D)`, key `(B, Tv, D)`, scores `(B, Tq, Tv)`. The operations and their
//! order follow Keras's float32 arithmetic (product, then scale; add, scale, tanh, sum, weight).

use ndarray::{Array3, ArrayView2, ArrayView3, Axis};

use crate::config::{Attention, ScoreMode};
use crate::error::Result;
use crate::float::Float;
use crate::shape::{self, rows_contiguous};

/// The score settings, rounded to the compute type.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScoreParams<T> {
    pub mode: ScoreMode,
    pub scale: Option<T>,
    pub concat_score_weight: T,
    /// Subtracted from masked scores (`Attention::mask_bias`, else `T::MASK_BIAS`).
    pub mask_bias: T,
}

impl<T: Float> ScoreParams<T> {
    pub fn of(attn: &Attention) -> Self {
        ScoreParams {
            mode: attn.mode,
            scale: attn.scale.map(T::of),
            concat_score_weight: T::of(attn.concat_score_weight),
            mask_bias: attn.mask_bias.map_or(T::MASK_BIAS, T::of),
        }
    }
}

/// The dot product of two equal-length slices, accumulated in 8 independent lanes (so the
/// compiler can vectorise it) that are summed in a fixed order: the same bits on every call.
#[inline]
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [T::zero(); 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] = lanes[l] + x[l] * y[l];
        }
    }
    let mut tail = T::zero();
    for (&x, &y) in ar.iter().zip(br) {
        tail = tail + x * y;
    }
    let quads = [
        lanes[0] + lanes[4],
        lanes[1] + lanes[5],
        lanes[2] + lanes[6],
        lanes[3] + lanes[7],
    ];
    ((quads[0] + quads[2]) + (quads[1] + quads[3])) + tail
}

/// Scores of one query row against every key row: `out[j] = score(query, key[j])`.
/// `key` is `(Tv, D)` with contiguous rows; `out` has length Tv.
#[inline]
pub(crate) fn score_row<T: Float>(
    p: &ScoreParams<T>,
    query: &[T],
    key: ArrayView2<'_, T>,
    out: &mut [T],
) {
    debug_assert_eq!(out.len(), key.nrows());
    for (o, k) in out.iter_mut().zip(key.rows()) {
        let k = k.to_slice().expect("key rows are contiguous");
        *o = match p.mode {
            ScoreMode::Dot => {
                let s = dot(query, k);
                p.scale.map_or(s, |scale| s * scale)
            }
            ScoreMode::Concat => {
                let mut sum = T::zero();
                for (&q, &kd) in query.iter().zip(k) {
                    let x = q + kd;
                    sum = sum + p.scale.map_or(x, |scale| scale * x).tanh();
                }
                p.concat_score_weight * sum
            }
        };
    }
}

/// The raw scores `(B, Tq, Tv)` of query `(B, Tq, D)` against key `(B, Tv, D)`, before any mask.
///
/// # Errors
/// [`AttentionError::Mismatch`](crate::AttentionError::Mismatch) when B or D differ;
/// [`AttentionError::TooLarge`](crate::AttentionError::TooLarge) when the scores don't fit.
pub fn scores<T: Float>(
    attn: &Attention,
    query: ArrayView3<'_, T>,
    key: ArrayView3<'_, T>,
) -> Result<Array3<T>> {
    let dims = shape::check_qkv(query.shape(), key.shape(), Some(key.shape()))?;
    let p = ScoreParams::of(attn);
    let (query, key) = (rows_contiguous(query), rows_contiguous(key));
    let mut out = crate::alloc::zeros::<T>([dims.batch, dims.tq, dims.tv], "scores")?;
    for (b, mut sb) in out.axis_iter_mut(Axis(0)).enumerate() {
        for (i, mut row) in sb.axis_iter_mut(Axis(0)).enumerate() {
            let q = query.slice(ndarray::s![b, i, ..]);
            let q = q.to_slice().expect("query rows are contiguous");
            let row = row.as_slice_mut().expect("fresh arrays are contiguous");
            score_row(&p, q, key.index_axis(Axis(0), b), row);
        }
    }
    Ok(out)
}

//! Step 2, the score mask: which keys each query row may attend to. Keras's
//! `_calculate_score_mask` and the masking half of `_apply_scores`.
//!
//! - value mask `(B, Tv)`: key j is visible to every query row of its batch element when true;
//!   or a full score mask `(B, Tq, Tv)`: entry `(i, j)` says whether row i sees key j;
//! - causal (top-left): row i sees keys `j <= i`, also when Tq != Tv; ANDed with the value mask;
//! - query mask `(B, Tq)`: applied after `combine`, it sets output rows to exactly 0 and leaves
//!   the returned scores alone, as Keras's `where(q_mask, output, 0)`.
//!
//! Masked scores become `s - 1e9` in the compute type, not `-inf`, exactly as Keras: a row whose
//! keys are all masked then still has finite weights (the softmax of the scores rounded to the
//! float spacing near 1e9, usually uniform), where `-inf` would give NaN.

use ndarray::{ArrayView1, ArrayView2, ArrayView3, ArrayViewMut3, Axis};

use crate::error::{AttentionError, Result};
use crate::float::Float;

/// Which keys may be attended to: per key, or per (query row, key).
#[derive(Debug, Clone)]
pub enum ValueMask<'a> {
    /// `(B, Tv)`: key j of batch element b is visible to all its query rows when true.
    Keys(ArrayView2<'a, bool>),
    /// `(B, Tq, Tv)`: query row i of batch element b sees key j when true.
    Scores(ArrayView3<'a, bool>),
}

/// The masks of one 3-D call. `Masks::default()` masks nothing.
#[derive(Debug, Clone, Default)]
pub struct Masks<'a> {
    /// `(B, Tq)`: output rows where this is false are set to 0.
    pub query: Option<ArrayView2<'a, bool>>,
    /// The value (key) mask or full score mask.
    pub value: Option<ValueMask<'a>>,
    /// Top-left causal mask: query row i sees keys `j <= i`.
    pub causal: bool,
}

impl<'a> Masks<'a> {
    /// The keys row `i` of batch element `b` may see, as stored (`None`: all of them; the causal
    /// limit is applied separately).
    #[inline]
    pub(crate) fn keys_of_row(&self, b: usize, i: usize) -> Option<ArrayView1<'_, bool>> {
        match &self.value {
            None => None,
            Some(ValueMask::Keys(m)) => Some(m.row(b)),
            Some(ValueMask::Scores(m)) => Some(m.slice(ndarray::s![b, i, ..])),
        }
    }

    /// Whether output row `i` of batch element `b` is kept by the query mask.
    #[inline]
    pub(crate) fn query_keeps(&self, b: usize, i: usize) -> bool {
        self.query.as_ref().is_none_or(|m| m[[b, i]])
    }

    /// The shapes of the masks, for `shape::check_masks`.
    pub(crate) fn shapes(&self) -> (Option<&[usize]>, Option<&[usize]>) {
        let value = self.value.as_ref().map(|v| match v {
            ValueMask::Keys(m) => m.shape(),
            ValueMask::Scores(m) => m.shape(),
        });
        (self.query.as_ref().map(|m| m.shape()), value)
    }
}

/// Masks one row of scores in place: `s - 1e9` where the key is masked out by `keys` or, when
/// `causal_row` is `Some(i)`, where `j > i`.
#[inline(always)]
pub(crate) fn mask_row<T: Float>(
    row: &mut [T],
    keys: Option<ArrayView1<'_, bool>>,
    causal_row: Option<usize>,
    bias: T,
) {
    mask_cols(row, 0, keys, causal_row, bias)
}

/// As [`mask_row`] for the columns `j0 .. j0 + part.len()` of a row, held in `part`.
#[inline(always)]
pub(crate) fn mask_cols<T: Float>(
    part: &mut [T],
    j0: usize,
    keys: Option<ArrayView1<'_, bool>>,
    causal_row: Option<usize>,
    bias: T,
) {
    let end = j0 + part.len();
    let visible_end = causal_row.map_or(end, |i| (i + 1).clamp(j0, end));
    let (visible, hidden) = part.split_at_mut(visible_end - j0);
    if let Some(keys) = keys {
        let keys = keys.slice_move(ndarray::s![j0..visible_end]);
        let bias = |s: T, keep: bool| if keep { s } else { s - bias };
        match keys.as_slice() {
            // Branch-free over a contiguous mask, so the compiler vectorises it.
            Some(k) => visible
                .iter_mut()
                .zip(k)
                .for_each(|(s, &keep)| *s = bias(*s, keep)),
            None => visible
                .iter_mut()
                .zip(keys.iter())
                .for_each(|(s, &keep)| *s = bias(*s, keep)),
        }
    }
    for s in hidden {
        *s = *s - bias;
    }
}

/// Applies the value (or full score) mask and the causal mask to scores `(B, Tq, Tv)` in place.
///
/// # Errors
/// [`AttentionError::Mismatch`] when a mask's shape does not fit the scores.
pub fn apply_score_mask<T: Float>(
    mut scores: ArrayViewMut3<'_, T>,
    masks: &Masks<'_>,
) -> Result<()> {
    let (b, tq, tv) = scores.dim();
    let dims = crate::shape::Dims {
        batch: b,
        tq,
        tv,
        d: 0,
        dv: 0,
    };
    let (qm, vm) = masks.shapes();
    crate::shape::check_masks(&dims, qm, vm)?;
    for (bi, mut sb) in scores.axis_iter_mut(Axis(0)).enumerate() {
        for (i, mut row) in sb.axis_iter_mut(Axis(0)).enumerate() {
            let mut buf = row.to_vec();
            mask_row(
                &mut buf,
                masks.keys_of_row(bi, i),
                masks.causal.then_some(i),
                T::MASK_BIAS,
            );
            row.assign(&ArrayView1::from(&buf));
        }
    }
    Ok(())
}

/// Sets output rows `(B, Tq, Dv)` to 0 where the query mask `(B, Tq)` is false.
///
/// # Errors
/// [`AttentionError::Mismatch`] when the mask is not `(B, Tq)`.
pub fn apply_query_mask<T: Float>(
    mut output: ArrayViewMut3<'_, T>,
    query_mask: ArrayView2<'_, bool>,
) -> Result<()> {
    let (b, tq, _) = output.dim();
    if query_mask.dim() != (b, tq) {
        return Err(AttentionError::Mismatch {
            arg: "query_mask",
            shape: query_mask.shape().to_vec(),
            other: "output",
            other_shape: output.shape().to_vec(),
            rule: "the query mask must be (B, Tq)",
        });
    }
    for ((bi, i), &keep) in query_mask.indexed_iter() {
        if !keep {
            output.slice_mut(ndarray::s![bi, i, ..]).fill(T::zero());
        }
    }
    Ok(())
}

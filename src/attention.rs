//! The orchestration: one entry point, [`Attention::forward`], that runs the five steps of
//! Keras's `Attention.call` for every query row — scores, score mask, softmax, dropout, combine,
//! then the query mask — in parallel over blocks of rows.
//!
//! Shapes: query `(B, Tq, D)`, value `(B, Tv, Dv)`, key `(B, Tv, D)` (defaults to value); output
//! `(B, Tq, Dv)`, scores `(B, Tq, Tv)`. [`Attention::forward_nd`] takes any number of leading
//! batch dims (also none) and folds them with `shape::fold`.
//!
//! Each output row is computed start to finish by one thread, with one row of scores in a
//! per-thread scratch buffer (or straight in the returned scores array), so the bits of every
//! result are the same for any thread count and any block size.

use ndarray::{
    Array3, ArrayD, ArrayView3, ArrayViewD, ArrayViewMut3, Axis, CowArray, Ix2, Ix3, IxDyn,
};
use rayon::prelude::*;

use crate::combine::combine_row;
use crate::config::Attention;
use crate::dropout::{dropout_row, DropoutMask};
use crate::error::{AttentionError, Result};
use crate::float::Float;
use crate::mask::{mask_row, Masks, ValueMask};
use crate::score::{score_row, ScoreParams};
use crate::shape::{self, checked_len, fold, rows_contiguous, Shapes};
use crate::softmax::softmax_row;

/// Below this many floating-point operations a call runs on the calling thread: handing work to
/// the pool costs a few microseconds, more than the whole computation.
const SERIAL_FLOPS: usize = 1 << 20;
/// The most rows one work item holds; smaller items when there are few rows, so both cores work.
const MAX_ROWS_PER_ITEM: usize = 64;

/// What a 3-D call returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Output<T> {
    /// `(B, Tq, Dv)`.
    pub output: Array3<T>,
    /// `(B, Tq, Tv)`: the attention weights after masking, softmax and dropout, when asked for.
    pub scores: Option<Array3<T>>,
}

/// What an N-D call returns.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputNd<T> {
    /// `(..., Tq, Dv)`.
    pub output: ArrayD<T>,
    /// `(..., Tq, Tv)`, when asked for.
    pub scores: Option<ArrayD<T>>,
}

/// The masks of an N-D call, before folding. `MasksNd::default()` masks nothing.
#[derive(Debug, Clone, Default)]
pub struct MasksNd<'a> {
    /// `(..., Tq)`, broadcasting to the batch dims.
    pub query: Option<ArrayViewD<'a, bool>>,
    /// `(..., Tv)` per key, or `(..., Tq, Tv)` full score mask (as many dims as the scores).
    pub value: Option<ArrayViewD<'a, bool>>,
    /// Top-left causal mask.
    pub causal: bool,
}

/// A zero-filled array, or [`AttentionError::TooLarge`] when it cannot be allocated (instead of
/// the abort an ordinary allocation failure would be).
pub(crate) fn zeros<T: Float>(shape: [usize; 3], what: &'static str) -> Result<Array3<T>> {
    let n = checked_len(&shape, what)?;
    let mut data = Vec::new();
    data.try_reserve_exact(n)
        .map_err(|_| AttentionError::TooLarge {
            what,
            shape: shape.to_vec(),
        })?;
    data.resize(n, T::zero());
    Ok(Array3::from_shape_vec(shape, data).expect("length matches shape"))
}

/// Everything a row needs, borrowed for the call.
struct Rows<'a, 'm, T> {
    query: ArrayView3<'a, T>,
    key: ArrayView3<'a, T>,
    value: ArrayView3<'a, T>,
    masks: &'a Masks<'m>,
    params: ScoreParams<T>,
    dropout: Option<(DropoutMask, T)>,
    tq: usize,
}

impl<T: Float> Rows<'_, '_, T> {
    /// Flat row `r` (batch element `r / Tq`, query row `r % Tq`): scores into `scores` (length
    /// Tv), the weighted sum into `out` (length Dv).
    #[inline]
    fn run(&self, r: usize, scores: &mut [T], out: &mut [T]) {
        let (b, i) = (r / self.tq, r % self.tq);
        let q = self.query.slice(ndarray::s![b, i, ..]);
        let q = q.to_slice().expect("query rows are contiguous");
        score_row(&self.params, q, self.key.index_axis(Axis(0), b), scores);
        mask_row(
            scores,
            self.masks.keys_of_row(b, i),
            self.masks.causal.then_some(i),
        );
        softmax_row(scores);
        if let Some((mask, keep_prob)) = &self.dropout {
            let first = (r * scores.len()) as u64;
            dropout_row(scores.iter_mut(), mask, *keep_prob, first);
        }
        if self.masks.query_keeps(b, i) {
            combine_row(scores, self.value.index_axis(Axis(0), b), out);
        } else {
            // Keras's `where(query_mask, output, 0)`: exactly 0, even where the row was NaN.
            out.fill(T::zero());
        }
    }
}

impl Attention {
    /// Runs attention on 3-D views: query `(B, Tq, D)`, value `(B, Tv, Dv)`, key `(B, Tv, D)`
    /// (`None`: the value is the key). Views may have any strides.
    ///
    /// Returns the output `(B, Tq, Dv)` and, when [`return_scores`](Attention::return_scores) is
    /// set, the weights `(B, Tq, Tv)`.
    ///
    /// # Errors
    /// [`AttentionError::Mismatch`] when shapes disagree (the message names both arguments and
    /// their shapes); [`AttentionError::Config`] for a dropout rate outside `[0, 1)`;
    /// [`AttentionError::TooLarge`] when the results cannot be allocated.
    pub fn forward<T: Float>(
        &self,
        query: ArrayView3<'_, T>,
        value: ArrayView3<'_, T>,
        key: Option<ArrayView3<'_, T>>,
        masks: &Masks<'_>,
    ) -> Result<Output<T>> {
        self.validate()?;
        let dims = shape::check_qkv(
            query.shape(),
            value.shape(),
            key.as_ref().map(|k| k.shape()),
        )?;
        let (qm, vm) = masks.shapes();
        shape::check_masks(&dims, qm, vm)?;
        let (query, value) = (rows_contiguous(query), rows_contiguous(value));
        let key = key.map(rows_contiguous);
        let mut output = zeros::<T>([dims.batch, dims.tq, dims.dv], "output")?;
        let mut scores = match self.return_scores {
            true => Some(zeros::<T>([dims.batch, dims.tq, dims.tv], "scores")?),
            false => None,
        };
        let rows = Rows {
            query: query.view(),
            key: key.as_ref().map_or(value.view(), |k| k.view()),
            value: value.view(),
            masks,
            params: ScoreParams::of(self),
            dropout: self
                .active_dropout()
                .map(|d| (DropoutMask::new(&d), T::of(1.0 - d.rate))),
            tq: dims.tq,
        };
        let flops = (dims.batch * dims.tq)
            .saturating_mul(dims.tv)
            .saturating_mul(2 * (dims.d + dims.dv) + 8);
        run_rows(
            &rows,
            flops,
            output.view_mut(),
            scores.as_mut().map(|s| s.view_mut()),
        )?;
        Ok(Output { output, scores })
    }

    /// Runs attention on N-D views: query `(..., Tq, D)`, value `(..., Tv, Dv)`, key
    /// `(..., Tv, D)`, with any number of leading batch dims (also none) that broadcast
    /// NumPy-style; masks as in [`MasksNd`].
    ///
    /// # Errors
    /// As [`forward`](Attention::forward), plus [`AttentionError::Rank`] and
    /// [`AttentionError::Broadcast`] from [`shape::plan`].
    pub fn forward_nd<T: Float>(
        &self,
        query: ArrayViewD<'_, T>,
        value: ArrayViewD<'_, T>,
        key: Option<ArrayViewD<'_, T>>,
        masks: &MasksNd<'_>,
    ) -> Result<OutputNd<T>> {
        let plan = shape::plan(Shapes {
            query: query.shape(),
            value: value.shape(),
            key: key.as_ref().map(|k| k.shape()),
            query_mask: masks.query.as_ref().map(|m| m.shape()),
            value_mask: masks.value.as_ref().map(|m| m.shape()),
        })?;
        let batch = &plan.batch_shape;
        let q: CowArray<'_, T, Ix3> = fold(&query, batch, 2);
        let v: CowArray<'_, T, Ix3> = fold(&value, batch, 2);
        let k: Option<CowArray<'_, T, Ix3>> = key.as_ref().map(|k| fold(k, batch, 2));
        let qm: Option<CowArray<'_, bool, Ix2>> = masks.query.as_ref().map(|m| fold(m, batch, 1));
        let full = plan.full_score_mask;
        let keys_mask: Option<CowArray<'_, bool, Ix2>> = masks
            .value
            .as_ref()
            .filter(|_| !full)
            .map(|m| fold(m, batch, 1));
        let score_mask: Option<CowArray<'_, bool, Ix3>> = masks
            .value
            .as_ref()
            .filter(|_| full)
            .map(|m| fold(m, batch, 2));
        let value_mask = match (&keys_mask, &score_mask) {
            (Some(m), _) => Some(ValueMask::Keys(m.view())),
            (_, Some(m)) => Some(ValueMask::Scores(m.view())),
            _ => None,
        };
        let folded = Masks {
            query: qm.as_ref().map(|m| m.view()),
            value: value_mask,
            causal: masks.causal,
        };
        let out = self.forward(q.view(), v.view(), k.as_ref().map(|k| k.view()), &folded)?;
        let reshape = |a: Array3<T>, shape: Vec<usize>| {
            a.into_shape_with_order(IxDyn(&shape))
                .expect("fresh arrays are in standard layout")
        };
        Ok(OutputNd {
            output: reshape(out.output, plan.output_shape()),
            scores: out.scores.map(|s| reshape(s, plan.scores_shape())),
        })
    }
}

/// Runs every row, on the calling thread for small calls, else on the pool in blocks of rows.
fn run_rows<T: Float>(
    rows: &Rows<'_, '_, T>,
    flops: usize,
    output: ArrayViewMut3<'_, T>,
    scores: Option<ArrayViewMut3<'_, T>>,
) -> Result<()> {
    let (b, tq, dv) = output.dim();
    let tv = rows.key.dim().1;
    let n = b * tq;
    let mut out2 = output
        .into_shape_with_order((n, dv))
        .expect("fresh arrays are in standard layout");
    let mut sc2 = scores.map(|s| {
        s.into_shape_with_order((n, tv))
            .expect("fresh arrays are in standard layout")
    });
    let pool = crate::pool::pool()?;
    let threads = pool.current_num_threads();
    let serial = flops < SERIAL_FLOPS || threads == 1;
    // Enough items for load balance (8 per thread); the split never changes the results.
    let per_item = if serial {
        n.max(1)
    } else {
        n.div_ceil(8 * threads).clamp(1, MAX_ROWS_PER_ITEM)
    };
    let outs: Vec<_> = out2.axis_chunks_iter_mut(Axis(0), per_item).collect();
    let scs: Vec<Option<_>> = match sc2.as_mut() {
        Some(s) => s
            .axis_chunks_iter_mut(Axis(0), per_item)
            .map(Some)
            .collect(),
        None => outs.iter().map(|_| None).collect(),
    };
    let work =
        |scratch: &mut Vec<T>,
         (item, (mut out, sc)): (usize, (ArrayViewMut2<T>, Option<ArrayViewMut2<T>>))| {
            let first = item * per_item;
            match sc {
                Some(mut sc) => {
                    for (k, (mut o, mut s)) in
                        out.rows_mut().into_iter().zip(sc.rows_mut()).enumerate()
                    {
                        let (o, s) = (
                            o.as_slice_mut().expect("contiguous"),
                            s.as_slice_mut().expect("contiguous"),
                        );
                        rows.run(first + k, s, o);
                    }
                }
                None => {
                    for (k, mut o) in out.rows_mut().into_iter().enumerate() {
                        rows.run(first + k, scratch, o.as_slice_mut().expect("contiguous"));
                    }
                }
            }
        };
    let scratch = || vec![T::zero(); tv];
    if serial {
        let mut buf = scratch();
        outs.into_iter()
            .zip(scs)
            .enumerate()
            .for_each(|it| work(&mut buf, it));
    } else {
        pool.install(|| {
            outs.into_par_iter()
                .zip(scs)
                .enumerate()
                .for_each_init(scratch, work)
        });
    }
    Ok(())
}

use ndarray::ArrayViewMut2;

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

use std::mem::MaybeUninit;

use ndarray::{
    Array3, ArrayD, ArrayView3, ArrayViewD, ArrayViewMut2, ArrayViewMut3, Axis, CowArray, Ix2, Ix3,
    IxDyn,
};

use crate::alloc::{init, uninit};
use crate::config::Attention;
use crate::dispatch;
use crate::dropout::DropoutMask;
use crate::error::Result;
use crate::float::Float;
use crate::kernel::plan::{self, call_threads, Route};
use crate::kernel::{Ctx, Item, KeyCache};
use crate::mask::{Masks, ValueMask};
use crate::score::ScoreParams;
use crate::shape::{self, fold, rows_contiguous, Dims, Shapes};

/// What a 3-D call returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Output<T> {
    /// `(B, Tq, Dv)`.
    pub output: Array3<T>,
    /// `(B, Tq, Tv)`: the attention weights after masking, softmax and dropout, when asked for.
    pub scores: Option<Array3<T>>,
}

/// What [`Attention::forward_saved`] returns: the output and what the backward needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved<T> {
    /// `(B, Tq, Dv)`, as `forward` returns it.
    pub output: Array3<T>,
    /// `(B, Tq, 2)`: each row's max and `ln Σ e^(x - max)` over its masked scores `x`.
    pub stats: Array3<T>,
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

/// A 3-D call's inputs after the checks: rows contiguous, strides non-negative.
pub(crate) type Checked<'a, T> = (
    Dims,
    CowArray<'a, T, Ix3>,
    CowArray<'a, T, Ix3>,
    Option<CowArray<'a, T, Ix3>>,
);

impl Attention {
    /// Validates the settings and every shape of a 3-D call (one place for `forward` and
    /// `backward`), and lays the inputs out as the kernels read them.
    pub(crate) fn checked<'a, T: Float>(
        &self,
        query: ArrayView3<'a, T>,
        value: ArrayView3<'a, T>,
        key: Option<ArrayView3<'a, T>>,
        masks: &Masks<'_>,
    ) -> Result<Checked<'a, T>> {
        self.validate()?;
        let dims = shape::check_qkv(
            query.shape(),
            value.shape(),
            key.as_ref().map(|k| k.shape()),
        )?;
        let (qm, vm) = masks.shapes();
        shape::check_masks(&dims, qm, vm)?;
        Ok((
            dims,
            rows_contiguous(query),
            rows_contiguous(value),
            key.map(rows_contiguous),
        ))
    }

    /// Runs attention on 3-D views: query `(B, Tq, D)`, value `(B, Tv, Dv)`, key `(B, Tv, D)`
    /// (`None`: the value is the key). Views may have any strides.
    ///
    /// Returns the output `(B, Tq, Dv)` and, when [`return_scores`](Attention::return_scores) is
    /// set, the weights `(B, Tq, Tv)`.
    ///
    /// # Errors
    /// [`AttentionError::Mismatch`](crate::AttentionError::Mismatch) when shapes disagree (the
    /// message names both arguments and their shapes);
    /// [`AttentionError::Config`](crate::AttentionError::Config) for a dropout rate outside
    /// `[0, 1)`; [`AttentionError::TooLarge`](crate::AttentionError::TooLarge) when the results
    /// cannot be allocated.
    pub fn forward<T: Float>(
        &self,
        query: ArrayView3<'_, T>,
        value: ArrayView3<'_, T>,
        key: Option<ArrayView3<'_, T>>,
        masks: &Masks<'_>,
    ) -> Result<Output<T>> {
        Ok(self.run(query, value, key, masks, false)?.0)
    }

    /// [`forward`](Attention::forward) that also keeps what the backward needs: each row's
    /// softmax statistics `(B, Tq, 2)` (the max and `ln Σ e^(x - max)` of its masked scores). The
    /// weights are not returned (`return_scores` is ignored): pass the result to
    /// [`backward_saved`](Attention::backward_saved), which recomputes them block by block.
    ///
    /// # Errors
    /// As [`forward`](Attention::forward).
    pub fn forward_saved<T: Float>(
        &self,
        query: ArrayView3<'_, T>,
        value: ArrayView3<'_, T>,
        key: Option<ArrayView3<'_, T>>,
        masks: &Masks<'_>,
    ) -> Result<Saved<T>> {
        let attn = self.clone().return_scores(false);
        let (out, stats) = attn.run(query, value, key, masks, true)?;
        Ok(Saved {
            output: out.output,
            stats: stats.expect("asked for"),
        })
    }

    /// The forward, with the row statistics when `want_stats`.
    fn run<T: Float>(
        &self,
        query: ArrayView3<'_, T>,
        value: ArrayView3<'_, T>,
        key: Option<ArrayView3<'_, T>>,
        masks: &Masks<'_>,
        want_stats: bool,
    ) -> Result<(Output<T>, Option<Array3<T>>)> {
        let (dims, query, value, key) = self.checked(query, value, key, masks)?;
        let pool = crate::pool::pool()?;
        let threads = call_threads(dims, pool.current_num_threads());
        let parallel = threads > 1;
        if parallel {
            crate::pool::wake(&pool);
        }
        // Uninitialised: each work item writes its own rows (in parallel, while they are in
        // cache; the tile path without zeroing them first), instead of this thread zeroing them
        // all first.
        let mut output = uninit::<T>([dims.batch, dims.tq, dims.dv], "output")?;
        let mut scores = match self.return_scores {
            true => Some(uninit::<T>([dims.batch, dims.tq, dims.tv], "scores")?),
            false => None,
        };
        let mut stats = match want_stats {
            true => Some(uninit::<T>([dims.batch, dims.tq, 2], "row statistics")?),
            false => None,
        };
        let Route { isa, rows, flash } = self.route::<T>(dims, masks.causal, threads);
        let ctx = Ctx {
            query: query.view(),
            key: key.as_ref().map_or(value.view(), |k| k.view()),
            value: value.view(),
            masks,
            params: ScoreParams::of(self),
            dropout: self
                .active_dropout()
                .map(|d| (DropoutMask::new(&d), T::of(1.0 - d.rate))),
            dims,
            isa,
            normalize: self.return_scores,
            item_rows: rows,
            flash,
            call: crate::kernel::next_call(),
        };
        run_items(
            &ctx,
            parallel.then_some(&*pool),
            Outputs {
                output: output.view_mut(),
                scores: scores.as_mut().map(|s| s.view_mut()),
                stats: stats.as_mut().map(|s| s.view_mut()),
            },
        );
        // SAFETY: the work items cover every row of the three arrays (`run_items` splits all
        // B · Tq rows among them); each initialises its statistics rows (`init`) before the
        // kernel writes them, and its output and scores rows are written in full by the item
        // (`dispatch::attend_block`: the tile path's copy-out, the packed product and a zeroed
        // tail, or `init`); or the split-keys path took the call (no scores array) and its merge
        // writes every element of the output and the statistics (`kernel::run_split`).
        let (output, scores, stats) = unsafe {
            (
                output.assume_init(),
                scores.map(|s| s.assume_init()),
                stats.map(|s| s.assume_init()),
            )
        };
        Ok((Output { output, scores }, stats))
    }

    /// The kernel family a call with these sizes runs its work items on, with the pool's
    /// current thread count: on a CPU with AMX, [`Isa::Amx`](crate::Isa::Amx) only for the
    /// float32 dot-score calls that pass the tile gate (the rest run on AVX-512); float64 runs
    /// the portable path ([`Isa::Scalar`](crate::Isa::Scalar)). A block whose inputs the tiles
    /// cannot split exactly (inf, NaN, |x| >= 2^127) still falls back to AVX-512 at run time.
    /// Half-precision calls run as float32 (`T = f32`). For reports such as `python -m luong`.
    pub fn planned_isa<T: Float>(&self, dims: Dims, causal: bool) -> crate::Isa {
        match dispatch::is_f32::<T>() {
            true => {
                self.route::<T>(dims, causal, call_threads(dims, crate::num_threads()))
                    .isa
            }
            false => crate::Isa::Scalar,
        }
    }

    /// How a call of `dims` on `threads` threads runs (`kernel::plan::route`).
    fn route<T: Float>(&self, dims: Dims, causal: bool, threads: usize) -> Route {
        plan::route::<T>(plan::Call {
            isa: self.effective_isa(),
            requested: self.isa,
            mode: self.mode,
            dims,
            weights: self.return_scores,
            dropout: self.active_dropout().is_some(),
            causal,
            threads,
        })
    }

    /// Runs attention on N-D views: query `(..., Tq, D)`, value `(..., Tv, Dv)`, key
    /// `(..., Tv, D)`, with any number of leading batch dims (also none) that broadcast
    /// NumPy-style; masks as in [`MasksNd`].
    ///
    /// # Errors
    /// As [`forward`](Attention::forward), plus
    /// [`AttentionError::Rank`](crate::AttentionError::Rank) and
    /// [`AttentionError::Broadcast`](crate::AttentionError::Broadcast) from [`shape::plan`].
    pub fn forward_nd<T: Float>(
        &self,
        query: ArrayViewD<'_, T>,
        value: ArrayViewD<'_, T>,
        key: Option<ArrayViewD<'_, T>>,
        masks: &MasksNd<'_>,
    ) -> Result<OutputNd<T>> {
        with_folded(query, value, key, masks, |plan, call| {
            let out = self.forward(call.query, call.value, call.key, call.masks)?;
            Ok(OutputNd {
                output: unfold(out.output, plan.output_shape()),
                scores: out.scores.map(|s| unfold(s, plan.scores_shape())),
            })
        })
    }
}

/// A 3-D call, folded from an N-D one.
pub(crate) struct Folded<'v, 'm, T> {
    pub query: ArrayView3<'v, T>,
    pub value: ArrayView3<'v, T>,
    pub key: Option<ArrayView3<'v, T>>,
    pub masks: &'v Masks<'m>,
}

/// Plans an N-D call (`shape::plan`), folds its leading dims into one batch axis (views where
/// the strides allow, copies otherwise) and runs `f` on the 3-D call.
pub(crate) fn with_folded<T: Float, R>(
    query: ArrayViewD<'_, T>,
    value: ArrayViewD<'_, T>,
    key: Option<ArrayViewD<'_, T>>,
    masks: &MasksNd<'_>,
    f: impl FnOnce(&shape::Plan, Folded<'_, '_, T>) -> Result<R>,
) -> Result<R> {
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
    let call = Folded {
        query: q.view(),
        value: v.view(),
        key: k.as_ref().map(|k| k.view()),
        masks: &folded,
    };
    f(&plan, call)
}

/// A fresh `(B, ...)` result reshaped to its N-D shape (no copy: fresh arrays are standard).
pub(crate) fn unfold<T, D: ndarray::Dimension>(
    a: ndarray::Array<T, D>,
    shape: Vec<usize>,
) -> ArrayD<T> {
    a.into_shape_with_order(IxDyn(&shape))
        .expect("fresh arrays are in standard layout")
}

/// Splits the rows into work items (blocks of query rows of one batch element) and runs them,
/// on the pool when given, else on the calling thread. The split never changes the results.
/// The arrays a forward writes: output, and optionally the weights and the row statistics.
struct Outputs<'a, T> {
    output: ArrayViewMut3<'a, MaybeUninit<T>>,
    scores: Option<ArrayViewMut3<'a, MaybeUninit<T>>>,
    stats: Option<ArrayViewMut3<'a, MaybeUninit<T>>>,
}

/// Splits `rest` (rows of a 2-D array, when present) after its first `rows` rows.
fn take_rows<'a, T>(
    rest: &mut Option<ArrayViewMut2<'a, T>>,
    rows: usize,
) -> Option<ArrayViewMut2<'a, T>> {
    rest.take().map(|s| {
        let (head, tail) = s.split_at(Axis(0), rows);
        *rest = Some(tail);
        head
    })
}

fn run_items<T: Float>(
    ctx: &Ctx<'_, '_, T>,
    pool: Option<&rayon::ThreadPool>,
    mut outs: Outputs<'_, T>,
) {
    let Dims {
        batch, tq, tv, dv, ..
    } = ctx.dims;
    if outs.scores.is_none()
        && dispatch::run_split(ctx, pool, &mut outs.output, outs.stats.as_mut())
    {
        return;
    }
    let per_item = ctx.item_rows;
    let mut jobs = Vec::new();
    fn rows_of<T>(a: ArrayViewMut3<'_, T>, rows: usize, cols: usize) -> ArrayViewMut2<'_, T> {
        a.into_shape_with_order((rows, cols))
            .expect("standard layout")
    }
    let mut out_rest = Some(rows_of(outs.output, batch * tq, dv));
    let mut sc_rest = outs.scores.map(|s| rows_of(s, batch * tq, tv));
    let mut st_rest = outs.stats.map(|s| rows_of(s, batch * tq, 2));
    for b in 0..batch {
        let mut i0 = 0;
        while i0 < tq {
            let rows = per_item.min(tq - i0);
            let out = take_rows(&mut out_rest, rows).expect("the output is always there");
            let sc = take_rows(&mut sc_rest, rows);
            let st = take_rows(&mut st_rest, rows);
            jobs.push((Item { b, i0, rows }, out, sc, st));
            i0 += rows;
        }
    }
    type Rows<'a, T> = ArrayViewMut2<'a, MaybeUninit<T>>;
    type Job<'a, T> = (Item, Rows<'a, T>, Option<Rows<'a, T>>, Option<Rows<'a, T>>);
    type State<T> = (Vec<MaybeUninit<T>>, KeyCache);
    let state = || (Vec::new(), dispatch::key_cache::<T>());
    let work = |(scratch, keys): &mut State<T>, (item, mut out, sc, mut st): Job<'_, T>| {
        // The output rows go in uninitialised too: every path writes them in full (the tile
        // path by its copy-out, the others after `init`).
        let out = out.as_slice_mut().expect("standard layout");
        let st = st
            .as_mut()
            .map(|s| init(s.as_slice_mut().expect("standard layout")));
        // The scores rows (the returned weights' or per-thread scratch) go in uninitialised:
        // the item writes each entry before it reads it.
        match sc {
            Some(mut sc) => {
                let sc = sc.as_slice_mut().expect("standard layout");
                dispatch::attend_block(ctx, item, keys, sc, out, st)
            }
            None => {
                scratch.resize(item.rows * tv, MaybeUninit::uninit());
                dispatch::attend_block(ctx, item, keys, &mut scratch[..item.rows * tv], out, st)
            }
        }
    };
    crate::pool::run_jobs(pool, jobs, state, work);
}

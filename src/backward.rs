//! Gradients of the layer: for an upstream gradient `d_output (B, Tq, Dv)`, the gradients of
//! query, key, value, the scale and the concat score weight, with every option of the forward
//! (value or full score mask, causal, query mask, dropout, scale, both score modes).
//!
//! With `p` the softmax weights, `w = p · drop / keep` the weights after dropout, and `o = w · v`:
//! `dV = wᵀ · dO`; `dP = (dO · vᵀ) · drop / keep`; `dS = p ⊙ (dP - Δ)` with `Δ_i = Σ_j p_ij dP_ij`;
//! dot: `dQ = dS · K · scale`, `dK = dSᵀ · Q · scale`, `d scale = Σ dS ⊙ (Q·Kᵀ)`;
//! concat (`s = w · Σ_d tanh(a)`, `a = scale · (q_d + k_d)`): `∂s/∂q_d = ∂s/∂k_d = w · scale ·
//! (1 - tanh²(a))`, `∂s/∂scale = w · Σ_d (1 - tanh²(a)) (q_d + k_d)`, `∂s/∂w = Σ_d tanh(a)`.
//! The mask subtracts a constant (Keras's 1e9), so it passes gradients through unchanged; the
//! query mask zeroes output rows, so their upstream gradient is dropped.
//!
//! Memory-efficient, as FlashAttention-2's backward: no `(Tq, Tv)` matrix is kept. The forward
//! saves each row's softmax statistics ([`Attention::forward_saved`]: the max and `ln Σ`), and
//! `Δ_i = dO_i · O_i` comes from the saved output. Work items are (batch element, range of keys);
//! each walks its keys in blocks of 64 and, per block, the query rows in chunks: it
//! recomputes the chunk's scores and weights, then five products give dP, dV, dK and the block's
//! share of dQ (dot mode; concat mode computes its score terms elementwise instead of dK and dQ).
//! Dropout masks are recomputed from the counter-based generator, so they are exactly the
//! forward's. How many key ranges a batch element is split into depends on the shapes alone; a
//! split element's dQ shares are summed in a fixed order, each dK and dV row is one sequential
//! chain, and the scalar gradients are summed per item and then in item order: the results are
//! bitwise identical for any thread count.
//!
//! For f32 dot mode the products run on the SIMD micro-kernels of the forward (`kernel/`); the
//! portable item below (ndarray products) is the readable reference, used for f64, concat mode
//! and CPUs without AVX2, and tests hold the two equal.

use std::mem::MaybeUninit;
use std::ops::Range;

use ndarray::{s, Array2, Array3, ArrayD, ArrayView2, ArrayView3, ArrayViewD, Axis, CowArray, Ix3};

use crate::alloc::{init, uninit};
use crate::attention::{unfold, with_folded, MasksNd, Saved};
use crate::config::{Attention, ScoreMode};
use crate::dispatch;
use crate::dropout::DropoutMask;
use crate::error::{AttentionError, Result};
use crate::float::Float;
use crate::kernel::backward::ctx::to_f64;
use crate::kernel::{BackCtx, ItemGrads, Partials, KEY_BLOCK};
use crate::mask::Masks;
use crate::pool::run_jobs;
use crate::score::ScoreParams;
use crate::shape::{self, rows_contiguous, Dims};

/// Aim for at least this many work items per call: batch elements with fewer are split into
/// key ranges (which costs one `(Tq, D)` dQ buffer per extra range). A constant, never the
/// thread count, so the split (and every bit of the result) is the same on any machine.
const TARGET_ITEMS: usize = 8;

/// Below this many floating-point operations the backward runs on the calling thread.
const SERIAL_FLOPS: usize = 1 << 20;

/// The gradients of one call.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<T> {
    /// `(B, Tq, D)`.
    pub query: Array3<T>,
    /// `(B, Tv, D)` when a key was passed; otherwise the key's gradient is added into `value`.
    pub key: Option<Array3<T>>,
    /// `(B, Tv, Dv)`.
    pub value: Array3<T>,
    /// When a scale is set.
    pub scale: Option<T>,
    /// In concat mode.
    pub concat_score_weight: Option<T>,
}

/// Whether rows above a key block may be skipped for batch element `b`: with the causal mask
/// row i gives keys `j > i` weight exactly 0 (`e^(s - 1e9 - max)` underflows) as long as the
/// row sees at least one unmasked key and nothing is NaN or infinite (`0 · NaN` would be NaN
/// in the full computation). Rows whose visible keys are all masked keep the full computation.
fn causal_skip<T: Float>(ctx: &BackCtx<'_, '_, T>, b: usize) -> bool {
    let Dims { tq, tv, .. } = ctx.dims;
    let finite = |a: ArrayView2<'_, T>| a.iter().all(|x| x.is_finite());
    ctx.masks.causal
        && finite(ctx.q.index_axis(Axis(0), b))
        && finite(ctx.k.index_axis(Axis(0), b))
        && finite(ctx.v.index_axis(Axis(0), b))
        && finite(ctx.dout.index_axis(Axis(0), b))
        && (0..tq).all(|i| {
            let visible = (i + 1).min(tv);
            ctx.masks
                .keys_of_row(b, i)
                .is_none_or(|k| k.slice(s![..visible]).iter().any(|&x| x))
        })
}

/// Each batch element's mean key `(B, D)`, summed in f64. dQ uses the keys minus it:
/// `dQ_i = s Σ_j dS_ij k_j = s Σ_j dS_ij (k_j - k̄)` exactly, because each row of dS sums to 0
/// (`Σ_j p_ij (dP_ij - Δ_i) = 0`); in floating point the centred form keeps `Δ_i`'s rounding
/// (it comes from the saved output, not from this row's own sum) from being multiplied by the
/// keys' common part, which dominates when the keys share a large mean.
fn key_means<T: Float>(k: ArrayView3<'_, T>) -> Array2<T> {
    let (batch, tv, d) = k.dim();
    let mut out = Array2::zeros((batch, d));
    for (b, mut row) in out.axis_iter_mut(Axis(0)).enumerate() {
        // Blocks of 64 keys summed in T (vectorised), the block sums in f64.
        let mut sum = vec![0.0f64; d];
        for block in k.index_axis(Axis(0), b).axis_chunks_iter(Axis(0), 64) {
            let part = block.sum_axis(Axis(0));
            sum.iter_mut().zip(part).for_each(|(s, x)| *s += to_f64(x));
        }
        let n = tv.max(1) as f64;
        row.iter_mut()
            .zip(&sum)
            .for_each(|(m, &s)| *m = T::of(s / n));
    }
    out
}

/// The key ranges batch elements are split into: `splits` ranges of whole key blocks.
fn key_ranges(tv: usize, splits: usize) -> Vec<Range<usize>> {
    let blocks = tv.div_ceil(KEY_BLOCK);
    (0..splits)
        .map(|g| {
            let start = (g * blocks / splits * KEY_BLOCK).min(tv);
            let end = ((g + 1) * blocks / splits * KEY_BLOCK).min(tv);
            start..end
        })
        .collect()
}

impl Attention {
    /// The gradients of [`forward`](Attention::forward) for the upstream gradient `d_output
    /// (B, Tq, Dv)`, with the same inputs, masks and settings (dropout included: the masks are
    /// recomputed, exactly the forward's for the same seed and call). Runs the forward first;
    /// when you already ran [`forward_saved`](Attention::forward_saved), call
    /// [`backward_saved`](Attention::backward_saved) instead.
    ///
    /// # Errors
    /// As `forward`, plus [`AttentionError::Mismatch`] when `d_output` is not `(B, Tq, Dv)`.
    pub fn backward<T: Float>(
        &self,
        query: ArrayView3<'_, T>,
        value: ArrayView3<'_, T>,
        key: Option<ArrayView3<'_, T>>,
        masks: &Masks<'_>,
        d_output: ArrayView3<'_, T>,
    ) -> Result<Gradients<T>> {
        let saved = self.forward_saved(query, value, key, masks)?;
        self.backward_saved(query, value, key, masks, &saved, d_output)
    }

    /// The gradients for `d_output (B, Tq, Dv)`, given what
    /// [`forward_saved`](Attention::forward_saved) returned for the same inputs, masks and
    /// settings (the saved statistics are trusted: from other inputs they give wrong gradients).
    ///
    /// # Errors
    /// As `forward`, plus [`AttentionError::Mismatch`] when `d_output` is not `(B, Tq, Dv)` or
    /// the saved arrays are not `(B, Tq, Dv)` and `(B, Tq, 2)`.
    pub fn backward_saved<T: Float>(
        &self,
        query: ArrayView3<'_, T>,
        value: ArrayView3<'_, T>,
        key: Option<ArrayView3<'_, T>>,
        masks: &Masks<'_>,
        saved: &Saved<T>,
        d_output: ArrayView3<'_, T>,
    ) -> Result<Gradients<T>> {
        let saved = (saved.output.view(), saved.stats.view());
        self.backward_with(query, value, key, masks, saved, d_output)
    }

    /// `backward_saved` on views of the saved output and statistics: checks the upstream
    /// gradient and the saved results, computes `Δ`, runs the work items and finishes the
    /// gradients (the scale, and dK added into dV when the value was the key).
    fn backward_with<T: Float>(
        &self,
        query: ArrayView3<'_, T>,
        value: ArrayView3<'_, T>,
        key: Option<ArrayView3<'_, T>>,
        masks: &Masks<'_>,
        (saved_output, saved_stats): (ArrayView3<'_, T>, ArrayView3<'_, T>),
        d_output: ArrayView3<'_, T>,
    ) -> Result<Gradients<T>> {
        let has_key = key.is_some();
        let (dims, q, v, k) = self.checked(query, value, key, masks)?;
        let dout = upstream(dims, masks, d_output, (saved_output, saved_stats))?;
        let Dims {
            batch,
            tq,
            tv,
            d,
            dv,
        } = dims;
        let pool = crate::pool::pool()?;
        let flops = (batch * tq)
            .saturating_mul(tv)
            .saturating_mul(4 * d + 6 * dv + 8);
        let pool = (flops >= SERIAL_FLOPS && pool.current_num_threads() > 1).then_some(&*pool);
        if let Some(pool) = pool {
            crate::pool::wake(pool);
        }
        let isa = self.effective_isa();
        // Δ_i = dO_i · O_i (= Σ_j p_ij dP_ij): one dot product per row, in the items' order.
        let delta_of = |b: usize| -> Vec<T> {
            dispatch::row_dots(
                dout.index_axis(Axis(0), b),
                saved_output.index_axis(Axis(0), b),
                (isa, self.mode, dims),
            )
        };
        let deltas = run_jobs(pool, (0..batch).collect(), || (), |_, b| delta_of(b));
        let delta = Array2::from_shape_vec((batch, tq), deltas.concat()).expect("B · Tq values");
        let mut ctx = BackCtx {
            q: q.view(),
            k: k.as_ref().map_or(v.view(), |k| k.view()),
            v: v.view(),
            dout: dout.view(),
            stats: saved_stats,
            delta: delta.view(),
            // Only dot mode's dQ reads it (concat's drops the constant term instead).
            key_mean: match self.mode {
                ScoreMode::Dot => key_means(k.as_ref().map_or(v.view(), |k| k.view())),
                ScoreMode::Concat => Array2::zeros((0, d)),
            },
            masks,
            p: ScoreParams::of(self),
            dropout: self
                .active_dropout()
                .map(|dr| (DropoutMask::new(&dr), T::of(1.0 - dr.rate))),
            dims,
            isa,
            skip: Vec::new(),
            exp: dispatch::exp_in_place::<T>,
        };
        ctx.skip = (0..batch).map(|b| causal_skip(&ctx, b)).collect();
        let (mut dq, mut dk, mut dvv, partials) = run_items(&ctx, pool)?;
        if let (ScoreMode::Dot, Some(s)) = (self.mode, ScoreParams::<T>::of(self).scale) {
            dq.mapv_inplace(|x| x * s);
            dk.mapv_inplace(|x| x * s);
        }
        let (d_scale, d_weight) = partials
            .iter()
            .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
        let key_grad = if has_key {
            Some(dk)
        } else {
            dvv = dvv + &dk; // the value doubled as the key
            None
        };
        Ok(Gradients {
            query: dq,
            key: key_grad,
            value: dvv,
            scale: self.scale.map(|_| T::of(d_scale)),
            concat_score_weight: (self.mode == ScoreMode::Concat).then_some(T::of(d_weight)),
        })
    }
}

/// The upstream gradient as the items read it, after checking it and the saved forward results
/// against the call's dims: rows contiguous, and zero in the rows the query mask zeroes (they
/// pass no gradient).
///
/// # Errors
/// [`AttentionError::Mismatch`] when `d_output` or the saved output is not `(B, Tq, Dv)`, or the
/// saved statistics not `(B, Tq, 2)`.
fn upstream<'a, T: Float>(
    dims: Dims,
    masks: &Masks<'_>,
    d_output: ArrayView3<'a, T>,
    (saved_output, saved_stats): (ArrayView3<'_, T>, ArrayView3<'_, T>),
) -> Result<CowArray<'a, T, Ix3>> {
    let Dims { batch, tq, dv, .. } = dims;
    let expect = |arg: &'static str, a: &[usize], want: Vec<usize>, rule: &'static str| {
        if a == want.as_slice() {
            Ok(())
        } else {
            Err(AttentionError::Mismatch {
                arg,
                shape: a.to_vec(),
                other: "output",
                other_shape: want,
                rule,
            })
        }
    };
    let out_rule = "the upstream gradient must have the output's shape (B, Tq, Dv)";
    expect("d_output", d_output.shape(), vec![batch, tq, dv], out_rule)?;
    let saved_rule = "saved forward results must come from the same call's forward_saved";
    expect(
        "saved output",
        saved_output.shape(),
        vec![batch, tq, dv],
        saved_rule,
    )?;
    expect(
        "saved stats",
        saved_stats.shape(),
        vec![batch, tq, 2],
        saved_rule,
    )?;
    Ok(match &masks.query {
        None => rows_contiguous(d_output),
        Some(_) => {
            let mut a = d_output.to_owned();
            for ((b, i, _), x) in a.indexed_iter_mut() {
                if !masks.query_keeps(b, i) {
                    *x = T::zero();
                }
            }
            CowArray::from(a)
        }
    })
}

/// dQ, dK, dV (before the scale) and each item's `(d_scale, d_weight)` partials. The work items
/// are `(b, key range)`: dK and dV rows are disjoint per item; dQ goes straight to the result
/// when a batch element is one item, else to one buffer per key range, summed in key order.
///
/// # Errors
/// [`AttentionError::TooLarge`] when a result cannot be allocated.
#[allow(clippy::type_complexity)]
fn run_items<T: Float>(
    ctx: &BackCtx<'_, '_, T>,
    pool: Option<&rayon::ThreadPool>,
) -> Result<(Array3<T>, Array3<T>, Array3<T>, Vec<Partials>)> {
    let Dims {
        batch,
        tq,
        tv,
        d,
        dv,
    } = ctx.dims;
    let splits = TARGET_ITEMS
        .div_ceil(batch.max(1))
        .clamp(1, tv.div_ceil(KEY_BLOCK).max(1));
    let ranges = key_ranges(tv, splits);
    // Uninitialised: each item zeroes its own parts (in parallel) before accumulating.
    let mut dq = uninit::<T>([batch, tq, d], "query gradient")?;
    let mut dk = uninit::<T>([batch, tv, d], "key gradient")?;
    let mut dvv = uninit::<T>([batch, tv, dv], "value gradient")?;
    let mut parts = match splits {
        1 => None,
        _ => Some(uninit::<T>(
            [batch * splits, tq, d],
            "query gradient shares",
        )?),
    };
    type Parts<'a, T> = [&'a mut [MaybeUninit<T>]; 3];
    let mut jobs: Vec<(usize, Range<usize>, Parts<'_, T>)> = Vec::new();
    {
        let dq_target = parts.as_mut().unwrap_or(&mut dq);
        let mut dq_rest = dq_target.as_slice_mut().expect("fresh arrays are standard");
        let mut dk_rest = dk.as_slice_mut().expect("fresh arrays are standard");
        let mut dv_rest = dvv.as_slice_mut().expect("fresh arrays are standard");
        for b in 0..batch {
            for r in &ranges {
                let (gq, tail) = std::mem::take(&mut dq_rest).split_at_mut(tq * d);
                dq_rest = tail;
                let (gk, tail) = std::mem::take(&mut dk_rest).split_at_mut(r.len() * d);
                dk_rest = tail;
                let (gv, tail) = std::mem::take(&mut dv_rest).split_at_mut(r.len() * dv);
                dv_rest = tail;
                jobs.push((b, r.clone(), [gq, gk, gv]));
            }
        }
    }
    let run = |(b, keys, [gq, gk, gv]): (usize, Range<usize>, Parts<'_, T>)| {
        let g = ItemGrads {
            dq: init(gq),
            dk: init(gk),
            dv: init(gv),
        };
        dispatch::backward_item(ctx, b, keys, g)
    };
    let partials: Vec<Partials> = run_jobs(pool, jobs, || (), |_, job| run(job));
    // SAFETY: the items cover every (b, key range), so every element of dk, dv and of dq
    // (one item per batch element) or of the shares was initialised (`init`) and written.
    let (dk, dvv, parts) = unsafe {
        (
            dk.assume_init(),
            dvv.assume_init(),
            parts.map(|p| p.assume_init()),
        )
    };
    let dq = if let Some(parts) = &parts {
        // dQ of a split batch element: its shares summed in key order.
        let parts = parts.as_slice().expect("fresh arrays are standard");
        let sum_shares = |(b, out): (usize, &mut [MaybeUninit<T>])| {
            let out = init(out);
            for g in 0..splits {
                let share = &parts[(b * splits + g) * tq * d..][..tq * d];
                out.iter_mut().zip(share).for_each(|(o, &x)| *o = *o + x);
            }
        };
        let rows = dq.as_slice_mut().expect("fresh arrays are standard");
        let rows: Vec<_> = rows.chunks_mut(tq * d).enumerate().collect();
        run_jobs(pool, rows, || (), |_, row| sum_shares(row));
        // SAFETY: every batch element's rows were initialised by `sum_shares`.
        unsafe { dq.assume_init() }
    } else {
        // SAFETY: one item per batch element initialised its whole (Tq, D) block.
        unsafe { dq.assume_init() }
    };
    Ok((dq, dk, dvv, partials))
}

/// The gradients of an N-D call, shaped like the inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientsNd<T> {
    /// Shaped like `query`.
    pub query: ArrayD<T>,
    /// Shaped like `key`, when a key was passed (else added into `value`).
    pub key: Option<ArrayD<T>>,
    /// Shaped like `value`.
    pub value: ArrayD<T>,
    /// When a scale is set.
    pub scale: Option<T>,
    /// In concat mode.
    pub concat_score_weight: Option<T>,
}

/// What [`Attention::forward_nd_saved`] returns: the output and what the backward needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedNd<T> {
    /// `(..., Tq, Dv)`, as `forward_nd` returns it.
    pub output: ArrayD<T>,
    /// `(..., Tq, 2)`: each row's softmax max and `ln Σ e^(x - max)`.
    pub stats: ArrayD<T>,
}

/// Views of saved forward results (from [`SavedNd::view`], or borrowed from elsewhere, e.g.
/// NumPy arrays), as [`Attention::backward_nd_saved`] takes them.
#[derive(Debug, Clone)]
pub struct SavedView<'a, T> {
    /// `(..., Tq, Dv)`.
    pub output: ArrayViewD<'a, T>,
    /// `(..., Tq, 2)`.
    pub stats: ArrayViewD<'a, T>,
}

impl<T> SavedNd<T> {
    /// Views of both arrays.
    pub fn view(&self) -> SavedView<'_, T> {
        SavedView {
            output: self.output.view(),
            stats: self.stats.view(),
        }
    }
}

impl Attention {
    /// [`forward_saved`](Attention::forward_saved) for N-D inputs as
    /// [`forward_nd`](Attention::forward_nd) takes them.
    ///
    /// # Errors
    /// As `forward_nd`.
    pub fn forward_nd_saved<T: Float>(
        &self,
        query: ArrayViewD<'_, T>,
        value: ArrayViewD<'_, T>,
        key: Option<ArrayViewD<'_, T>>,
        masks: &MasksNd<'_>,
    ) -> Result<SavedNd<T>> {
        with_folded(query, value, key, masks, |plan, call| {
            let saved = self.forward_saved(call.query, call.value, call.key, call.masks)?;
            let mut stats_shape = plan.output_shape();
            *stats_shape.last_mut().expect("at least (Tq, Dv)") = 2;
            Ok(SavedNd {
                output: unfold(saved.output, plan.output_shape()),
                stats: unfold(saved.stats, stats_shape),
            })
        })
    }

    /// [`backward`](Attention::backward) for N-D inputs as
    /// [`forward_nd`](Attention::forward_nd) takes them; `d_output` has the output's shape
    /// `(..., Tq, Dv)`. Gradients of inputs that were broadcast over leading dims are summed
    /// back to the inputs' shapes. Runs the forward first (see
    /// [`backward_nd_saved`](Attention::backward_nd_saved)).
    ///
    /// # Errors
    /// As `forward_nd`, plus [`AttentionError::Mismatch`] when `d_output` is not the output's
    /// shape.
    pub fn backward_nd<T: Float>(
        &self,
        query: ArrayViewD<'_, T>,
        value: ArrayViewD<'_, T>,
        key: Option<ArrayViewD<'_, T>>,
        masks: &MasksNd<'_>,
        d_output: ArrayViewD<'_, T>,
    ) -> Result<GradientsNd<T>> {
        let saved = self.forward_nd_saved(query.view(), value.view(), key.clone(), masks)?;
        self.backward_nd_saved(query, value, key, masks, saved.view(), d_output)
    }

    /// [`backward_saved`](Attention::backward_saved) for N-D inputs, given what
    /// [`forward_nd_saved`](Attention::forward_nd_saved) returned for the same call.
    ///
    /// # Errors
    /// As [`backward_nd`](Attention::backward_nd), plus [`AttentionError::Mismatch`] when the
    /// saved arrays are not `(..., Tq, Dv)` and `(..., Tq, 2)`.
    pub fn backward_nd_saved<T: Float>(
        &self,
        query: ArrayViewD<'_, T>,
        value: ArrayViewD<'_, T>,
        key: Option<ArrayViewD<'_, T>>,
        masks: &MasksNd<'_>,
        saved: SavedView<'_, T>,
        d_output: ArrayViewD<'_, T>,
    ) -> Result<GradientsNd<T>> {
        let shapes = (
            query.shape().to_vec(),
            value.shape().to_vec(),
            key.as_ref().map(|k| k.shape().to_vec()),
        );
        with_folded(query, value, key, masks, |plan, call| {
            let out_shape = plan.output_shape();
            let mut stats_shape = out_shape.clone();
            *stats_shape.last_mut().expect("at least (Tq, Dv)") = 2;
            let checks = [
                ("d_output", d_output.shape(), &out_shape, "output"),
                ("saved output", saved.output.shape(), &out_shape, "output"),
                (
                    "saved stats",
                    saved.stats.shape(),
                    &stats_shape,
                    "row statistics",
                ),
            ];
            for (arg, shape, want, other) in checks {
                if shape != want.as_slice() {
                    return Err(AttentionError::Mismatch {
                        arg,
                        shape: shape.to_vec(),
                        other,
                        other_shape: want.clone(),
                        rule: "the upstream gradient and the saved forward results must have \
                               the output's shape (..., Tq, Dv) (statistics: (..., Tq, 2))",
                    });
                }
            }
            let batch = &plan.batch_shape;
            let dout: CowArray<'_, T, Ix3> = shape::fold(&d_output, batch, 2);
            let s_out: CowArray<'_, T, Ix3> = shape::fold(&saved.output, batch, 2);
            let s_stats: CowArray<'_, T, Ix3> = shape::fold(&saved.stats, batch, 2);
            let g = self.backward_with(
                call.query,
                call.value,
                call.key,
                call.masks,
                (s_out.view(), s_stats.view()),
                dout.view(),
            )?;
            let back = |a: Array3<T>, target: &[usize]| {
                let (_, t, f) = a.dim();
                unbroadcast(unfold(a, [&batch[..], &[t, f]].concat()), target)
            };
            Ok(GradientsNd {
                query: back(g.query, &shapes.0),
                key: g.key.zip(shapes.2.as_deref()).map(|(k, s)| back(k, s)),
                value: back(g.value, &shapes.1),
                scale: g.scale,
                concat_score_weight: g.concat_score_weight,
            })
        })
    }
}

/// Sums a gradient over the dims its input was broadcast along (NumPy's rules), giving the
/// input's shape.
fn unbroadcast<T: Float>(mut g: ArrayD<T>, target: &[usize]) -> ArrayD<T> {
    while g.ndim() > target.len() {
        g = g.sum_axis(Axis(0));
    }
    for (ax, &n) in target.iter().enumerate() {
        if n == 1 && g.shape()[ax] != 1 {
            g = g.sum_axis(Axis(ax)).insert_axis(Axis(ax));
        }
    }
    g
}

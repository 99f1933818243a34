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
//! Memory-efficient, as FlashAttention-2's backward: no `(Tq, Tv)` matrix is kept. Pass 1 runs
//! over blocks of query rows: it recomputes each row's scores and softmax, and yields dQ, the
//! row's max and log-sum (its log-sum-exp, kept in two parts) and Δ. Pass 2 runs over blocks of
//! keys: it recomputes those keys' weights from them and yields dK and dV. Dropout masks are recomputed from the counter-based
//! generator, so they are exactly the forward's. Every gradient element is computed by one
//! thread in a fixed order, and the scalar gradients are summed over fixed-size blocks in a fixed
//! order: results are bitwise identical for any thread count.

use ndarray::{
    s, Array1, Array2, Array3, ArrayD, ArrayView2, ArrayView3, ArrayViewD, Axis, CowArray, Ix3, Zip,
};
use rayon::prelude::*;

use crate::attention::{unfold, with_folded, MasksNd};
use crate::config::{Attention, ScoreMode};
use crate::dropout::DropoutMask;
use crate::error::{AttentionError, Result};
use crate::float::Float;
use crate::mask::{mask_cols, mask_row, Masks};
use crate::score::ScoreParams;
use crate::shape::{self, Dims};

/// Query rows (pass 1) or keys (pass 2) per work item: fixed, so the block sums of the scalar
/// gradients never depend on the thread count. 128 rather than 64: each block's products repack
/// the whole other operand, and at (8, 512, 512, 64) one thread went 31.9 -> 28-30 ms (256 gave
/// no more, for twice the memory per block).
const BLOCK: usize = 128;

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

struct Ctx<'a, 'm, T> {
    q: ArrayView3<'a, T>,
    k: ArrayView3<'a, T>,
    v: ArrayView3<'a, T>,
    /// d_output with the query-masked rows zeroed.
    dout: ArrayView3<'a, T>,
    masks: &'a Masks<'m>,
    p: ScoreParams<T>,
    dropout: Option<(DropoutMask, T)>,
    dims: Dims,
}

/// Pass 1's results for one block of query rows.
struct RowBlock<T> {
    dq: Array2<T>,
    /// Each row's max and ln Σ e^(x - max) (see `softmax_stats`).
    max: Array1<T>,
    ln_sum: Array1<T>,
    delta: Array1<T>,
    d_scale: T,
    d_weight: T,
}

/// Pass 2's results for one block of keys.
struct KeyBlock<T> {
    dk: Array2<T>,
    dv: Array2<T>,
    d_scale: T,
    d_weight: T,
}

impl<T: Float> Ctx<'_, '_, T> {
    /// Raw scores of query rows `qs (r, D)` against keys `ks (c, D)`: `qs · ksᵀ` (dot) or
    /// `Σ_d tanh(scale · (q_d + k_d))` (concat), before the scale (dot) or weight (concat).
    fn raw_scores(&self, qs: ArrayView2<'_, T>, ks: ArrayView2<'_, T>) -> Array2<T> {
        match self.p.mode {
            ScoreMode::Dot => standard(qs.dot(&ks.t())),
            ScoreMode::Concat => {
                let scale = self.p.scale;
                Array2::from_shape_fn((qs.nrows(), ks.nrows()), |(i, j)| {
                    let mut sum = T::zero();
                    for (&a, &b) in qs.row(i).iter().zip(ks.row(j)) {
                        let x = a + b;
                        sum = sum + scale.map_or(x, |s| s * x).tanh();
                    }
                    sum
                })
            }
        }
    }

    /// The finished score from a raw one: `raw · scale` or `weight · raw`.
    fn finish(&self, raw: T) -> T {
        match self.p.mode {
            ScoreMode::Dot => self.p.scale.map_or(raw, |s| raw * s),
            ScoreMode::Concat => self.p.concat_score_weight * raw,
        }
    }

    /// `drop / keep` for weight `(b, i, j)`: 0 or `1 / keep` (1 without dropout).
    fn drop_factor(&self, b: usize, i: usize, j: usize) -> T {
        match &self.dropout {
            None => T::one(),
            Some((mask, keep)) => {
                let Dims { tq, tv, .. } = self.dims;
                if mask.keeps(((b * tq + i) * tv + j) as u64) {
                    T::one() / *keep
                } else {
                    T::zero()
                }
            }
        }
    }

    /// Concat's per-term gradients for scores `dS (r, c)` of query rows `qs` against keys `ks`:
    /// adds `dS_ij · w · scale · (1 - t²)` into `dq` (rows of qs) and/or `dk` (rows of ks), and
    /// returns (d scale, d weight) summed over the block.
    fn concat_terms(
        &self,
        ds: ArrayView2<'_, T>,
        qs: ArrayView2<'_, T>,
        ks: ArrayView2<'_, T>,
        mut dq: Option<&mut Array2<T>>,
        mut dk: Option<&mut Array2<T>>,
    ) -> (T, T) {
        let (w, scale) = (self.p.concat_score_weight, self.p.scale);
        let s = scale.unwrap_or(T::one());
        let (mut d_scale, mut d_weight) = (T::zero(), T::zero());
        for ((i, j), &g) in ds.indexed_iter() {
            let (qi, kj) = (qs.row(i), ks.row(j));
            let (mut sum_t, mut sum_scale) = (T::zero(), T::zero());
            for d in 0..qi.len() {
                let x = qi[d] + kj[d];
                let t = (s * x).tanh();
                let dt = T::one() - t * t;
                let term = g * w * s * dt;
                if let Some(dq) = dq.as_deref_mut() {
                    dq[[i, d]] = dq[[i, d]] + term;
                }
                if let Some(dk) = dk.as_deref_mut() {
                    dk[[j, d]] = dk[[j, d]] + term;
                }
                sum_t = sum_t + t;
                sum_scale = sum_scale + dt * x;
            }
            d_weight = d_weight + g * sum_t;
            d_scale = d_scale + g * w * sum_scale;
        }
        (d_scale, d_weight)
    }

    /// Pass 1: query rows `i0..i0 + r` of batch element `b`.
    fn row_block(&self, b: usize, i0: usize, r: usize) -> RowBlock<T> {
        let qs = self.q.slice(s![b, i0..i0 + r, ..]);
        let ks = self.k.index_axis(Axis(0), b);
        let raw = self.raw_scores(qs, ks);
        // Weights p, as the forward computes them.
        let mut p = raw.mapv(|x| self.finish(x));
        let (mut max, mut ln_sum) = (Array1::zeros(r), Array1::zeros(r));
        for (ri, mut row) in p.axis_iter_mut(Axis(0)).enumerate() {
            let i = i0 + ri;
            let row = row.as_slice_mut().expect("fresh arrays are contiguous");
            mask_row(
                row,
                self.masks.keys_of_row(b, i),
                self.masks.causal.then_some(i),
            );
            (max[ri], ln_sum[ri]) = softmax_stats(row);
        }
        // dP = (dO · vᵀ) ⊙ drop / keep, Δ_i = Σ_j p_ij dP_ij, dS = p ⊙ (dP - Δ).
        let dos = self.dout.slice(s![b, i0..i0 + r, ..]);
        let mut ds = standard(dos.dot(&self.v.index_axis(Axis(0), b).t()));
        let mut delta = Array1::zeros(r);
        for (ri, (mut dp, prow)) in ds
            .axis_iter_mut(Axis(0))
            .zip(p.axis_iter(Axis(0)))
            .enumerate()
        {
            let dp = contiguous_mut(&mut dp);
            let prow = prow.to_slice().expect("fresh arrays are contiguous");
            if self.dropout.is_some() {
                for (j, x) in dp.iter_mut().enumerate() {
                    *x = *x * self.drop_factor(b, i0 + ri, j);
                }
            }
            let d = dp
                .iter()
                .zip(prow)
                .fold(T::zero(), |acc, (&a, &b)| acc + a * b);
            delta[ri] = d;
            dp.iter_mut()
                .zip(prow)
                .for_each(|(g, &pj)| *g = pj * (*g - d));
        }
        let (dq, d_scale, d_weight) = match self.p.mode {
            ScoreMode::Dot => {
                let mut dq = ds.dot(&ks);
                if let Some(s) = self.p.scale {
                    dq.mapv_inplace(|x| x * s);
                }
                let d_scale = Zip::from(&ds)
                    .and(&raw)
                    .fold(T::zero(), |acc, &g, &x| acc + g * x);
                (dq, d_scale, T::zero())
            }
            ScoreMode::Concat => {
                let mut dq = Array2::zeros(qs.raw_dim());
                let (sc, w) = self.concat_terms(ds.view(), qs, ks, Some(&mut dq), None);
                (dq, sc, w)
            }
        };
        RowBlock {
            dq,
            max,
            ln_sum,
            delta,
            d_scale,
            d_weight,
        }
    }

    /// Pass 2: keys `j0..j0 + c` of batch element `b`, given every row's log-sum-exp and Δ.
    fn key_block(
        &self,
        b: usize,
        j0: usize,
        c: usize,
        stats: (ArrayView2<'_, T>, ArrayView2<'_, T>),
        delta: ArrayView2<'_, T>,
    ) -> KeyBlock<T> {
        let qs = self.q.index_axis(Axis(0), b);
        let ks = self.k.slice(s![b, j0..j0 + c, ..]);
        let vs = self.v.slice(s![b, j0..j0 + c, ..]);
        let dos = self.dout.index_axis(Axis(0), b);
        let raw = self.raw_scores(qs, ks); // (Tq, c)
                                           // Weights of these keys for every row, p = e^((m - max_i) - ln Σ_i), masked as forward.
        let mut p = raw.mapv(|x| self.finish(x));
        for (i, mut row) in p.axis_iter_mut(Axis(0)).enumerate() {
            let row = contiguous_mut(&mut row);
            mask_cols(
                row,
                j0,
                self.masks.keys_of_row(b, i),
                self.masks.causal.then_some(i),
            );
            let (mx, ls) = (stats.0[[b, i]], stats.1[[b, i]]);
            row.iter_mut().for_each(|x| *x = (*x - mx) - ls);
            T::exp_in_place(row);
        }
        // dW = dO · vᵀ (Tq, c); w = p · drop/keep; dP = dW · drop/keep; dS = p ⊙ (dP - Δ).
        let mut ds = standard(dos.dot(&vs.t()));
        // The weights after dropout: a copy of p only when dropout is on.
        let mut dropped = self.dropout.as_ref().map(|_| p.clone());
        for (i, (mut g, pr)) in ds
            .axis_iter_mut(Axis(0))
            .zip(p.axis_iter(Axis(0)))
            .enumerate()
        {
            let g = contiguous_mut(&mut g);
            let pr = pr.to_slice().expect("fresh arrays are contiguous");
            if let Some(w) = dropped.as_mut() {
                let mut wr = w.row_mut(i);
                for (jj, (gx, wx)) in g.iter_mut().zip(contiguous_mut(&mut wr)).enumerate() {
                    let f = self.drop_factor(b, i, j0 + jj);
                    *wx = *wx * f;
                    *gx = *gx * f;
                }
            }
            let d = delta[[b, i]];
            g.iter_mut()
                .zip(pr)
                .for_each(|(gx, &px)| *gx = px * (*gx - d));
        }
        let dv = dropped.as_ref().unwrap_or(&p).t().dot(&dos);
        let (dk, d_scale, d_weight) = match self.p.mode {
            ScoreMode::Dot => {
                let mut dk = ds.t().dot(&qs);
                if let Some(s) = self.p.scale {
                    dk.mapv_inplace(|x| x * s);
                }
                (dk, T::zero(), T::zero())
            }
            ScoreMode::Concat => {
                let mut dk = Array2::zeros(ks.raw_dim());
                self.concat_terms(ds.view(), qs, ks, None, Some(&mut dk));
                (dk, T::zero(), T::zero())
            }
        };
        KeyBlock {
            dk,
            dv,
            d_scale,
            d_weight,
        }
    }
}

/// `a` in standard (row-major) layout: `dot` may return column-major results (for example when
/// one side has a single row), and the row loops need contiguous rows.
fn standard<T: Clone>(a: Array2<T>) -> Array2<T> {
    if a.is_standard_layout() {
        a
    } else {
        a.as_standard_layout().into_owned()
    }
}

/// A fresh (standard-layout) array's row as a slice.
fn contiguous_mut<'r, T>(row: &'r mut ndarray::ArrayViewMut1<'_, T>) -> &'r mut [T] {
    row.as_slice_mut().expect("fresh arrays are contiguous")
}

/// Softmax of a row in place (Keras's arithmetic: `e^(x - max) / Σ`); returns `(max, ln Σ)`,
/// with which `e^((x - max) - ln Σ)` gives the weights again. The two are kept apart, not added
/// into one log-sum-exp: in a fully masked row `max` is about -1e9, and `max + ln Σ` would lose
/// `ln Σ` to rounding (all of it in f32).
fn softmax_stats<T: Float>(row: &mut [T]) -> (T, T) {
    let max = row
        .iter()
        .fold(T::neg_infinity(), |m, &x| if x > m { x } else { m });
    row.iter_mut().for_each(|x| *x = *x - max);
    T::exp_in_place(row);
    let sum = row.iter().fold(T::zero(), |a, &x| a + x);
    row.iter_mut().for_each(|x| *x = *x / sum);
    (max, sum.ln())
}

impl Attention {
    /// The gradients of [`forward`](Attention::forward) for the upstream gradient `d_output
    /// (B, Tq, Dv)`, with the same inputs, masks and settings (dropout included: the masks are
    /// recomputed, exactly the forward's for the same seed and call).
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
        let has_key = key.is_some();
        let (dims, q, v, k) = self.checked(query, value, key, masks)?;
        let Dims {
            batch,
            tq,
            tv,
            d,
            dv,
        } = dims;
        if d_output.shape() != [batch, tq, dv] {
            return Err(AttentionError::Mismatch {
                arg: "d_output",
                shape: d_output.shape().to_vec(),
                other: "output",
                other_shape: vec![batch, tq, dv],
                rule: "the upstream gradient must have the output's shape (B, Tq, Dv)",
            });
        }
        // Rows the query mask zeroes pass no gradient.
        let mut dout = d_output.to_owned();
        for ((b, i, _), x) in dout.indexed_iter_mut() {
            if !masks.query_keeps(b, i) {
                *x = T::zero();
            }
        }
        let ctx = Ctx {
            q: q.view(),
            k: k.as_ref().map_or(v.view(), |k| k.view()),
            v: v.view(),
            dout: dout.view(),
            masks,
            p: ScoreParams::of(self),
            dropout: self
                .active_dropout()
                .map(|dr| (DropoutMask::new(&dr), T::of(1.0 - dr.rate))),
            dims,
        };
        let blocks = |n: usize| -> Vec<(usize, usize, usize)> {
            (0..batch)
                .flat_map(|b| (0..n).step_by(BLOCK).map(move |x| (b, x, BLOCK.min(n - x))))
                .collect()
        };
        let pool = crate::pool::pool()?;
        let rows: Vec<RowBlock<T>> = pool.install(|| {
            blocks(tq)
                .into_par_iter()
                .map(|(b, i0, r)| ctx.row_block(b, i0, r))
                .collect()
        });
        let mut dq = Array3::zeros((batch, tq, d));
        let mut row_max = Array2::zeros((batch, tq));
        let mut ln_sum = Array2::zeros((batch, tq));
        let mut delta = Array2::zeros((batch, tq));
        for ((b, i0, r), blk) in blocks(tq).into_iter().zip(&rows) {
            dq.slice_mut(s![b, i0..i0 + r, ..]).assign(&blk.dq);
            row_max.slice_mut(s![b, i0..i0 + r]).assign(&blk.max);
            ln_sum.slice_mut(s![b, i0..i0 + r]).assign(&blk.ln_sum);
            delta.slice_mut(s![b, i0..i0 + r]).assign(&blk.delta);
        }
        let keys: Vec<KeyBlock<T>> = pool.install(|| {
            blocks(tv)
                .into_par_iter()
                .map(|(b, j0, c)| {
                    ctx.key_block(b, j0, c, (row_max.view(), ln_sum.view()), delta.view())
                })
                .collect()
        });
        let mut dk = Array3::zeros((batch, tv, d));
        let mut dvv = Array3::zeros((batch, tv, dv));
        for ((b, j0, c), blk) in blocks(tv).into_iter().zip(&keys) {
            dk.slice_mut(s![b, j0..j0 + c, ..]).assign(&blk.dk);
            dvv.slice_mut(s![b, j0..j0 + c, ..]).assign(&blk.dv);
        }
        // Scalar gradients: block partial sums, added in block order.
        let d_scale = rows
            .iter()
            .map(|r| r.d_scale)
            .chain(keys.iter().map(|k| k.d_scale))
            .fold(T::zero(), |a, x| a + x);
        let d_weight = rows
            .iter()
            .map(|r| r.d_weight)
            .chain(keys.iter().map(|k| k.d_weight))
            .fold(T::zero(), |a, x| a + x);
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
            scale: self.scale.map(|_| d_scale),
            concat_score_weight: (self.mode == ScoreMode::Concat).then_some(d_weight),
        })
    }
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

impl Attention {
    /// [`backward`](Attention::backward) for N-D inputs as
    /// [`forward_nd`](Attention::forward_nd) takes them; `d_output` has the output's shape
    /// `(..., Tq, Dv)`. Gradients of inputs that were broadcast over leading dims are summed
    /// back to the inputs' shapes.
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
        let shapes = (
            query.shape().to_vec(),
            value.shape().to_vec(),
            key.as_ref().map(|k| k.shape().to_vec()),
        );
        with_folded(query, value, key, masks, |plan, call| {
            let out_shape = plan.output_shape();
            if d_output.shape() != out_shape.as_slice() {
                return Err(AttentionError::Mismatch {
                    arg: "d_output",
                    shape: d_output.shape().to_vec(),
                    other: "output",
                    other_shape: out_shape,
                    rule: "the upstream gradient must have the output's shape (..., Tq, Dv)",
                });
            }
            let dout: CowArray<'_, T, Ix3> = shape::fold(&d_output, &plan.batch_shape, 2);
            let g = self.backward(call.query, call.value, call.key, call.masks, dout.view())?;
            let batch = &plan.batch_shape;
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

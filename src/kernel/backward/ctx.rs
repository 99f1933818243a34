//! What a backward work item reads and writes ([`BackCtx`], [`ItemGrads`]), its blocking, and
//! the portable item: ndarray's products, the readable reference every family is held to (f64,
//! concat mode, CPUs without a SIMD family).

use std::ops::Range;

use ndarray::{s, Array2, ArrayView2, ArrayView3, ArrayViewMut2, Axis, Zip};

use crate::config::ScoreMode;
use crate::cpu::Isa;
use crate::dropout::DropoutMask;
use crate::float::Float;
use crate::mask::{mask_cols, Masks};
use crate::score::ScoreParams;
use crate::shape::Dims;

/// Keys per block: a block's dK and dV accumulators (`64 × D` each) and the chunk's weights stay
/// in L1/L2 while every query row passes over them.
pub(crate) const KEY_BLOCK: usize = 64;

/// Query rows per chunk: the chunk's scores, weights and dS (`512 × 64` each, 128 KiB in f32,
/// in L2). 512 rather than 128: fewer passes over each key block's accumulators (measured:
/// docs/performance.md, "Where the thresholds come from").
pub(crate) const ROW_CHUNK: usize = 512;

/// Everything a backward work item reads, shared by all items of one call.
pub(crate) struct BackCtx<'a, 'm, T> {
    // Views have contiguous rows and no negative strides (`shape::rows_contiguous`).
    pub(crate) q: ArrayView3<'a, T>,
    pub(crate) k: ArrayView3<'a, T>,
    pub(crate) v: ArrayView3<'a, T>,
    /// d_output with the query-masked rows zeroed.
    pub(crate) dout: ArrayView3<'a, T>,
    /// `(B, Tq, 2)`: each row's max and `ln Σ` from the forward.
    pub(crate) stats: ArrayView3<'a, T>,
    /// `(B, Tq)`: `Δ_i = dO_i · O_i`.
    pub(crate) delta: ArrayView2<'a, T>,
    /// `(B, D)`: each batch element's mean key, the centre for dQ (see `key_means`); dot mode
    /// only (empty in concat mode).
    pub(crate) key_mean: Array2<T>,
    pub(crate) masks: &'a Masks<'m>,
    pub(crate) p: ScoreParams<T>,
    pub(crate) dropout: Option<(DropoutMask, T)>,
    pub(crate) dims: Dims,
    pub(crate) isa: Isa,
    /// Per batch element: whether rows above a key block may be skipped under the causal mask
    /// (see `causal_skip`).
    pub(crate) skip: Vec<bool>,
    /// `x = e^x` over a slice: for f32 the SIMD exp of the CPU's family (the forward's), else
    /// the elementwise `exp`.
    pub(crate) exp: fn(&mut [T]),
}

/// One work item's share of the gradients: `dq` `(Tq, D)` (accumulated into, starts at zero),
/// and the rows of `dk` `(keys, D)` and `dv` `(keys, Dv)` of the item's keys.
pub(crate) struct ItemGrads<'o, T> {
    pub(crate) dq: &'o mut [T],
    pub(crate) dk: &'o mut [T],
    pub(crate) dv: &'o mut [T],
}

/// A work item's partial sums of the scalar gradients: (d scale, d concat weight), in f64.
pub(crate) type Partials = (f64, f64);

impl<T: Float> BackCtx<'_, '_, T> {
    /// The first query row that can see key `j0` or a later one: with the causal mask (and
    /// `skip`), rows before `j0` give those keys weight exactly 0 and are skipped.
    pub(crate) fn first_row(&self, b: usize, j0: usize) -> usize {
        if self.skip[b] {
            j0.min(self.dims.tq)
        } else {
            0
        }
    }

    /// `1 / keep` or 0 for weight `(b, i, j)` when dropout is on.
    pub(crate) fn dropped(&self, b: usize, i: usize, j: usize) -> Option<bool> {
        self.dropout.as_ref().map(|(mask, _)| {
            let Dims { tq, tv, .. } = self.dims;
            !mask.keeps(((b * tq + i) * tv + j) as u64)
        })
    }

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

    /// Concat's per-term gradients for `dS (r, c)` of query rows `qs` against keys `ks`: adds
    /// `dS_ij · w · scale · (1 - t²)` into `dk` (rows of ks) and `-dS_ij · w · scale · t²` into
    /// `dq` (rows of qs), and returns (d scale, d weight) summed over the block.
    ///
    /// Why `-t²` for dQ: each row of dS sums to 0 (`Σ_j p_ij (dP_ij - Δ_i) = 0`), so the `1` of
    /// `1 - t²` contributes nothing to `dQ_i = Σ_j dS_ij w s (1 - t²_ij)`, exactly, but in
    /// floating point it carries `Δ_i`'s rounding into the sum; at small scores (t ≈ 0) that
    /// was most of the result (float32 query gradients 1e-3 off float64; without it 2e-5).
    fn concat_terms(
        &self,
        ds: ArrayView2<'_, T>,
        qs: ArrayView2<'_, T>,
        ks: ArrayView2<'_, T>,
        mut dq: ArrayViewMut2<'_, T>,
        mut dk: ArrayViewMut2<'_, T>,
    ) -> Partials {
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
                let gws = g * w * s;
                dq[[i, d]] = dq[[i, d]] - gws * (t * t);
                dk[[j, d]] = dk[[j, d]] + gws * dt;
                sum_t = sum_t + t;
                sum_scale = sum_scale + dt * x;
            }
            d_weight = d_weight + g * sum_t;
            d_scale = d_scale + g * w * sum_scale;
        }
        (to_f64(d_scale), to_f64(d_weight))
    }

    /// The portable work item: batch element `b`, keys `keys`, with ndarray's products.
    pub(crate) fn portable_item(
        &self,
        b: usize,
        keys: Range<usize>,
        g: ItemGrads<'_, T>,
    ) -> Partials {
        let Dims { tq, d, dv, .. } = self.dims;
        let k0 = keys.start;
        let mut dq = ArrayViewMut2::from_shape((tq, d), g.dq).expect("sized by the caller");
        let mut dk = ArrayViewMut2::from_shape((keys.len(), d), g.dk).expect("sized by the caller");
        let mut dvv =
            ArrayViewMut2::from_shape((keys.len(), dv), g.dv).expect("sized by the caller");
        let (mut d_scale, mut d_weight) = (0.0, 0.0);
        for j0 in keys.clone().step_by(KEY_BLOCK) {
            let j1 = (j0 + KEY_BLOCK).min(keys.end);
            let ks = self.k.slice(s![b, j0..j1, ..]);
            let vs = self.v.slice(s![b, j0..j1, ..]);
            let mut dk_blk = dk.slice_mut(s![j0 - k0..j1 - k0, ..]);
            let mut dv_blk = dvv.slice_mut(s![j0 - k0..j1 - k0, ..]);
            let mut i0 = self.first_row(b, j0);
            while i0 < tq {
                let i1 = (i0 + ROW_CHUNK).min(tq);
                let qs = self.q.slice(s![b, i0..i1, ..]);
                let dos = self.dout.slice(s![b, i0..i1, ..]);
                let raw = self.raw_scores(qs, ks);
                // Weights p = e^((x - max) - ln Σ) of the masked scores x, as the forward's.
                let mut p = raw.mapv(|x| self.finish(x));
                for (r, mut row) in p.axis_iter_mut(Axis(0)).enumerate() {
                    let i = i0 + r;
                    let row = contiguous_mut(&mut row);
                    mask_cols(
                        row,
                        j0,
                        self.masks.keys_of_row(b, i),
                        self.masks.causal.then_some(i),
                        self.p.mask_bias,
                    );
                    let (mx, ls) = (self.stats[[b, i, 0]], self.stats[[b, i, 1]]);
                    row.iter_mut().for_each(|x| *x = (*x - mx) - ls);
                    (self.exp)(row);
                }
                // dP = (dO · vᵀ) ⊙ drop / keep, dS = p ⊙ (dP - Δ), w = p ⊙ drop / keep.
                let mut ds = standard(dos.dot(&vs.t()));
                for (r, (mut g, mut pr)) in ds
                    .axis_iter_mut(Axis(0))
                    .zip(p.axis_iter_mut(Axis(0)))
                    .enumerate()
                {
                    let i = i0 + r;
                    let delta = self.delta[[b, i]];
                    let (g, pr) = (contiguous_mut(&mut g), contiguous_mut(&mut pr));
                    for (jj, (gx, px)) in g.iter_mut().zip(pr.iter_mut()).enumerate() {
                        match (self.dropped(b, i, j0 + jj), &self.dropout) {
                            (Some(true), _) => {
                                *gx = *px * -delta;
                                *px = T::zero();
                            }
                            (Some(false), Some((_, keep))) => {
                                *gx = *px * (*gx / *keep - delta);
                                *px = *px / *keep;
                            }
                            _ => *gx = *px * (*gx - delta),
                        }
                    }
                }
                dv_blk.scaled_add(T::one(), &p.t().dot(&dos));
                match self.p.mode {
                    ScoreMode::Dot => {
                        dk_blk.scaled_add(T::one(), &ds.t().dot(&qs));
                        // Centred keys: see `key_means`.
                        let centred = &ks - &self.key_mean.row(b);
                        let mut dq_rows = dq.slice_mut(s![i0..i1, ..]);
                        dq_rows.scaled_add(T::one(), &ds.dot(&centred));
                        if self.p.scale.is_some() {
                            d_scale += Zip::from(&ds)
                                .and(&raw)
                                .fold(0.0, |acc, &g, &x| acc + to_f64(g * x));
                        }
                    }
                    ScoreMode::Concat => {
                        let dq_rows = dq.slice_mut(s![i0..i1, ..]);
                        let (sc, w) =
                            self.concat_terms(ds.view(), qs, ks, dq_rows, dk_blk.view_mut());
                        d_scale += sc;
                        d_weight += w;
                    }
                }
                i0 = i1;
            }
        }
        (d_scale, d_weight)
    }
}

pub(crate) fn to_f64<T: Float>(x: T) -> f64 {
    x.to_f64().unwrap_or(f64::NAN)
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

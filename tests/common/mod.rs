//! Test helpers: a seeded generator, the naive reference (four plain loops in f64, read straight
//! off Keras's `call`), and a labelled `assert_close` that says where and by how much.
#![allow(dead_code)]

use luong::ScoreMode;
use ndarray::{Array2, Array3, ArrayView2, ArrayView3};

/// SplitMix64: enough randomness for test inputs, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn array3(&mut self, shape: (usize, usize, usize), magnitude: f64) -> Array3<f64> {
        Array3::from_shape_fn(shape, |_| self.uniform() * magnitude)
    }
    pub fn mask2(&mut self, shape: (usize, usize), keep: f64) -> Array2<bool> {
        Array2::from_shape_fn(shape, |_| (self.uniform() + 1.0) / 2.0 < keep)
    }
    pub fn mask3(&mut self, shape: (usize, usize, usize), keep: f64) -> Array3<bool> {
        Array3::from_shape_fn(shape, |_| (self.uniform() + 1.0) / 2.0 < keep)
    }
}

/// The inputs of a reference call.
pub struct Case<'a> {
    pub mode: ScoreMode,
    pub scale: Option<f64>,
    pub concat_weight: f64,
    pub query: ArrayView3<'a, f64>,
    pub key: ArrayView3<'a, f64>,
    pub value: ArrayView3<'a, f64>,
    pub value_mask: Option<ArrayView2<'a, bool>>,
    pub score_mask: Option<ArrayView3<'a, bool>>,
    pub query_mask: Option<ArrayView2<'a, bool>>,
    pub causal: bool,
    /// Round `s - 1e9` as float32 does (spacing 64 near 1e9), for comparisons with f32 runs:
    /// in a fully masked row that rounding decides the weights.
    pub f32_bias: bool,
}

/// Keras's `Attention.call`, written as plainly as possible: (output, weights).
pub fn reference(c: &Case) -> (Array3<f64>, Array3<f64>) {
    let (b, tq, d) = c.query.dim();
    let (_, tv, dv) = c.value.dim();
    let mut w = Array3::<f64>::zeros((b, tq, tv));
    for bi in 0..b {
        for i in 0..tq {
            for j in 0..tv {
                let mut s = 0.0;
                for x in 0..d {
                    let (q, k) = (c.query[[bi, i, x]], c.key[[bi, j, x]]);
                    s += match c.mode {
                        ScoreMode::Dot => q * k,
                        ScoreMode::Concat => (c.scale.unwrap_or(1.0) * (q + k)).tanh(),
                    };
                }
                s = match c.mode {
                    ScoreMode::Dot => s * c.scale.unwrap_or(1.0),
                    ScoreMode::Concat => c.concat_weight * s,
                };
                let mut keep = !(c.causal && j > i);
                if let Some(m) = c.value_mask {
                    keep &= m[[bi, j]];
                }
                if let Some(m) = c.score_mask {
                    keep &= m[[bi, i, j]];
                }
                w[[bi, i, j]] = match (keep, c.f32_bias) {
                    (true, _) => s,
                    (false, false) => s - 1e9,
                    (false, true) => ((s as f32) - 1e9f32) as f64,
                };
            }
            let max = (0..tv)
                .map(|j| w[[bi, i, j]])
                .fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = (0..tv).map(|j| (w[[bi, i, j]] - max).exp()).sum();
            for j in 0..tv {
                w[[bi, i, j]] = (w[[bi, i, j]] - max).exp() / sum;
            }
        }
    }
    let mut out = Array3::<f64>::zeros((b, tq, dv));
    for bi in 0..b {
        for i in 0..tq {
            if c.query_mask.is_some_and(|m| !m[[bi, i]]) {
                continue;
            }
            for x in 0..dv {
                out[[bi, i, x]] = (0..tv).map(|j| w[[bi, i, j]] * c.value[[bi, j, x]]).sum();
            }
        }
    }
    (out, w)
}

/// Asserts |actual - expected| <= atol + rtol·|expected| everywhere, naming the worst index.
pub fn assert_close<A, B>(
    label: &str,
    actual: ArrayView3<A>,
    expected: ArrayView3<B>,
    rtol: f64,
    atol: f64,
) where
    A: Copy + Into<f64>,
    B: Copy + Into<f64>,
{
    assert_eq!(actual.dim(), expected.dim(), "{label}: shapes differ");
    // (index, actual, expected, amount over the tolerance)
    type Worst = ((usize, usize, usize), f64, f64, f64);
    let mut worst: Option<Worst> = None;
    for (idx, &e) in expected.indexed_iter() {
        let (a, e): (f64, f64) = (actual[idx].into(), e.into());
        let excess = (a - e).abs() - (atol + rtol * e.abs());
        if (excess > 0.0 || a.is_nan() != e.is_nan()) && worst.is_none_or(|w| excess > w.3) {
            worst = Some((idx, a, e, excess));
        }
    }
    if let Some((idx, a, e, _)) = worst {
        panic!("{label}: at {idx:?} got {a:e}, expected {e:e} (|diff| {:e}, rtol {rtol:e}, atol {atol:e})", (a - e).abs());
    }
}

pub fn to_f32(a: &Array3<f64>) -> Array3<f32> {
    a.mapv(|x| x as f32)
}

//! Step 4 (training only), dropout on the attention weights: each weight is kept with
//! probability `1 - rate` and divided by `1 - rate` (inverted dropout), as Keras's
//! `backend.random.dropout` does; dropped weights become 0. Shapes: weights `(B, Tq, Tv)`.
//!
//! The random numbers come from a counter-based generator: the decision for weight
//! `(b, i, j)` is a hash of `(seed, call, b·Tq·Tv + i·Tv + j)`. No state is shared between
//! threads, so the mask is the same for any thread count and any work split, and the same seed
//! gives the same masks on every machine. (Keras's masks differ between its own backends, so
//! bit parity with Keras under dropout is not a goal.)

use ndarray::ArrayViewMut3;

use crate::config::Dropout;
use crate::float::Float;

/// SplitMix64's finaliser: a bijective mix of 64 bits with good avalanche.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The per-call key, and the keep test for one position.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropoutMask {
    key: u64,
    /// Keep when the 53-bit uniform is below this (i.e. `u < 1 - rate`, Keras's test).
    threshold: u64,
}

impl DropoutMask {
    pub fn new(d: &Dropout) -> Self {
        let key = mix64(mix64(d.seed ^ 0x6c75_6f6e_6700_0000).wrapping_add(mix64(d.call)));
        let keep = 1.0 - d.rate;
        // u = bits / 2^53 is exact in f64, so `u < keep` is `bits < ceil(keep · 2^53)`.
        let threshold = (keep * (1u64 << 53) as f64).ceil() as u64;
        DropoutMask { key, threshold }
    }

    /// Whether the weight at flat position `index` (row-major over `(B, Tq, Tv)`) is kept.
    #[inline]
    pub fn keeps(&self, index: u64) -> bool {
        (mix64(index ^ self.key) >> 11) < self.threshold
    }
}

/// Drops weights of one row in place; `first` is the flat position of the row's first weight.
#[inline]
pub(crate) fn dropout_row<'r, T: Float>(
    row: impl IntoIterator<Item = &'r mut T>,
    mask: &DropoutMask,
    keep_prob: T,
    first: u64,
) {
    for (j, w) in row.into_iter().enumerate() {
        *w = if mask.keeps(first + j as u64) {
            *w / keep_prob
        } else {
            T::zero()
        };
    }
}

/// Applies dropout to weights `(B, Tq, Tv)` in place. A rate of 0 changes nothing.
pub fn apply_dropout<T: Float>(mut weights: ArrayViewMut3<'_, T>, dropout: &Dropout) {
    if dropout.rate <= 0.0 {
        return;
    }
    let mask = DropoutMask::new(dropout);
    let keep_prob = T::of(1.0 - dropout.rate);
    let tv = weights.dim().2;
    for (r, mut row) in weights.rows_mut().into_iter().enumerate() {
        dropout_row(row.iter_mut(), &mask, keep_prob, (r * tv) as u64);
    }
}

//! # luong
//!
//! Keras's `Attention` layer (Luong-style dot-product attention, plus Keras's "concat" scoring)
//! on `ndarray`, computing exactly what `keras.layers.Attention` computes (Keras 3.15+), fast, in
//! parallel, with no Python needed.
//!
//! For query `(B, Tq, D)`, key `(B, Tv, D)` and value `(B, Tv, Dv)`:
//! 1. scores `(B, Tq, Tv)`: `query · keyᵀ (× scale)` or `w · Σ_d tanh(scale · (q_d + k_d))`
//!    ([`score`]);
//! 2. score mask: value mask, full score mask, causal; masked scores get `1e9` subtracted
//!    ([`mask`]);
//! 3. softmax over Tv ([`softmax`]); 4. dropout when training ([`dropout`]);
//! 5. output `(B, Tq, Dv)` = weights · value ([`combine`](mod@combine)); the query mask zeroes
//!    output rows.
//!
//! ```
//! use luong::{Attention, Masks, ScoreMode};
//! use ndarray::Array3;
//!
//! let query = Array3::<f32>::from_shape_fn((2, 3, 4), |(b, i, d)| (b + i + d) as f32 * 0.1);
//! let value = Array3::<f32>::from_shape_fn((2, 5, 4), |(b, j, d)| (b * j + d) as f32 * 0.1);
//! let attn = Attention::new(ScoreMode::Dot).scale(0.5).return_scores(true);
//! let out = attn.forward(query.view(), value.view(), None, &Masks::default())?;
//! assert_eq!(out.output.dim(), (2, 3, 4));
//! let weights = out.scores.expect("asked for");
//! // Each row of weights is a probability distribution over the 5 keys.
//! for row in weights.rows() {
//!     assert!((row.sum() - 1.0).abs() < 1e-6);
//! }
//! # Ok::<(), luong::AttentionError>(())
//! ```
//!
//! Modules: [`shape`] (all shape rules), [`score`], [`mask`], [`softmax`], [`dropout`],
//! [`combine`](mod@combine) (the stages, public and readable), `attention` (the orchestration),
//! `pool` (the thread pool), `openmp` (joining a host's OpenMP team), and, with the `python`
//! feature, the PyO3 bindings.

pub mod backward;
pub mod combine;
pub mod config;
pub mod dropout;
pub mod error;
pub mod float;
pub mod half;
pub mod mask;
pub mod score;
pub mod shape;
pub mod softmax;

mod alloc;
mod attention;
mod cpu;
mod dispatch;
mod kernel;
mod openmp;
mod pool;

#[cfg(feature = "python")]
mod python;

pub use crate::half::Half;
pub use attention::{MasksNd, Output, OutputNd, Saved};
pub use backward::{Gradients, GradientsNd, SavedNd, SavedView};
pub use combine::combine;
pub use config::{Attention, Dropout, ScoreMode};
pub use cpu::Isa;
pub use dropout::apply_dropout;
pub use error::{AttentionError, Result};
pub use float::Float;
pub use mask::{apply_query_mask, apply_score_mask, Masks, ValueMask};
pub use openmp::{parallel_backend, ParallelBackend};
pub use pool::{num_threads, set_num_threads};
pub use score::scores;
pub use softmax::softmax_rows;

/// The README's Rust example, compiled and run as a doc-test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The Rust examples of docs/design.md, compiled and run as doc-tests.
#[doc = include_str!("../docs/design.md")]
#[cfg(doctest)]
pub struct DesignDoctests;

/// The Rust examples of docs/performance.md, compiled and run as doc-tests.
#[doc = include_str!("../docs/performance.md")]
#[cfg(doctest)]
pub struct PerformanceDoctests;

/// The Rust examples of docs/testing.md, compiled and run as doc-tests.
#[doc = include_str!("../docs/testing.md")]
#[cfg(doctest)]
pub struct TestingDoctests;

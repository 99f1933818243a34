//! The layer's settings: score mode, scale, concat weight, dropout, and what to return.
//!
//! [`Attention`] is a small builder; [`Attention::forward`](crate::Attention::forward) (in
//! `attention.rs`) runs it. Settings are kept in `f64` and rounded to the compute type at the
//! start of each call, as Keras rounds its float32 weights.

use crate::cpu::Isa;
use crate::error::{AttentionError, Result};

/// How query and key are combined into a score, as Keras's `score_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoreMode {
    /// `scores = query · keyᵀ`, then `× scale` when a scale is set.
    #[default]
    Dot,
    /// `scores = concat_score_weight · Σ_d tanh(scale · (query_d + key_d))`.
    Concat,
}

impl ScoreMode {
    /// Parses Keras's names `"dot"` and `"concat"`.
    ///
    /// # Errors
    /// [`AttentionError::Config`] for any other name.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "dot" => Ok(ScoreMode::Dot),
            "concat" => Ok(ScoreMode::Concat),
            other => Err(AttentionError::Config {
                arg: "score_mode",
                reason: format!("expected one of {{'dot', 'concat'}}, received {other:?}"),
            }),
        }
    }
}

/// Dropout on the attention weights, as Keras applies it when `training=True`.
///
/// A weight is kept with probability `1 - rate` and then divided by `1 - rate` (inverted
/// dropout). Which weights are kept depends only on `(seed, call, batch, row, column)`, never on
/// the thread count or the block sizes (see `dropout.rs`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Fraction of weights dropped, in `[0, 1)`.
    pub rate: f64,
    /// The layer's seed.
    pub seed: u64,
    /// The call counter: a layer advances it once per training call, so masks differ per call.
    pub call: u64,
}

/// Attention settings: a builder whose [`forward`](crate::Attention::forward) runs the layer.
///
/// ```
/// use luong::{Attention, ScoreMode};
/// let attn = Attention::new(ScoreMode::Dot).scale(0.125).return_scores(true);
/// assert_eq!(attn.score_mode(), ScoreMode::Dot);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    pub(crate) mode: ScoreMode,
    pub(crate) scale: Option<f64>,
    pub(crate) concat_score_weight: f64,
    pub(crate) dropout: Option<Dropout>,
    pub(crate) return_scores: bool,
    pub(crate) isa: Option<Isa>,
    pub(crate) mask_bias: Option<f64>,
}

impl Attention {
    /// Attention with the given score mode, no scale, concat weight 1, no dropout, no returned
    /// scores: Keras's defaults.
    pub fn new(mode: ScoreMode) -> Self {
        Attention {
            mode,
            scale: None,
            concat_score_weight: 1.0,
            dropout: None,
            return_scores: false,
            isa: None,
            mask_bias: None,
        }
    }

    /// Sets the scale (Keras's `use_scale=True` weight `scale`).
    pub fn scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Sets the concat score weight (Keras's `concat_score_weight`; used in concat mode only).
    pub fn concat_score_weight(mut self, weight: f64) -> Self {
        self.concat_score_weight = weight;
        self
    }

    /// Turns dropout on (training mode). A rate of 0 leaves the weights untouched.
    pub fn dropout(mut self, dropout: Dropout) -> Self {
        self.dropout = Some(dropout);
        self
    }

    /// Asks `forward` to return the attention weights `(B, Tq, Tv)` too.
    pub fn return_scores(mut self, yes: bool) -> Self {
        self.return_scores = yes;
        self
    }

    /// Sets the number subtracted from masked scores: Keras uses `1e9`, and `65504` (float16's
    /// largest finite number) when it computes in float16. The default is `1e9`
    /// ([`Float::MASK_BIAS`](crate::Float::MASK_BIAS)); the float16 entry points set `65504`.
    pub fn mask_bias(mut self, bias: f64) -> Self {
        self.mask_bias = Some(bias);
        self
    }

    /// Runs on the given instruction set instead of the best one the CPU has (`LUONG_ISA`):
    /// for tests and benchmarks that compare the paths. A set the CPU lacks falls back to the
    /// best it has; [`Isa::Scalar`] is always available. [`Isa::Amx`] asked for here runs every
    /// dot-score call on tiles (chosen automatically, only calls the tiles win do: 24 MFLOP or
    /// more, blocks of 32 query rows or more, at most 2048 keys with returned weights).
    pub fn isa(mut self, isa: Isa) -> Self {
        self.isa = Some(isa);
        self
    }

    /// The instruction set calls run on.
    pub fn effective_isa(&self) -> Isa {
        crate::cpu::resolve(self.isa, Isa::detect())
    }

    /// The score mode.
    pub fn score_mode(&self) -> ScoreMode {
        self.mode
    }

    /// The dropout to apply, if any: `None` when dropout is off or its rate is 0.
    pub(crate) fn active_dropout(&self) -> Option<Dropout> {
        self.dropout.filter(|d| d.rate > 0.0)
    }

    /// Checks the settings' domains.
    ///
    /// # Errors
    /// [`AttentionError::Config`] when the dropout rate is outside `[0, 1)` or NaN.
    pub fn validate(&self) -> Result<()> {
        if let Some(d) = self.dropout {
            if !(0.0..1.0).contains(&d.rate) {
                return Err(AttentionError::Config {
                    arg: "dropout",
                    reason: format!("the rate must be in [0, 1), received {}", d.rate),
                });
            }
        }
        Ok(())
    }
}

impl Default for Attention {
    fn default() -> Self {
        Attention::new(ScoreMode::Dot)
    }
}

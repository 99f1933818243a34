//! The floating-point types luong computes in.
//!
//! Every stage is generic over [`Float`], implemented for `f32` (Keras's default compute dtype)
//! and `f64` (which Keras silently drops to float32; luong computes in float64 for real).

use std::fmt::{Debug, Display};

/// A float type the attention stages can run in: `f32` or `f64`.
///
/// `MASK_BIAS` is the number Keras subtracts from masked scores (`1e9`; Keras uses `65504` for
/// float16: `Half::MASK_BIAS`). Keras subtracts a large finite number
/// instead of writing `-inf` so that a fully masked row still gives finite weights: the softmax of
/// `s - 1e9` is the softmax of `s` rounded to the spacing of floats near `1e9`.
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + ndarray::ScalarOperand
    + ndarray::LinalgScalar
    + Default
    + Debug
    + Display
    + Send
    + Sync
    + 'static
{
    /// Keras's bias for masked scores, in this type: `1e9`.
    const MASK_BIAS: Self;
    /// The dtype name NumPy and Keras use for this type.
    const NAME: &'static str;
    /// Converts an `f64` setting (scale, concat weight, keep probability) to this type, rounding
    /// as NumPy's cast does.
    fn of(x: f64) -> Self;
}

impl Float for f32 {
    const MASK_BIAS: f32 = 1.0e9;
    const NAME: &'static str = "float32";
    #[inline]
    fn of(x: f64) -> f32 {
        x as f32
    }
}

impl Float for f64 {
    const MASK_BIAS: f64 = 1.0e9;
    const NAME: &'static str = "float64";
    #[inline]
    fn of(x: f64) -> f64 {
        x
    }
}

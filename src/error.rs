//! The one error type of the crate.
//!
//! Every message names the argument at fault and the shapes involved, so a user can fix the call
//! without reading the source. The Python bindings map every variant to `ValueError`, except
//! [`AttentionError::TooLarge`], which becomes `MemoryError`.

use thiserror::Error;

/// Everything a caller can get wrong, and the one thing the machine can refuse (memory).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AttentionError {
    /// An input has fewer dimensions than the layer needs.
    #[error("`{arg}` has shape {shape}: {rule}", shape = fmt_shape(.shape))]
    Rank {
        /// The argument: `query`, `value`, `key`, `query_mask`, `value_mask`.
        arg: &'static str,
        /// What is expected, for example `expected at least 2 dims, (..., Tq, D)`.
        rule: &'static str,
        /// The shape received.
        shape: Vec<usize>,
    },
    /// Two inputs disagree on a dimension they must share.
    #[error(
        "`{arg}` shape {shape} does not match `{other}` shape {other_shape}: {rule}",
        shape = fmt_shape(.shape),
        other_shape = fmt_shape(.other_shape)
    )]
    Mismatch {
        /// The argument whose shape is rejected.
        arg: &'static str,
        /// Its shape.
        shape: Vec<usize>,
        /// The argument it is compared with.
        other: &'static str,
        /// That argument's shape.
        other_shape: Vec<usize>,
        /// The rule that was broken, for example `the last dims (D) must be equal`.
        rule: &'static str,
    },
    /// Leading (batch) dimensions that do not broadcast.
    #[error(
        "the leading (batch) dims of `{arg}` shape {shape} do not broadcast to the batch dims {batch}{detail}",
        shape = fmt_shape(.shape),
        batch = fmt_shape(.batch)
    )]
    Broadcast {
        /// The argument whose leading dims are rejected.
        arg: &'static str,
        /// Its full shape.
        shape: Vec<usize>,
        /// The batch shape it must broadcast to.
        batch: Vec<usize>,
        /// Where that batch shape came from.
        detail: String,
    },
    /// A setting outside its domain (dropout rate, scale, ...).
    #[error("invalid `{arg}`: {reason}")]
    Config {
        /// The setting.
        arg: &'static str,
        /// Why it is rejected, with the value received.
        reason: String,
    },
    /// The result would not fit in memory, or its element count overflows `usize`.
    #[error("the {what} of shape {shape} is too large to allocate", shape = fmt_shape(.shape))]
    TooLarge {
        /// Which result: `output` or `scores`.
        what: &'static str,
        /// Its shape.
        shape: Vec<usize>,
    },
}

/// A shape as NumPy prints it: `(2, 5, 3)`, `(3,)`, `()`.
pub fn fmt_shape(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `Result` with [`AttentionError`].
pub type Result<T> = std::result::Result<T, AttentionError>;

//! All shape rules in one place.
//!
//! The kernels work on `(B, T, D)` views. Users (and NumPy) have any number of leading batch
//! dims, also none: query `(..., Tq, D)`, key `(..., Tv, D)`, value `(..., Tv, Dv)`, query mask
//! `(..., Tq)`, value mask `(..., Tv)` or full score mask `(..., Tq, Tv)`. [`plan`] checks those
//! shapes once, up front, and works out the batch shape (the leading dims of query, key and value
//! broadcast NumPy-style; masks broadcast to it without growing it). [`fold`] then turns each
//! input into a 3-D view `(B, T, D)`, copying only when the leading dims cannot be merged into one
//! axis without a copy (for example a broadcast dim in front of a real one).
//!
//! A value mask is a full score mask when it has as many dims as the scores; otherwise it is a
//! per-key mask applied to every query row. Keras only expands 2-D value masks and misaligns
//! N-D ones; luong does what its users expect (see the README's parity notes).

use ndarray::{ArrayViewD, Axis, CowArray, Dimension, IxDyn};

use crate::error::{fmt_shape, AttentionError, Result};

/// The sizes of one attention call, after folding the leading dims into `batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// B: the product of the leading (batch) dims.
    pub batch: usize,
    /// Tq: query rows.
    pub tq: usize,
    /// Tv: key and value rows.
    pub tv: usize,
    /// D: the query and key feature size.
    pub d: usize,
    /// Dv: the value feature size (the output's last dim).
    pub dv: usize,
}

impl Dims {
    /// The `(B, Tq, Tv)` scores' element count.
    ///
    /// # Errors
    /// [`AttentionError::TooLarge`] when it overflows `usize`.
    pub fn score_len(&self) -> Result<usize> {
        checked_len(&[self.batch, self.tq, self.tv], "scores")
    }

    /// The `(B, Tq, Dv)` output's element count.
    ///
    /// # Errors
    /// [`AttentionError::TooLarge`] when it overflows `usize`.
    pub fn output_len(&self) -> Result<usize> {
        checked_len(&[self.batch, self.tq, self.dv], "output")
    }
}

/// The element count of `shape`, or [`AttentionError::TooLarge`] when it overflows.
pub(crate) fn checked_len(shape: &[usize], what: &'static str) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| AttentionError::TooLarge {
            what,
            shape: shape.to_vec(),
        })
}

/// The shapes of a 3-D call, checked: query `(B, Tq, D)`, key `(B, Tv, D)`, value `(B, Tv, Dv)`.
/// `key` is `None` when the value doubles as the key.
///
/// # Errors
/// [`AttentionError::Mismatch`] naming the two arguments and their shapes.
pub fn check_qkv(query: &[usize], value: &[usize], key: Option<&[usize]>) -> Result<Dims> {
    for (arg, s) in [("query", query), ("value", value)]
        .into_iter()
        .chain(key.map(|k| ("key", k)))
    {
        if s.len() != 3 {
            return Err(AttentionError::Rank {
                arg,
                rule: "the 3-D API takes (B, T, D); forward_nd takes any leading dims",
                shape: s.to_vec(),
            });
        }
    }
    let (key_arg, key) = match key {
        Some(k) => ("key", k),
        None => ("value", value),
    };
    let mismatch = |arg, shape: &[usize], other, other_shape: &[usize], rule| {
        Err(AttentionError::Mismatch {
            arg,
            shape: shape.to_vec(),
            other,
            other_shape: other_shape.to_vec(),
            rule,
        })
    };
    if key[2] != query[2] {
        return mismatch(
            key_arg,
            key,
            "query",
            query,
            "the last dims (D) must be equal",
        );
    }
    if key[1] != value[1] {
        return mismatch(
            "key",
            key,
            "value",
            value,
            "the second-to-last dims (Tv) must be equal",
        );
    }
    if key[0] != query[0] || value[0] != query[0] {
        let (arg, s) = if value[0] != query[0] {
            ("value", value)
        } else {
            (key_arg, key)
        };
        return mismatch(arg, s, "query", query, "the batch dims (B) must be equal");
    }
    Ok(Dims {
        batch: query[0],
        tq: query[1],
        tv: value[1],
        d: query[2],
        dv: value[2],
    })
}

/// The mask shapes of a 3-D call, checked against `dims`: query mask `(B, Tq)`; value mask
/// `(B, Tv)` or `(B, Tq, Tv)`.
///
/// # Errors
/// [`AttentionError::Mismatch`] naming the mask, its shape and the expected one.
pub fn check_masks(
    dims: &Dims,
    query_mask: Option<&[usize]>,
    value_mask: Option<&[usize]>,
) -> Result<()> {
    let Dims { batch, tq, tv, .. } = *dims;
    let scores = [batch, tq, tv];
    if let Some(m) = query_mask {
        if m != [batch, tq] {
            return Err(mismatch(
                "query_mask",
                m,
                "scores",
                &scores,
                "a query mask must be (B, Tq)",
            ));
        }
    }
    if let Some(m) = value_mask {
        if m != [batch, tv] && m != scores {
            let rule = "a value mask must be (B, Tv) or (B, Tq, Tv)";
            return Err(mismatch("value_mask", m, "scores", &scores, rule));
        }
    }
    Ok(())
}

/// The plan of an N-D call: the broadcast batch shape and the folded sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The leading dims of the output and scores.
    pub batch_shape: Vec<usize>,
    /// The sizes, with `batch` the product of `batch_shape`.
    pub dims: Dims,
    /// Whether the value mask is a full score mask `(..., Tq, Tv)` (else per key `(..., Tv)`).
    pub full_score_mask: bool,
}

impl Plan {
    /// The output's N-D shape `(..., Tq, Dv)`.
    pub fn output_shape(&self) -> Vec<usize> {
        [&self.batch_shape[..], &[self.dims.tq, self.dims.dv]].concat()
    }

    /// The scores' N-D shape `(..., Tq, Tv)`.
    pub fn scores_shape(&self) -> Vec<usize> {
        [&self.batch_shape[..], &[self.dims.tq, self.dims.tv]].concat()
    }
}

/// The shapes of one N-D call, as [`plan`] takes them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shapes<'s> {
    /// `(..., Tq, D)`.
    pub query: &'s [usize],
    /// `(..., Tv, Dv)`.
    pub value: &'s [usize],
    /// `(..., Tv, D)`; `None` when the value doubles as the key.
    pub key: Option<&'s [usize]>,
    /// `(..., Tq)`.
    pub query_mask: Option<&'s [usize]>,
    /// `(..., Tv)` or `(..., Tq, Tv)`.
    pub value_mask: Option<&'s [usize]>,
}

/// Checks the shapes of an N-D call and plans it.
///
/// # Errors
/// [`AttentionError::Rank`] for inputs with fewer than 2 dims (masks: fewer than 1);
/// [`AttentionError::Mismatch`] when D or Tv disagree, or a mask's trailing dims are wrong;
/// [`AttentionError::Broadcast`] when leading dims do not broadcast;
/// [`AttentionError::TooLarge`] when the output or scores' element count overflows.
pub fn plan(s: Shapes<'_>) -> Result<Plan> {
    fn lead(x: &[usize]) -> &[usize] {
        &x[..x.len() - 2]
    }
    let rank = |arg, shape: &[usize], min, rule| {
        if shape.len() < min {
            Err(AttentionError::Rank {
                arg,
                rule,
                shape: shape.to_vec(),
            })
        } else {
            Ok(())
        }
    };
    rank(
        "query",
        s.query,
        2,
        "expected at least 2 dims, (..., Tq, D)",
    )?;
    rank(
        "value",
        s.value,
        2,
        "expected at least 2 dims, (..., Tv, Dv)",
    )?;
    let (key_arg, key) = match s.key {
        Some(k) => {
            rank("key", k, 2, "expected at least 2 dims, (..., Tv, D)")?;
            ("key", k)
        }
        None => ("value", s.value),
    };
    let tail = |x: &[usize]| [x[x.len() - 2], x[x.len() - 1]];
    let ([tq, d], [tv, dv], [tvk, dk]) = (tail(s.query), tail(s.value), tail(key));
    if dk != d {
        let rule = "the last dims (D) must be equal";
        return Err(mismatch(key_arg, key, "query", s.query, rule));
    }
    if tvk != tv {
        let rule = "the second-to-last dims (Tv) must be equal";
        return Err(mismatch("key", key, "value", s.value, rule));
    }
    // Batch shape: query, value and key broadcast together, NumPy-style.
    let mut batch_shape = lead(s.query).to_vec();
    for (arg, shape) in [("value", s.value), ("key", key)] {
        batch_shape = broadcast_shapes(&batch_shape, lead(shape)).ok_or_else(|| {
            AttentionError::Broadcast {
                arg,
                shape: shape.to_vec(),
                batch: lead(s.query).to_vec(),
                detail: format!(" of `query` shape {}", fmt_shape(s.query)),
            }
        })?;
    }
    let batch = checked_len(&batch_shape, "batch")?;
    let dims = Dims {
        batch,
        tq,
        tv,
        d,
        dv,
    };
    let full_score_mask = match s.value_mask {
        Some(m) => check_value_mask(m, &batch_shape, tq, tv)?,
        None => false,
    };
    if let Some(m) = s.query_mask {
        rank("query_mask", m, 1, "expected at least 1 dim, (..., Tq)")?;
        if m[m.len() - 1] != tq {
            return Err(mismatch(
                "query_mask",
                m,
                "query",
                s.query,
                "the last dim must be Tq",
            ));
        }
        check_mask_lead("query_mask", m, 1, &batch_shape)?;
    }
    let plan = Plan {
        batch_shape,
        dims,
        full_score_mask,
    };
    checked_len(&plan.output_shape(), "output")?;
    checked_len(&plan.scores_shape(), "scores")?;
    Ok(plan)
}

/// Checks a value mask and tells whether it is a full score mask.
fn check_value_mask(m: &[usize], batch_shape: &[usize], tq: usize, tv: usize) -> Result<bool> {
    let scores_rank = batch_shape.len() + 2;
    if m.is_empty() || m.len() > scores_rank {
        return Err(AttentionError::Rank {
            arg: "value_mask",
            rule: "expected (..., Tv) per key or (..., Tq, Tv) per score, with no more dims than the scores",
            shape: m.to_vec(),
        });
    }
    let full = m.len() == scores_rank;
    let (tail, ok, rule) = if full {
        (
            2,
            m[m.len() - 2..] == [tq, tv],
            "a full score mask (same rank as the scores) must end in (Tq, Tv)",
        )
    } else {
        (
            1,
            m[m.len() - 1] == tv,
            "a per-key mask (fewer dims than the scores) must end in Tv",
        )
    };
    if !ok {
        let scores: Vec<usize> = [batch_shape, &[tq, tv]].concat();
        return Err(mismatch("value_mask", m, "scores", &scores, rule));
    }
    check_mask_lead("value_mask", m, tail, batch_shape)?;
    Ok(full)
}

/// A mask's leading dims must broadcast to the batch shape without growing it.
fn check_mask_lead(
    arg: &'static str,
    m: &[usize],
    tail: usize,
    batch_shape: &[usize],
) -> Result<()> {
    let lead = &m[..m.len() - tail];
    if broadcast_shapes(batch_shape, lead).as_deref() != Some(batch_shape) {
        return Err(AttentionError::Broadcast {
            arg,
            shape: m.to_vec(),
            batch: batch_shape.to_vec(),
            detail: " of the inputs".into(),
        });
    }
    Ok(())
}

fn mismatch(
    arg: &'static str,
    shape: &[usize],
    other: &'static str,
    other_shape: &[usize],
    rule: &'static str,
) -> AttentionError {
    AttentionError::Mismatch {
        arg,
        shape: shape.to_vec(),
        other,
        other_shape: other_shape.to_vec(),
        rule,
    }
}

/// NumPy's broadcasting of two shapes (aligned on the right; a 1 stretches), or `None`.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let at = |s: &[usize], i: usize| {
        if i + s.len() >= n {
            s[i + s.len() - n]
        } else {
            1
        }
    };
    (0..n)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y || y == 1 => Some(x),
            (1, y) => Some(y),
            _ => None,
        })
        .collect()
}

/// Folds an N-D view into one with a single leading (batch) axis.
///
/// `view`'s leading dims are broadcast to `batch_shape` (zero strides, no copy) and merged, with
/// the `tail` trailing dims kept, giving shape `(B, tail...)`. The merge is a view whenever the
/// strides allow it (always for C-contiguous inputs, broadcast ones and a single leading dim);
/// otherwise the data is copied once into standard layout. Shapes must have been checked by
/// [`plan`].
pub fn fold<'v, A: Clone, D: Dimension>(
    view: &'v ArrayViewD<'_, A>,
    batch_shape: &[usize],
    tail: usize,
) -> CowArray<'v, A, D> {
    let ndim = view.ndim();
    let full: Vec<usize> = batch_shape
        .iter()
        .chain(&view.shape()[ndim - tail..])
        .copied()
        .collect();
    // `plan` accepted these shapes, so the broadcast exists; failing here is a bug in the caller.
    let mut v = view
        .broadcast(IxDyn(&full))
        .expect("shape::fold: shape not accepted by plan");
    let nb = batch_shape.len();
    let batch: usize = batch_shape.iter().product();
    let folded: Vec<usize> = std::iter::once(batch)
        .chain(full[nb..].iter().copied())
        .collect();
    if batch == 0 {
        // Nothing to borrow; an empty array of the folded shape.
        let empty =
            ndarray::ArrayD::from_shape_vec(IxDyn(&folded), Vec::new()).expect("empty shape");
        return CowArray::from(empty)
            .into_dimensionality::<D>()
            .expect("fold produces tail + 1 dims");
    }
    if nb == 0 {
        v = v.insert_axis(Axis(0));
    }
    // Merge each leading axis into the next; `merge_axes` succeeds exactly when one stride can
    // walk both axes in row-major order.
    let merged = (1..nb).all(|i| v.merge_axes(Axis(i - 1), Axis(i)));
    let cow = if merged {
        for _ in 1..nb {
            v = v.index_axis_move(Axis(0), 0);
        }
        CowArray::from(v)
    } else {
        let owned = v.as_standard_layout().into_owned();
        CowArray::from(
            owned
                .into_shape_with_order(IxDyn(&folded))
                .expect("standard layout reshapes"),
        )
    };
    cow.into_dimensionality::<D>()
        .expect("fold produces tail + 1 dims")
}

/// `view` itself when each of its rows (last axis) is contiguous and no stride is negative,
/// else a standard-layout copy: the row kernels read rows as slices and walk rows forward.
pub(crate) fn rows_contiguous<'v, A: Clone, D: Dimension>(
    view: ndarray::ArrayView<'v, A, D>,
) -> CowArray<'v, A, D> {
    let last = view.ndim() - 1;
    let inner_ok = view.len_of(Axis(last)) <= 1 || view.stride_of(Axis(last)) == 1;
    if inner_ok && view.strides().iter().all(|&s| s >= 0) {
        CowArray::from(view)
    } else {
        CowArray::from(view.as_standard_layout().into_owned())
    }
}

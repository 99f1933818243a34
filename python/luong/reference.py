"""Plain NumPy reference for `keras.layers.Attention` (Luong dot-product and Keras "concat" scores).

This is the readable path the compiled core is held equal to: `python -m luong` and the tests
compare against it. It follows Keras 3's `Attention.call` step by step, with the same NumPy
operations as Keras's numpy backend, so in float32 it reproduces Keras's numbers (not just
approximately: the same ops in the same order).

Shapes: query `(..., Tq, D)`, value `(..., Tv, Dv)`, key `(..., Tv, D)` (defaults to value);
the leading batch dims broadcast NumPy-style among the three. Output `(..., Tq, Dv)`, weights
`(..., Tq, Tv)`.

One deliberate difference from Keras: a per-key value mask `(..., Tv)` is always applied to every
query row (expanded at axis -2). Keras expands only 2-D masks, so an N-D per-key mask lines up
against the wrong axes there. A value mask with as many dims as the scores is a full score mask
`(..., Tq, Tv)`, as in Keras.

It imports nothing from the `luong` package, so tests can load this file without the compiled core.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

__all__ = ["reference_attention"]


def reference_attention(
    query: ArrayLike,
    value: ArrayLike,
    key: ArrayLike | None = None,
    *,
    query_mask: ArrayLike | None = None,
    value_mask: ArrayLike | None = None,
    score_mode: Literal["dot", "concat"] = "dot",
    scale: float | None = None,
    concat_score_weight: float = 1.0,
    use_causal_mask: bool = False,
    dtype: DTypeLike = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Attention output and weights, computed the way Keras's numpy backend does (no dropout).

    Args:
        query: `(..., Tq, D)`.
        value: `(..., Tv, Dv)`.
        key: `(..., Tv, D)`; `value` is used when None.
        query_mask: `(..., Tq)`; output rows where it is false (zero) are set to exactly 0.
        value_mask: `(..., Tv)` per-key mask, or `(..., Tq, Tv)` full score mask (recognised by
            having as many dims as the scores). Non-zero / True means keep.
        score_mode: "dot" (`q @ kᵀ`) or "concat" (`w * Σ_d tanh(q_d + k_d)`).
        scale: the layer's `scale` weight (`use_scale=True`), or None for no scaling.
        concat_score_weight: the layer's `concat_score_weight` (concat mode only).
        use_causal_mask: keep only `j <= i` (top-left aligned, also when Tq != Tv), ANDed with
            the value mask.
        dtype: the float type every step is computed in; inputs are cast to it.

    Returns:
        `(output, weights)`: `(..., Tq, Dv)` and `(..., Tq, Tv)`, both of `dtype`.

    Raises:
        ValueError: unknown score_mode or shapes that do not fit together.
        TypeError: non-numeric input.
    """
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise TypeError(f"dtype must be a float type, got {dt}")
    if score_mode not in ("dot", "concat"):
        raise ValueError(f"score_mode must be 'dot' or 'concat', got {score_mode!r}")
    q = _as_float(query, "query", dt)
    v = _as_float(value, "value", dt)
    k = v if key is None else _as_float(key, "key", dt)
    _check_shapes(q, v, k)

    scores = _calculate_scores(q, k, score_mode, scale, concat_score_weight, dt)
    keep = _calculate_score_mask(scores.shape, value_mask, use_causal_mask)
    weights = _masked_softmax(scores, keep)
    output = np.matmul(weights, v)

    if query_mask is not None:
        q_keep = _as_bool(query_mask, "query_mask")
        if q_keep.ndim == 0 or q_keep.shape[-1] != output.shape[-2]:
            raise ValueError(
                f"query_mask must end in Tq: query_mask {q_keep.shape}, query {q.shape}"
            )
        q_keep = _broadcast_leading(q_keep[..., None], output.shape, "query_mask")
        # np.where, not a multiply: a masked row is exactly 0 even if the row held inf or nan.
        output = np.where(q_keep, output, dt.type(0))
    return output, weights


def _as_float(x: ArrayLike, name: str, dtype: np.dtype) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., T, D), got shape {arr.shape}")
    return arr.astype(dtype, copy=False)


def _as_bool(mask: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a bool or numeric array, got dtype {arr.dtype}")
    # Keras applies logical_not to the mask: any non-zero number (also nan) means keep.
    keep: np.ndarray = arr != 0
    return keep


def _check_shapes(q: np.ndarray, v: np.ndarray, k: np.ndarray) -> None:
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"query and key must have the same last dim D, got query {q.shape}, key {k.shape}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"key and value must have the same Tv (axis -2), got key {k.shape}, value {v.shape}"
        )
    if k.shape[-2] == 0:
        # as in Keras, whose softmax (a max over the empty axis) raises here
        raise ValueError(f"there must be at least one key (Tv >= 1), got key {k.shape}")
    try:
        np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(
            "leading batch dims of query, key and value do not broadcast: "
            f"query {q.shape}, key {k.shape}, value {v.shape}"
        ) from None


def _calculate_scores(
    q: np.ndarray,
    k: np.ndarray,
    score_mode: str,
    scale: float | None,
    concat_score_weight: float,
    dt: np.dtype,
) -> np.ndarray:
    """Scores `(..., Tq, Tv)`; each operation rounds in `dt`, in Keras's order."""
    if score_mode == "dot":
        scores = np.matmul(q, np.swapaxes(k, -2, -1))
        if scale is not None:
            scores = scores * dt.type(scale)
        dot: np.ndarray = scores
        return dot
    # concat: (..., Tq, 1, D) + (..., 1, Tv, D) -> (..., Tq, Tv, D), as Keras builds it.
    summed = q[..., :, None, :] + k[..., None, :, :]
    if scale is not None:
        summed = dt.type(scale) * summed
    concat: np.ndarray = dt.type(concat_score_weight) * np.sum(np.tanh(summed), axis=-1)
    return concat


def _calculate_score_mask(
    score_shape: tuple[int, ...], value_mask: ArrayLike | None, use_causal_mask: bool
) -> np.ndarray | None:
    """Boolean keep-mask broadcast to `score_shape`, or None when nothing is masked."""
    keep = None
    if value_mask is not None:
        keep = _as_bool(value_mask, "value_mask")
        if keep.ndim > len(score_shape):
            raise ValueError(
                f"value_mask has more dims than the scores: value_mask {keep.shape}, "
                f"scores {score_shape}"
            )
        if keep.ndim < len(score_shape):
            # per-key mask (..., Tv): the same keys for every query row
            if keep.ndim == 0 or keep.shape[-1] != score_shape[-1]:
                raise ValueError(
                    f"a per-key value_mask must end in Tv: value_mask {keep.shape}, "
                    f"scores {score_shape}"
                )
            keep = keep[..., None, :]
        elif keep.shape[-2:] != score_shape[-2:]:
            raise ValueError(
                f"a full value_mask must end in (Tq, Tv): value_mask {keep.shape}, "
                f"scores {score_shape}"
            )
        keep = _broadcast_leading(keep, score_shape, "value_mask")
    if use_causal_mask:
        tq, tv = score_shape[-2:]
        causal = np.tri(tq, tv, dtype=bool)  # row i keeps columns j <= i (top-left aligned)
        keep = causal if keep is None else np.logical_and(keep, causal)
    return keep


def _broadcast_leading(mask: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """`mask` broadcast to `shape`: its T dims already match, its leading dims may be 1."""
    try:
        return np.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(
            f"the leading dims of {name} {mask.shape} do not broadcast to the batch dims of {shape}"
        ) from None


def _masked_softmax(scores: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """Keras's masking and its numpy backend's softmax over the last axis."""
    if keep is not None:
        # Keras subtracts a large bias instead of using -inf, so a fully masked row gets finite
        # scores (and weights over all keys) rather than nan. The subtraction rounds in the score
        # dtype, which is part of Keras's numbers: in float32 the masked scores collapse to
        # multiples of 64 near -1e9. 65504 is float16's largest finite value.
        bias = 65504.0 if scores.dtype == np.float16 else 1.0e9
        scores = np.where(keep, scores, scores - scores.dtype.type(bias))
    e = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    weights: np.ndarray = e / np.sum(e, axis=-1, keepdims=True)
    return weights

"""Keras's `Attention` forward written in `jax.numpy`, so `jax.vjp` gives reference gradients.

The same semantics as python/luong/reference.py, step by step (scores, score mask, apply scores),
with the parameters `scale` and `concat_score_weight` as differentiable inputs:

- scores: dot `q @ kᵀ` (`× scale`), or concat `w · Σ_d tanh(scale · (q + k))`;
- masked scores get `1e9` subtracted, in the working dtype (Keras's rule: the bias is a constant,
  so the derivative of a masked score is 1, and a fully masked row still has gradients);
- softmax over Tv as `exp(x - max) / sum`;
- optional dropout with a given keep-mask and inverted scaling, `w · keep / (1 - rate)`;
- output `weights @ value`; rows where the query mask is false are set to 0 with `where`.

Masks: a value mask with fewer dims than the scores is per-key `(..., Tv)` and is expanded at -2;
with as many dims it is a full score mask `(..., Tq, Tv)`; causal is top-left (`j <= i`).
Leading batch dims broadcast NumPy-style, so a key/value with batch dim 1 gets its gradient summed
over the batch, as the layer's does.

float64 needs JAX's x64 mode; `vjp` turns it on only for its own duration (`jax.enable_x64`), so
nothing leaks into other tests, and hands back NumPy arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PARAMS", "attention", "forward", "vjp"]

# The differentiable inputs, with the layer's gradient keys. "key" is absent when the key is the
# value (its path then adds into "value"), "scale" when there is no scale, "concat_score_weight"
# in dot mode.
PARAMS = ("query", "value", "key", "scale", "concat_score_weight")


def scores(params: Mapping[str, Any], score_mode: str) -> jax.Array:
    """`(..., Tq, Tv)` scores from query, key (or value) and the scalar weights."""
    q = params["query"]
    k = params["key"] if "key" in params else params["value"]
    scale = params.get("scale")
    if score_mode == "dot":
        s = jnp.matmul(q, jnp.swapaxes(k, -2, -1))
        return s if scale is None else s * scale
    if score_mode != "concat":
        raise ValueError(f"score_mode must be 'dot' or 'concat', got {score_mode!r}")
    summed = q[..., :, None, :] + k[..., None, :, :]  # (..., Tq, Tv, D), as Keras builds it
    if scale is not None:
        summed = scale * summed
    return params["concat_score_weight"] * jnp.sum(jnp.tanh(summed), axis=-1)


def score_keep_mask(
    score_shape: tuple[int, ...], value_mask: Any, use_causal_mask: bool
) -> jax.Array | None:
    """Boolean keep-mask broadcast to `score_shape` (None: nothing masked); reference.py's rule."""
    keep = None
    if value_mask is not None:
        keep = jnp.asarray(value_mask) != 0
        if keep.ndim < len(score_shape):
            assert keep.shape[-1] == score_shape[-1], (keep.shape, score_shape)
            keep = keep[..., None, :]  # per-key: the same keys for every query row
        else:
            assert keep.shape[-2:] == score_shape[-2:], (keep.shape, score_shape)
        keep = jnp.broadcast_to(keep, score_shape)
    if use_causal_mask:
        causal = jnp.tri(*score_shape[-2:], dtype=bool)
        keep = causal if keep is None else jnp.logical_and(keep, causal)
    return keep


def apply_scores(
    s: jax.Array,
    value: jax.Array,
    *,
    keep: jax.Array | None,
    query_mask: Any = None,
    dropout_keep: Any = None,
    dropout_rate: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """`(output, weights)` from scores: mask bias, softmax, dropout, `@ value`, query mask."""
    if keep is not None:
        # where keeps both branches differentiable: d(s - 1e9)/ds = 1, as in Keras.
        s = jnp.where(keep, s, s - jnp.asarray(1.0e9, dtype=s.dtype))
    # The max only shifts the exponent and cancels in the quotient, so its exact derivative is 0;
    # stop_gradient says so instead of routing rounding noise through the argmax.
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    weights = e / jnp.sum(e, axis=-1, keepdims=True)
    if dropout_keep is not None:
        keep_prob = jnp.asarray(1.0 - dropout_rate, dtype=weights.dtype)
        weights = jnp.where(jnp.asarray(dropout_keep), weights / keep_prob, 0)
    output = jnp.matmul(weights, value)
    if query_mask is not None:
        q_keep = jnp.asarray(query_mask) != 0
        output = jnp.where(q_keep[..., None], output, 0)
    return output, weights


def attention(
    params: Mapping[str, Any],
    *,
    score_mode: str = "dot",
    query_mask: Any = None,
    value_mask: Any = None,
    use_causal_mask: bool = False,
    dropout_keep: Any = None,
    dropout_rate: float = 0.0,
) -> jax.Array:
    """The layer's output `(..., Tq, Dv)` as a function of the differentiable `params`.

    `params` holds "query", "value" and optionally "key", "scale", "concat_score_weight" (required
    in concat mode). `dropout_keep` is a boolean `(..., Tq, Tv)` keep-mask (None: no dropout).
    """
    s = scores(params, score_mode)
    keep = score_keep_mask(s.shape, value_mask, use_causal_mask)
    output, _ = apply_scores(
        s,
        params["value"],
        keep=keep,
        query_mask=query_mask,
        dropout_keep=dropout_keep,
        dropout_rate=dropout_rate,
    )
    return output


def _as_params(params: Mapping[str, Any], dtype: Any) -> dict[str, np.ndarray]:
    unknown = set(params) - set(PARAMS)
    assert not unknown, f"unknown params {unknown}"
    return {name: np.asarray(x, dtype=dtype) for name, x in params.items() if x is not None}


def _as_mask(mask: Any) -> np.ndarray | None:
    # Masks enter the compiled functions as bool arrays: one compilation per shape, not per dtype.
    return None if mask is None else np.asarray(mask) != 0


@functools.partial(jax.jit, static_argnames=("score_mode", "use_causal_mask", "dropout_rate"))
def _output_and_grads(
    params: dict[str, jax.Array],
    d_output: jax.Array,
    query_mask: jax.Array | None,
    value_mask: jax.Array | None,
    dropout_keep: jax.Array | None,
    *,
    score_mode: str,
    use_causal_mask: bool,
    dropout_rate: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    # One XLA compilation per case instead of one per primitive and shape (eager mode): about
    # 10x faster over the test matrix, whose cases nearly all have shapes of their own.
    def output(p: dict[str, jax.Array]) -> jax.Array:
        return attention(
            p,
            score_mode=score_mode,
            query_mask=query_mask,
            value_mask=value_mask,
            use_causal_mask=use_causal_mask,
            dropout_keep=dropout_keep,
            dropout_rate=dropout_rate,
        )

    out, pullback = jax.vjp(output, params)
    (grads,) = pullback(d_output)
    return out, grads


def vjp(
    params: Mapping[str, Any],
    d_output: Any,
    dtype: Any = np.float64,
    *,
    score_mode: str = "dot",
    query_mask: Any = None,
    value_mask: Any = None,
    use_causal_mask: bool = False,
    dropout_keep: Any = None,
    dropout_rate: float = 0.0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`(output, grads)`: the output and `jax.vjp` of `attention` at `d_output`, computed in
    `dtype`; the grads are keyed like `params`. Arguments as `attention`."""
    with jax.enable_x64(True):
        output, grads = _output_and_grads(
            _as_params(params, dtype),
            np.asarray(d_output, dtype=dtype),
            _as_mask(query_mask),
            _as_mask(value_mask),
            _as_mask(dropout_keep),
            score_mode=score_mode,
            use_causal_mask=bool(use_causal_mask),
            dropout_rate=float(dropout_rate),
        )
        return np.asarray(output), {name: np.asarray(g) for name, g in grads.items()}


def forward(params: Mapping[str, Any], dtype: Any = np.float64, **options: Any) -> np.ndarray:
    """`attention(params, **options)` computed in `dtype`, as a NumPy array."""
    q, v = np.shape(params["query"]), np.shape(params["value"])
    k = v if params.get("key") is None else np.shape(params["key"])
    batch = np.broadcast_shapes(q[:-2], k[:-2], v[:-2])
    return vjp(params, np.zeros((*batch, q[-2], v[-1])), dtype, **options)[0]

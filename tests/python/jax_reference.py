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

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PARAMS", "attention", "vjp", "forward", "directional_derivatives"]

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
) -> np.ndarray | None:
    """Boolean keep-mask broadcast to `score_shape` (None: nothing masked); reference.py's rule."""
    keep = None
    if value_mask is not None:
        keep = np.asarray(value_mask) != 0
        if keep.ndim < len(score_shape):
            assert keep.shape[-1] == score_shape[-1], (keep.shape, score_shape)
            keep = keep[..., None, :]  # per-key: the same keys for every query row
        else:
            assert keep.shape[-2:] == score_shape[-2:], (keep.shape, score_shape)
        keep = np.broadcast_to(keep, score_shape)
    if use_causal_mask:
        causal = np.tri(*score_shape[-2:], dtype=bool)
        keep = causal if keep is None else np.logical_and(keep, causal)
    return keep


def apply_scores(
    s: jax.Array,
    value: jax.Array,
    *,
    keep: np.ndarray | None,
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
        weights = jnp.where(np.asarray(dropout_keep), weights / keep_prob, 0)
    output = jnp.matmul(weights, value)
    if query_mask is not None:
        q_keep = np.asarray(query_mask) != 0
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


def _as_params(params: Mapping[str, Any], dtype: Any) -> dict[str, jax.Array]:
    unknown = set(params) - set(PARAMS)
    assert not unknown, f"unknown params {unknown}"
    return {
        name: jnp.asarray(np.asarray(x, dtype=dtype))
        for name, x in params.items()
        if x is not None
    }


def forward(params: Mapping[str, Any], dtype: Any = np.float64, **options: Any) -> np.ndarray:
    """`attention(params, **options)` computed in `dtype`, as a NumPy array."""
    with jax.enable_x64(True):
        return np.asarray(attention(_as_params(params, dtype), **options))


def vjp(
    params: Mapping[str, Any], d_output: Any, dtype: Any = np.float64, **options: Any
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`(output, grads)`: `jax.vjp` of `attention` in `dtype`; grads keyed like `params`."""
    with jax.enable_x64(True):
        p = _as_params(params, dtype)
        output, pullback = jax.vjp(lambda p: attention(p, **options), p)
        (grads,) = pullback(jnp.asarray(np.asarray(d_output, dtype=dtype)))
        return np.asarray(output), {name: np.asarray(g) for name, g in grads.items()}


def directional_derivatives(
    params: Mapping[str, Any], d_output: Any, dtype: Any = np.float64, **options: Any
) -> dict[str, float]:
    """For each scalar parameter θ (scale, concat_score_weight): `Σ |∂L/∂s · ∂s/∂θ|`.

    `L = Σ d_output · output`. The gradient of θ is the same sum without the absolute values, so
    this is the size of the terms that cancel into it: the sensible scale for its tolerance (a
    relative error on a sum that cancels to almost 0 would be meaningless).
    """
    score_mode = options.get("score_mode", "dot")
    rest = {k: v for k, v in options.items() if k != "score_mode"}
    with jax.enable_x64(True):
        p = _as_params(params, dtype)
        s = scores(p, score_mode)
        keep = score_keep_mask(
            s.shape, rest.pop("value_mask", None), rest.pop("use_causal_mask", False)
        )

        def from_scores(s: jax.Array) -> jax.Array:
            return apply_scores(s, p["value"], keep=keep, **rest)[0]

        _, pullback = jax.vjp(from_scores, s)
        (d_scores,) = pullback(jnp.asarray(np.asarray(d_output, dtype=dtype)))
        sizes = {}
        for theta in ("scale", "concat_score_weight"):
            if theta not in p:
                continue
            tangent = {k: jnp.zeros_like(v) for k, v in p.items()}
            tangent[theta] = jnp.ones_like(p[theta])
            _, ds_dtheta = jax.jvp(lambda q: scores(q, score_mode), (p,), (tangent,))
            sizes[theta] = float(jnp.sum(jnp.abs(d_scores * ds_dtheta)))
        return sizes

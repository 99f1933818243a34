"""Half precision: float16 and bfloat16 inputs and outputs, computed in float32 inside.

What must hold:
- the half-precision result is the float32 computation on the widened inputs, rounded once to
  the storage type (bit for bit, for rows that are not fully masked);
- it matches Keras's own float16 / bfloat16 layer within half-precision rounding, with the same
  tolerance rule as the float32 parity tests (`attention_cases.tolerance_for`) at the storage
  type's epsilon;
- fully masked float16 rows: Keras's `s - 65504` overflows to -inf and its weights are NaN;
  luong's weights are finite (a documented difference);
- the dtype policies: "float16", "bfloat16", "mixed_float16" (float32 weights), "mixed_bfloat16".
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
from attention_cases import EPS, assert_close, tolerance_for

import luong

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF = {"float16": F16, "bfloat16": BF16}
# The tolerance rule of the float32 parity tests, at the storage type's epsilon.
EPS.update({F16: float(np.finfo(np.float16).eps), BF16: float(ml_dtypes.finfo(BF16).eps)})


def _problem(seed: int, dtype: np.dtype, causal: bool, mask: str) -> dict[str, Any]:
    """Random inputs in `dtype` with masks that never mask a whole row."""
    rng = np.random.default_rng(seed)
    b, tq, tv, d, dv = 2, 7, 11, 16, 8
    q = rng.standard_normal((b, tq, d)).astype(dtype)
    k = rng.standard_normal((b, tv, d)).astype(dtype)
    v = rng.standard_normal((b, tv, dv)).astype(dtype)
    value_mask = None
    if mask == "keys":
        value_mask = rng.random((b, tv)) < 0.7
        value_mask[:, 0] = True  # with causal, row 0 sees key 0 only
    elif mask == "scores":
        value_mask = rng.random((b, tq, tv)) < 0.7
        value_mask[:, :, 0] = True
    query_mask = rng.random((b, tq)) < 0.8
    return {"q": q, "k": k, "v": v, "vm": value_mask, "qm": query_mask, "causal": causal}


def _run(p: dict[str, Any], dtype: Any, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    out, scores = luong.attention(
        p["q"], p["v"], p["k"], query_mask=p["qm"], value_mask=p["vm"],
        use_causal_mask=p["causal"], return_attention_scores=True, dtype=dtype, **kw,
    )
    return out, scores


MODES = [
    {"score_mode": "dot"},
    {"score_mode": "dot", "scale": 0.3},
    {"score_mode": "concat", "scale": 0.5, "concat_score_weight": 0.8},
]


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(map(str, m.values())))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "keys", "scores"])
def test_half_is_float32_rounded_once(name: str, mode: dict, causal: bool, mask: str) -> None:
    dtype = HALF[name]
    p = _problem(1, dtype, causal, mask)
    out, scores = _run(p, name, **mode)
    assert out.dtype == dtype and scores.dtype == dtype
    wide = {**p, **{x: p[x].astype(np.float32) for x in ("q", "k", "v")}}
    out32, scores32 = _run(wide, "float32", **mode)
    # Rounded once: every element is the float32 result rounded to nearest even.
    np.testing.assert_array_equal(out.view(np.uint16), out32.astype(dtype).view(np.uint16))
    np.testing.assert_array_equal(scores.view(np.uint16), scores32.astype(dtype).view(np.uint16))


def _keras_half(keras: Any, p: dict[str, Any], name: str, mode: dict) -> tuple[Any, Any]:
    use_scale = "scale" in mode
    layer = keras.layers.Attention(
        use_scale=use_scale, score_mode=mode["score_mode"], dtype=name
    )
    inputs = [p["q"], p["v"], p["k"]]
    layer.build([x.shape for x in inputs])
    weights = ([mode["scale"]] if use_scale else []) + (
        [mode["concat_score_weight"]] if mode["score_mode"] == "concat" else []
    )
    for var, w in zip(layer.weights, weights):
        var.assign(np.asarray(w, dtype=var.dtype))
    out, scores = layer(
        inputs, mask=[p["qm"], p["vm"]], use_causal_mask=p["causal"],
        return_attention_scores=True,
    )
    return np.asarray(out), np.asarray(scores)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(map(str, m.values())))
# (Keras cannot combine a full score mask with its causal mask: that pair is luong's own.)
@pytest.mark.parametrize(
    ("causal", "mask"),
    [(False, None), (False, "keys"), (False, "scores"), (True, None), (True, "keys")],
)
@pytest.mark.filterwarnings("ignore:overflow encountered in subtract:RuntimeWarning")
def test_half_matches_keras_half(
    keras: Any, name: str, mode: dict, causal: bool, mask: str
) -> None:
    # (Keras's float16 `s - 65504` overflows to -inf for masked scores below -16: NumPy warns.)
    dtype = HALF[name]
    p = _problem(2, dtype, causal, mask)
    out, scores = _run(p, name, **mode)
    k_out, k_scores = _keras_half(keras, p, name, mode)
    w_atol, o_atol = tolerance_for(
        p["q"], p["v"], p["k"], mode["score_mode"], mode.get("scale"),
        mode.get("concat_score_weight", 1.0), dtype.name,
    )
    assert_close("weights", scores, k_scores, w_atol)
    assert_close("output", out, k_out, o_atol)


@pytest.mark.filterwarnings("ignore:overflow encountered in subtract:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_fully_masked_float16_rows_are_finite_where_keras_gives_nan(keras: Any) -> None:
    rng = np.random.default_rng(3)
    q = (4 * rng.standard_normal((1, 4, 16))).astype(np.float16)
    v = (4 * rng.standard_normal((1, 6, 16))).astype(np.float16)
    # Every score below -16, so Keras's float16 `s - 65504` is -inf for all of them.
    q = np.abs(q)
    v = -np.abs(v)
    mask = np.zeros((1, 6), bool)
    out, scores = luong.Attention(dtype="float16")([q, v], mask=[None, mask],
                                                   return_attention_scores=True)
    k_out = keras.layers.Attention(dtype="float16")([q, v], mask=[None, mask])
    assert np.isnan(np.asarray(k_out)).all()
    assert np.isfinite(out).all() and np.isfinite(scores).all()
    # The row's weights: the softmax of the scores minus 65504 (in float32, barely moved). Each
    # of the 6 weights is rounded to float16 (within 2^-11 relative), so the sum is within
    # 6 * 2^-11 = 2.9e-3 of 1.
    np.testing.assert_allclose(scores.astype(np.float32).sum(-1), 1.0, atol=4e-3)


def test_policies_and_weights(keras: Any) -> None:
    layer = luong.Attention(use_scale=True, dtype="mixed_float16")
    assert layer.dtype == "float32" and layer.compute_dtype == "float16"
    assert layer.scale is not None and layer.scale.dtype == np.float32
    assert layer.get_config()["dtype"] == "mixed_float16"
    assert luong.Attention.from_config(layer.get_config()).compute_dtype == "float16"
    q = np.ones((1, 2, 4), np.float32)
    assert layer([q, q]).dtype == np.float16  # float32 inputs are cast, as Keras does
    bf = luong.Attention(dtype="mixed_bfloat16")
    assert bf.dtype == "float32" and bf.compute_dtype == "bfloat16"
    assert bf([q, q]).dtype == BF16
    k_layer = keras.layers.Attention(dtype="mixed_float16")
    assert luong.Attention.from_config(k_layer.get_config()).compute_dtype == "float16"
    with pytest.raises(ValueError, match="mixed_float16"):
        luong.Attention(dtype="int8")


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_gradients_are_float32_gradients_rounded_once(name: str) -> None:
    dtype = HALF[name]
    p = _problem(4, dtype, True, "keys")
    rng = np.random.default_rng(5)
    d_out = rng.standard_normal((2, 7, 8)).astype(dtype)
    kw = {"query_mask": p["qm"], "value_mask": p["vm"], "use_causal_mask": True, "scale": 0.4}
    out, backward = luong.attention_vjp(p["q"], p["v"], p["k"], dtype=name, **kw)
    grads = backward(d_out)
    wide = [p[x].astype(np.float32) for x in ("q", "v", "k")]
    out32, backward32 = luong.attention_vjp(*wide, dtype="float32", **kw)
    grads32 = backward32(d_out.astype(np.float32))
    np.testing.assert_array_equal(out.view(np.uint16), out32.astype(dtype).view(np.uint16))
    assert set(grads) == set(grads32) == {"query", "value", "key", "scale"}
    for g in ("query", "value", "key", "scale"):
        assert grads[g].dtype == dtype, g
        np.testing.assert_array_equal(
            np.asarray(grads[g]).view(np.uint16),
            np.asarray(grads32[g]).astype(dtype).view(np.uint16),
            err_msg=g,
        )

"""`luong.jax.attention` (jax.custom_vjp over jax.pure_callback) under jit, grad and vmap.

The bridge runs luong's own kernels, so its forward and gradients must equal `luong.attention`
and `luong.attention_vjp` bit for bit; against JAX's autodiff of the plain formula
(jax_reference.py) they follow test_vjp.py's tolerance rule (vjp_cases.gradient_atol: in float64
far tighter than 1e-9 of the largest gradient), and, on cases where the softmax is not saturated,
float32 gradients are within 2e-4 of the largest gradient of each array.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import Case, Inputs, assert_close, make_inputs
from vjp_cases import (
    CASES,
    d_output,
    gradient_atol,
    gradient_sizes,
    has_fully_masked_row,
    jax_gradients,
    options,
    params,
)

import luong
import luong.jax

DTYPES = ("float64", "float32")
# Every fourth case of test_vjp.py's matrix: both score modes, with and without scale and key,
# causal or not, 0-2 leading dims, broadcasting, every mask kind, one large shape.
BRIDGE_CASES = CASES[::4]


@contextlib.contextmanager
def x64(on: bool = True) -> Iterator[None]:
    """JAX's x64 mode on (or off) for the duration, set globally.

    Not `jax.enable_x64(...)`: that context is thread-local, and XLA may run the bridge's
    callbacks on another thread, where JAX then checks their float64 results against float32.
    """
    before = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", on)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def _kwargs(case: Case, inputs: Inputs) -> dict[str, Any]:
    return {
        "query_mask": inputs.query_mask,
        "value_mask": inputs.value_mask,
        "score_mode": case.score_mode,
        "use_causal_mask": case.causal,
    }


def _luong(case: Case, inputs: Inputs, p: dict[str, np.ndarray], dtype: str):
    """`(output, backward)` from `luong.attention_vjp` with the case's parameters."""
    return luong.attention_vjp(
        p["query"],
        p["value"],
        p.get("key"),
        scale=float(p["scale"]) if "scale" in p else None,
        concat_score_weight=float(p.get("concat_score_weight", 1.0)),
        dtype=dtype,
        **_kwargs(case, inputs),
    )


def _scales(grads: dict[str, np.ndarray]) -> dict[str, float]:
    """Each gradient's largest magnitude, the scale its tolerance is a fraction of.

    An array whose exact gradient is all zero (the key's with one key: the softmax is constant)
    has no scale of its own; there the largest gradient of any array is the scale (rounding
    leaves ~1e-9 of it there in float32, ~1e-19 in float64, not exact zeros). All 0 when every
    gradient is 0 (every query row masked): then only exact zeros pass.
    """
    tops = {name: float(np.max(np.abs(g), initial=0.0)) for name, g in grads.items()}
    overall = max(tops.values())
    return {name: top or overall for name, top in tops.items()}


def _bridge_loss(case: Case, inputs: Inputs):
    """`(forward, loss)`: functions of the params dict through luong.jax."""

    def forward(p: dict[str, jax.Array]) -> jax.Array:
        out = luong.jax.attention(
            p["query"],
            p["value"],
            p.get("key"),
            scale=p.get("scale"),
            concat_score_weight=p.get("concat_score_weight", 1.0),
            **_kwargs(case, inputs),
        )
        assert isinstance(out, jax.Array)
        return out

    def loss(p: dict[str, jax.Array], do: jax.Array) -> jax.Array:
        return jnp.sum(do * forward(p))

    return forward, loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BRIDGE_CASES, ids=lambda c: c.id)
def test_jit_and_grad_are_luongs_kernels(case: Case, dtype: str) -> None:
    inputs = make_inputs(case)
    p = params(case, inputs, dtype)
    do = d_output(case, inputs, dtype)
    expected_output, backward = _luong(case, inputs, p, dtype)
    expected = backward(do)
    forward, loss = _bridge_loss(case, inputs)
    with x64(dtype == "float64"):
        eager = np.asarray(forward(p))
        jitted = np.asarray(jax.jit(forward)(p))
        grads = jax.jit(jax.grad(loss))(p, do)
        grads = {name: np.asarray(g) for name, g in grads.items()}
    for what, out in (("eager", eager), ("jit", jitted)):
        np.testing.assert_array_equal(out, expected_output, strict=True, err_msg=f"{what} output")
    # "concat_score_weight" is a param in concat mode only, so the keys are luong's
    assert set(grads) == set(expected), (sorted(grads), sorted(expected))
    for name, g in grads.items():
        np.testing.assert_array_equal(g, expected[name], strict=True, err_msg=f"grad {name}")

    # and against JAX's autodiff of Keras's formula, by test_vjp.py's rule
    _, reference = jax_gradients(case, dtype)
    sizes = gradient_sizes(p, do, **options(case, inputs))
    for name, want in reference.items():
        assert_close(
            f"{case.id} {dtype} {name}", grads[name], want, gradient_atol(sizes[name], dtype)
        )
        if dtype == "float64":  # 1e-9 of the largest gradient: implied by the rule, said here
            top = _scales(reference)[name]
            assert_close(f"{case.id} {name} 1e-9", grads[name], want, 1e-9 * top)


# Unsaturated cases (magnitude <= 1) without fully masked rows: float32 within 2e-4 of the
# largest gradient. (Saturated ones and fully masked rows, whose scores carry float32's rounding
# of `s - 1e9`, are covered by the rule above: there no float32 computation meets a fixed
# fraction, see test_vjp.py.)
UNSATURATED = [
    c
    for c in BRIDGE_CASES
    if c.magnitude <= 1.0
    and not has_fully_masked_row(c, make_inputs(c))
    and not (c.query_mask == "allmasked" and c.leading_dims == 0)  # every gradient 0
][:8]


@pytest.mark.parametrize("case", UNSATURATED, ids=lambda c: c.id)
def test_float32_gradients_within_2e_4_of_jax_float64(case: Case) -> None:
    inputs = make_inputs(case)
    p = params(case, inputs, "float32")
    do = d_output(case, inputs, "float32")
    _, loss = _bridge_loss(case, inputs)
    grads = jax.jit(jax.grad(loss))(p, do)
    _, reference = jax_gradients(case, "float64", "float32")
    assert set(grads) == set(reference)
    scales = _scales(reference)
    assert max(scales.values()) > 0, f"{case.id}: all gradients are 0, a useless check"
    for name, want in reference.items():
        assert_close(f"{case.id} {name}", np.asarray(grads[name]), want, 2e-4 * scales[name])


# ---------------------------------------------------------------------------------------------
# vmap


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def test_vmap_over_queries_with_shared_value_and_mixed_ranks() -> None:
    # The query has a batch dim of its own (3) and the value none: the mapped axis must not be
    # taken for the query's batch dim.
    rng = np.random.default_rng(1)
    queries = _normal(rng, 5, 3, 4, 6)  # mapped: 5 x (3, Tq=4, D=6)
    value, key = _normal(rng, 7, 2), _normal(rng, 7, 6)
    value_mask = rng.random(7) < 0.7
    f = jax.jit(
        jax.vmap(
            lambda q: luong.jax.attention(
                q, value, key, value_mask=value_mask, scale=0.3, use_causal_mask=True
            )
        )
    )
    out = np.asarray(f(queries))
    assert out.shape == (5, 3, 4, 2)
    for i in range(5):
        expected = luong.attention(
            queries[i], value, key, value_mask=value_mask, scale=0.3, use_causal_mask=True
        )
        np.testing.assert_array_equal(out[i], expected, strict=True, err_msg=str(i))


def test_vmap_over_masks_only_and_nested() -> None:
    rng = np.random.default_rng(2)
    q, v = _normal(rng, 2, 3, 4), _normal(rng, 2, 5, 4)
    full_masks = rng.random((3, 2, 2, 3, 5)) < 0.6  # two mapped axes of full score masks

    def one(m: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = luong.jax.attention(q, v, value_mask=m, return_attention_scores=True)
        assert isinstance(out, tuple)
        return out

    out, scores = jax.vmap(jax.vmap(one))(full_masks)
    for i, j in np.ndindex(3, 2):
        e_out, e_scores = luong.attention(
            q, v, value_mask=full_masks[i, j], return_attention_scores=True
        )
        np.testing.assert_array_equal(np.asarray(out)[i, j], e_out, strict=True)
        np.testing.assert_array_equal(np.asarray(scores)[i, j], e_scores, strict=True)


def test_vmap_of_grad_gives_per_example_gradients_also_of_scale() -> None:
    # Each example has its own scale (the forward loops per example then) and gets its own
    # gradients, the value's and scale's included, not their sum over the mapped axis.
    rng = np.random.default_rng(3)
    queries = _normal(rng, 4, 2, 3, 5)
    value, key = _normal(rng, 2, 6, 3), _normal(rng, 2, 6, 5)
    scales = np.linspace(0.2, 1.1, 4).astype(np.float32)
    do = _normal(rng, 2, 3, 3)

    def loss(q: jax.Array, v: jax.Array, s: jax.Array) -> jax.Array:
        return jnp.sum(do * luong.jax.attention(q, v, key, scale=s, score_mode="concat"))

    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, 0)))(
        queries, value, scales
    )
    for i in range(4):
        _, backward = luong.attention_vjp(
            queries[i], value, key, scale=float(scales[i]), score_mode="concat"
        )
        expected = backward(do)
        for got, name in zip(grads, ("query", "value", "scale")):
            np.testing.assert_array_equal(
                np.asarray(got)[i], expected[name], strict=True, err_msg=f"{i} {name}"
            )
    assert len({float(g) for g in np.asarray(grads[2])}) == 4


def test_vmap_of_grad_with_shared_weights_and_mixed_ranks() -> None:
    # One kernel call for the mapped forward (the scale is shared), whose saved row statistics
    # the per-example backward slices; the value, shared and of lower rank, gets per-example
    # gradients.
    rng = np.random.default_rng(6)
    queries = _normal(rng, 4, 3, 5, 6)
    value, key = _normal(rng, 7, 2), _normal(rng, 7, 6)
    value_mask = rng.random(7) < 0.7
    do = _normal(rng, 3, 5, 2)

    def loss(q: jax.Array, v: jax.Array) -> jax.Array:
        out = luong.jax.attention(q, v, key, value_mask=value_mask, scale=0.4, use_causal_mask=True)
        return jnp.sum(do * out)

    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(queries, value)
    assert grads[1].shape == (4, 7, 2)
    for i in range(4):
        _, backward = luong.attention_vjp(
            queries[i], value, key, value_mask=value_mask, scale=0.4, use_causal_mask=True
        )
        expected = backward(do)
        for got, name in zip(grads, ("query", "value")):
            np.testing.assert_array_equal(
                np.asarray(got)[i], expected[name], strict=True, err_msg=f"{i} {name}"
            )


# ---------------------------------------------------------------------------------------------
# dropout

RATE, SEED = 0.3, 42


def test_dropout_call_index_is_the_layers_call_counter() -> None:
    # The n-th training call of luong.Attention(dropout, seed) uses call index n; so does
    # luong.jax.attention(call=n), also with n traced under jit, and its gradients are the
    # layer's vjp at that call (the backward recomputes the forward's masks).
    rng = np.random.default_rng(4)
    q, v, k = _normal(rng, 2, 6, 4), _normal(rng, 2, 9, 3), _normal(rng, 2, 9, 4)
    layer = luong.Attention(use_scale=True, dropout=RATE, seed=SEED)
    layer.set_weights([np.float32(0.7)])
    layer_outputs = [layer([q, v, k], training=True) for _ in range(3)]
    assert not np.array_equal(layer_outputs[0], layer_outputs[1])

    def forward(q: jax.Array, v: jax.Array, k: jax.Array, s: jax.Array, call: jax.Array):
        return luong.jax.attention(
            q, v, k, scale=s, dropout=RATE, seed=SEED, call=call, training=True
        )

    jitted = jax.jit(forward)
    for n in range(3):
        out = np.asarray(jitted(q, v, k, np.float32(0.7), n))
        np.testing.assert_array_equal(out, layer_outputs[n], strict=True, err_msg=f"call {n}")
    # without training, no dropout
    plain = luong.jax.attention(q, v, k, scale=0.7, dropout=RATE, seed=SEED)
    np.testing.assert_array_equal(np.asarray(plain), luong.attention(q, v, k, scale=0.7))

    vjp_layer = luong.Attention(use_scale=True, dropout=RATE, seed=SEED)
    vjp_layer.set_weights([np.float32(0.7)])
    vjp_layer([q, v, k], training=True)  # call 0
    _, backward = vjp_layer.vjp([q, v, k], training=True)  # call 1
    do = _normal(rng, 2, 6, 3)
    grads = jax.grad(lambda *a: jnp.sum(do * forward(*a)), argnums=(0, 1, 2, 3))(
        q, v, k, np.float32(0.7), 1
    )
    expected = backward(do)
    for got, name in zip(grads, ("query", "value", "key", "scale")):
        np.testing.assert_array_equal(np.asarray(got), expected[name], strict=True, err_msg=name)


def test_dropout_without_a_seed_is_a_value_error() -> None:
    q = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="seed"):
        luong.jax.attention(q, q, dropout=0.5, training=True)
    with pytest.raises(ValueError, match="dropout"):
        luong.jax.attention(q, q, dropout=1.5, seed=1, training=True)


# ---------------------------------------------------------------------------------------------
# scores, errors, dtypes, imports


def test_returned_scores_are_luongs_and_carry_no_gradient() -> None:
    rng = np.random.default_rng(5)
    q, v = _normal(rng, 3, 4), _normal(rng, 6, 4)
    out, scores = luong.jax.attention(q, v, use_causal_mask=True, return_attention_scores=True)
    e_out, e_scores = luong.attention(q, v, use_causal_mask=True, return_attention_scores=True)
    np.testing.assert_array_equal(np.asarray(out), e_out, strict=True)
    np.testing.assert_array_equal(np.asarray(scores), e_scores, strict=True)

    def both(q: jax.Array) -> tuple[jax.Array, jax.Array]:
        result = luong.jax.attention(q, v, use_causal_mask=True, return_attention_scores=True)
        assert isinstance(result, tuple)
        return result

    # only the explicit factor q[:, :1] contributes: the scores' own path is stopped
    g = np.asarray(jax.grad(lambda q: jnp.sum(both(q)[1] * q[:, :1]))(q))
    np.testing.assert_array_equal(g[:, 1:], 0)
    np.testing.assert_array_equal(g[:, 0], np.asarray(scores).sum(-1))
    # the output's gradient is luong's, also when the scores are returned (the backward then
    # reruns the forward instead of reading saved row statistics)
    do = _normal(rng, 3, 4)
    g = np.asarray(jax.jit(jax.grad(lambda q: jnp.sum(do * both(q)[0])))(q))
    _, backward = luong.attention_vjp(q, v, use_causal_mask=True)
    np.testing.assert_array_equal(g, backward(do)["query"], strict=True)


@pytest.mark.parametrize(
    "shapes, match",
    [
        ({"key": (2, 5, 3)}, r"\(2, 5, 3\).*\(2, 3, 4\)"),
        ({"key": (2, 6, 4)}, r"\(2, 6, 4\).*\(2, 5, 6\)"),
        ({"key": (3, 5, 4)}, r"\(3, 5, 4\).*\(2, 3, 4\)"),
        ({"query_mask": (2, 4)}, r"query_mask.*\(2, 4\)"),
        ({"value_mask": (3, 5)}, r"value_mask.*\(3, 5\)"),
        ({"value_mask": (2, 3, 4)}, r"value_mask.*\(2, 3, 4\)"),
    ],
)
def test_shape_mistakes_are_value_errors_while_tracing(shapes: dict, match: str) -> None:
    arrays = {"query": (2, 3, 4), "value": (2, 5, 6), "key": (2, 5, 4), **shapes}
    a = {n: np.ones(s, np.bool_ if "mask" in n else np.float32) for n, s in arrays.items()}
    # luong's own kernel rejects the same call
    with pytest.raises(ValueError):
        luong.attention(a.pop("query"), a.pop("value"), a.pop("key"), **a)
    a = {n: np.ones(s, np.bool_ if "mask" in n else np.float32) for n, s in arrays.items()}
    with pytest.raises(ValueError, match=match):
        jax.jit(
            lambda q: luong.jax.attention(
                q,
                a["value"],
                a["key"],
                query_mask=a.get("query_mask"),
                value_mask=a.get("value_mask"),
            )
        )(a["query"])


def test_other_argument_errors() -> None:
    q = np.ones((2, 3, 4), np.float32)
    with pytest.raises(TypeError, match="real numbers"):
        luong.jax.attention(q.astype(np.complex64), q)
    with pytest.raises(ValueError, match="scale"):
        luong.jax.attention(q, q, scale=np.ones(2, np.float32))
    with pytest.raises(ValueError, match="call"):
        luong.jax.attention(q, q, call=1.5)
    with pytest.raises(ValueError, match="score_mode"):
        luong.jax.attention(q, q, score_mode="additive")


def test_dtype_follows_the_inputs() -> None:
    q = np.linspace(-1, 1, 24).reshape(2, 3, 4)
    # float64 NumPy input without x64: JAX computes in float32, and so does luong
    out = luong.jax.attention(q, q)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), luong.attention(q, q), strict=True)
    with x64():
        out64 = luong.jax.attention(q, q, scale=jnp.float64(0.5))
        assert out64.dtype == jnp.float64
        expected = luong.attention(q, q, scale=0.5, dtype="float64")
        np.testing.assert_array_equal(np.asarray(out64), expected, strict=True)
    ints = np.arange(24, dtype=np.int32).reshape(2, 3, 4) % 3
    assert luong.jax.attention(ints, ints).dtype == jnp.float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_forward_and_gradients_are_luongs(dtype: str) -> None:
    """float16 / bfloat16 arrays under jit and grad: the output and the gradients are
    `luong.attention` / `luong.attention_vjp` on the same half arrays, bit for bit, in that dtype
    (the backward reruns the forward in float32, as luong's does)."""
    rng = np.random.default_rng(5)
    half = jnp.dtype(dtype)
    q, v, k = (jnp.asarray(rng.standard_normal(s), half) for s in [(2, 6, 4), (2, 7, 5), (2, 7, 4)])
    mask = np.array([[True] * 7, [True, False] * 3 + [True]])
    kwargs: dict[str, Any] = dict(value_mask=mask, scale=0.5, use_causal_mask=True)

    def f(q: Any, v: Any, k: Any) -> Any:
        return luong.jax.attention(q, v, k, **kwargs)

    out = jax.jit(f)(q, v, k)
    assert out.dtype == half
    arrays = [np.asarray(x) for x in (q, v, k)]
    expected = luong.attention(*arrays, **kwargs, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(out), expected, strict=True)
    d_out = jnp.asarray(rng.standard_normal(out.shape), half)
    _, pullback = jax.vjp(f, q, v, k)
    grads = pullback(d_out)
    _, backward = luong.attention_vjp(*arrays, **kwargs, dtype=dtype)
    want = backward(np.asarray(d_out))
    for name, g in zip(["query", "value", "key"], grads):
        assert g.dtype == half, name
        np.testing.assert_array_equal(np.asarray(g), want[name], strict=True, err_msg=name)
    assert any(np.any(np.asarray(g) != 0) for g in grads)


def test_import_luong_imports_neither_jax_nor_keras() -> None:
    code = (
        "import sys, luong; "
        "bad = [m for m in ('jax', 'keras', 'torch') if m in sys.modules]; "
        "assert not bad, bad; "
        "import luong.jax; assert 'jax' in sys.modules"
    )
    package = str(Path(luong.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr

"""luong's gradients (`Attention.vjp`, `luong.attention_vjp`) against `jax.vjp` of the Keras formula
and against finite differences; dropout's backward against the forward's own dropped weights.

The JAX formula, the case matrix and the tolerance rule are in jax_reference.py and vjp_cases.py;
test_jax_reference.py holds the formula to reference.py and to finite differences, and shows the
rule bounds a float32 computation's error and still catches real mistakes.

Tolerance: `C · eps · size`, entry by entry, where `size` carries the forward rule's score
sensitivity through the backward pass (vjp_cases.gradient_sizes; C is measured, see there). In
float64 that is far tighter than 1e-9 of the largest gradient. In float32 it is tighter than
2e-4 of the largest gradient where the softmax is not saturated, and looser where it is: there
no float32 computation gets within a fixed fraction of the largest gradient (JAX's own float32
gradients reach 1.6e-4 of it on this matrix, and were 7% off on an earlier draw of the matrix,
a saturated 16x65x64 case, magnitude 3, where every gradient is tiny).

Measured, cases without fully masked rows, as a fraction of the largest gradient of each array:
float64 4.7e-13 (vs JAX float64; luong's first backward), float32 1.6e-4 for the first backward
(vs float64 on the same float32 inputs). The key-block backward with centred keys, unsaturated
cases: query 1.4e-5, key 4.0e-6, value 9.3e-6, scale 2.0e-5, concat weight 1.5e-4.
Finite differences: 5.3e-9.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax_reference
import numpy as np
import pytest
from attention_cases import (
    Case,
    Inputs,
    assert_close,
    layer_weights,
    make_inputs,
    reference,
    tolerances,
)
from vjp_cases import (
    CASES,
    FD_CASES,
    assert_matches_finite_differences,
    central_differences,
    d_output,
    gradient_atol,
    gradient_sizes,
    has_fully_masked_row,
    jax_gradients,
    options,
    params,
    sum_to,
)

import luong

DTYPES = ("float64", "float32")
Backward = Callable[[Any], dict]


def _layer(case: Case, dtype: str, **kwargs: Any) -> luong.Attention:
    layer = luong.Attention(
        use_scale=case.use_scale, score_mode=case.score_mode, dtype=dtype, **kwargs
    )
    layer.set_weights(layer_weights(case, dtype))
    return layer


def _layer_vjp(case: Case, inputs: Inputs, dtype: str) -> tuple[np.ndarray, Backward, np.ndarray]:
    """`(output, backward, plain call's output)` from the layer."""
    layer = _layer(case, dtype)
    output, backward = layer.vjp(
        inputs.layer_inputs, mask=inputs.mask, training=False, use_causal_mask=case.causal
    )
    plain = layer(inputs.layer_inputs, mask=inputs.mask, use_causal_mask=case.causal)
    return output, backward, plain


def _functional_kwargs(case: Case, inputs: Inputs, dtype: str) -> dict[str, Any]:
    p = params(case, inputs, dtype)
    return {
        "query_mask": inputs.query_mask,
        "value_mask": inputs.value_mask,
        "score_mode": case.score_mode,
        "scale": float(p["scale"]) if "scale" in p else None,
        "concat_score_weight": float(p.get("concat_score_weight", 1.0)),
        "use_causal_mask": case.causal,
        "dtype": dtype,
    }


def _functional_vjp(
    case: Case, inputs: Inputs, dtype: str
) -> tuple[np.ndarray, Backward, np.ndarray]:
    """`(output, backward, plain call's output)` from `luong.attention_vjp`."""
    kwargs = _functional_kwargs(case, inputs, dtype)
    output, backward = luong.attention_vjp(inputs.query, inputs.value, inputs.key, **kwargs)
    plain = luong.attention(inputs.query, inputs.value, inputs.key, **kwargs)
    return output, backward, plain


VJPS = {"layer": _layer_vjp, "functional": _functional_vjp}


def _assert_gradients(
    what: str,
    grads: dict,
    expected: dict[str, np.ndarray],
    sizes: dict[str, np.ndarray],
    p: dict[str, np.ndarray],
    dtype: str,
) -> None:
    assert isinstance(grads, dict), f"{what}: backward returned {type(grads).__name__}"
    assert set(grads) == set(expected), f"{what}: keys {sorted(grads)}, expected {sorted(expected)}"
    for name, want in expected.items():
        got = grads[name]
        assert isinstance(got, np.ndarray), f"{what} {name}: {type(got).__name__}"
        assert got.dtype == np.dtype(dtype), f"{what} {name}: dtype {got.dtype}, expected {dtype}"
        assert got.shape == p[name].shape, f"{what} {name}: shape {got.shape}, {p[name].shape}"
        assert_close(f"{what} {name}", got, want, gradient_atol(sizes[name], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("api", sorted(VJPS))
def test_gradients_match_jax(api: str, case: Case, dtype: str) -> None:
    inputs = make_inputs(case)
    output, backward, plain = VJPS[api](case, inputs, dtype)
    # The forward of vjp is the plain call, to the bit (same dtype and shape too).
    np.testing.assert_array_equal(output, plain, strict=True, err_msg=f"{case.id} {api} output")
    do = d_output(case, inputs, dtype)
    grads = backward(do)
    _, expected = jax_gradients(case, dtype)
    p = params(case, inputs, dtype)
    sizes = gradient_sizes(p, do, **options(case, inputs))
    _assert_gradients(f"{case.id} {api} {dtype}", grads, expected, sizes, p, dtype)




@pytest.mark.parametrize("case", FD_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("api", sorted(VJPS))
def test_gradients_match_finite_differences(api: str, case: Case) -> None:
    inputs = make_inputs(case)
    assert not has_fully_masked_row(case, inputs)
    p = params(case, inputs, "float64")
    do = d_output(case, inputs, "float64")
    _, backward, _ = VJPS[api](case, inputs, "float64")
    grads = backward(do)
    kwargs = _functional_kwargs(case, inputs, "float64")

    def loss(p: dict[str, np.ndarray]) -> float:
        # luong's own forward, with every differentiable input (scale and the concat weight too)
        # taken from `p`
        output = luong.attention(
            p["query"],
            p["value"],
            p.get("key"),
            **{
                **kwargs,
                "scale": float(p["scale"]) if "scale" in p else None,
                "concat_score_weight": float(p.get("concat_score_weight", 1.0)),
            },
        )
        return float(np.sum(do * output))

    assert_matches_finite_differences(f"{case.id} {api}", grads, central_differences(loss, p))


# ---------------------------------------------------------------------------------------------
# dropout

RATE = 0.3
SEED = 1234
DROPOUT_CASES = [
    Case("dot", True, 1, False, "bool", "bool", True, False, 1.0, (9, 37, 5, 4), "float64",
         False, RATE, 21),
    Case("concat", True, 2, True, "full", "none", True, False, 1.0, (6, 7, 3, 2), "float64",
         True, RATE, 22),
    Case("dot", False, 0, False, "none", "int", False, False, 1.0, (70, 129, 8, 8), "float64",
         False, RATE, 23),
]  # fmt: skip


def _dropped_weights(case: Case, inputs: Inputs, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """`(output, dropped weights)` of a fresh layer's first training call (call index 0)."""
    layer = _layer(case, dtype, dropout=RATE, seed=SEED)
    return layer(
        inputs.layer_inputs,
        mask=inputs.mask,
        training=True,
        return_attention_scores=True,
        use_causal_mask=case.causal,
    )


def _keep_mask(
    case: Case, inputs: Inputs, dtype: str, dropped: np.ndarray
) -> tuple[np.ndarray, float]:
    """The dropout keep-mask behind `dropped` and the fraction dropped. Where a weight is 0
    without dropout (a masked key) the mask cannot be seen; it is taken as kept there, which
    changes no gradient, and left out of the fraction."""
    layer = _layer(case, dtype)
    _, weights = layer(
        inputs.layer_inputs,
        mask=inputs.mask,
        return_attention_scores=True,
        use_causal_mask=case.causal,
    )
    visible = weights != 0
    return (dropped != 0) | ~visible, float(np.mean(dropped[visible] == 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: c.id)
def test_dropout_backward_uses_the_forward_masks(case: Case, dtype: str) -> None:
    inputs = make_inputs(case)
    out_a, dropped = _dropped_weights(case, inputs, dtype)
    keep, dropped_fraction = _keep_mask(case, inputs, dtype, dropped)
    assert 0.2 < dropped_fraction < 0.4, f"{case.id}: {dropped_fraction:.2f} dropped"

    layer = _layer(case, dtype, dropout=RATE, seed=SEED)
    out_b, backward = layer.vjp(
        inputs.layer_inputs, mask=inputs.mask, training=True, use_causal_mask=case.causal
    )
    do = d_output(case, inputs, dtype)
    grads = backward(do)
    p = params(case, inputs, dtype)
    opts = {**options(case, inputs), "dropout_keep": keep, "dropout_rate": RATE}
    sizes = gradient_sizes(p, do, **opts)
    # the same call index (0) gives the same masks: the same output
    _, output_atol = tolerances(case, inputs, dtype)
    assert_close(f"{case.id} output", out_b, out_a, output_atol / (1 - RATE))

    # (a) the value gradient is the dropped weights, transposed, times d_output (rows under a
    # false query mask send nothing), summed over broadcast batch dims; without a key,
    # grads["value"] also holds the key path, so only the JAX comparison below applies
    if case.key_given:
        rows = do if inputs.query_mask is None else do * (inputs.query_mask != 0)[..., None]
        d_value = sum_to(np.matmul(np.swapaxes(dropped, -2, -1), rows), p["value"].shape)
        atol = gradient_atol(sizes["value"], dtype)
        assert_close(
            f"{case.id} value = dropped weightsᵀ · d_output", grads["value"], d_value, atol
        )

    # every gradient, against JAX with the forward's keep-mask
    _, expected = jax_reference.vjp(p, do, dtype, **opts)
    _assert_gradients(f"{case.id} {dtype} dropout", grads, expected, sizes, p, dtype)


# no fully masked rows here (see FD_CASES)
DROPOUT_FD_CASES = [DROPOUT_CASES[0], dataclasses.replace(DROPOUT_CASES[1], causal=False)]


@pytest.mark.parametrize("case", DROPOUT_FD_CASES, ids=lambda c: c.id)
def test_dropout_backward_matches_finite_differences_of_the_fixed_mask_function(
    case: Case,
) -> None:
    # (b) the output with the forward's dropout mask held fixed, in NumPy from reference.py's
    # weights; its finite differences against luong's gradients.
    inputs = make_inputs(case)
    assert not has_fully_masked_row(case, inputs)
    _, dropped = _dropped_weights(case, inputs, "float64")
    keep, _ = _keep_mask(case, inputs, "float64", dropped)
    layer = _layer(case, "float64", dropout=RATE, seed=SEED)
    _, backward = layer.vjp(
        inputs.layer_inputs, mask=inputs.mask, training=True, use_causal_mask=case.causal
    )
    do = d_output(case, inputs, "float64")
    grads = backward(do)

    def loss(p: dict[str, np.ndarray]) -> float:
        _, weights = reference.reference_attention(
            p["query"],
            p["value"],
            p.get("key"),
            value_mask=inputs.value_mask,
            score_mode=case.score_mode,
            scale=float(p["scale"]) if "scale" in p else None,
            concat_score_weight=float(p.get("concat_score_weight", 1.0)),
            use_causal_mask=case.causal,
            dtype=np.float64,
        )
        output = np.matmul(np.where(keep, weights / (1 - RATE), 0.0), p["value"])
        if inputs.query_mask is not None:
            output = np.where((inputs.query_mask != 0)[..., None], output, 0.0)
        return float(np.sum(do * output))

    p = params(case, inputs, "float64")
    assert_matches_finite_differences(case.id, grads, central_differences(loss, p))


def test_vjp_advances_the_dropout_counter_like_a_training_call() -> None:
    # Each training call of a layer draws new masks (Keras's SeedGenerator); a training vjp is a
    # training call, so a layer's second vjp uses call index 1, as a second plain call does.
    case = DROPOUT_CASES[0]
    inputs = make_inputs(case)
    a = _layer(case, "float64", dropout=RATE, seed=SEED)
    b = _layer(case, "float64", dropout=RATE, seed=SEED)
    call = {"mask": inputs.mask, "training": True}
    first_a = a(inputs.layer_inputs, **call)
    second_a = a(inputs.layer_inputs, **call)
    first_b, _ = b.vjp(inputs.layer_inputs, **call)
    second_b, _ = b.vjp(inputs.layer_inputs, **call)
    assert not np.allclose(first_a, second_a)
    np.testing.assert_allclose(first_b, first_a, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(second_b, second_a, rtol=1e-12, atol=1e-12)


def test_functional_dropout_uses_the_seed_like_attention() -> None:
    # luong.attention_vjp with a seed draws the masks luong.attention draws with that seed.
    case = DROPOUT_CASES[0]
    inputs = make_inputs(case)
    kwargs = {
        **_functional_kwargs(case, inputs, "float64"),
        "dropout": RATE,
        "seed": SEED,
        "training": True,
    }
    out_a, dropped = luong.attention(
        inputs.query, inputs.value, inputs.key, return_attention_scores=True, **kwargs
    )
    out_b, backward = luong.attention_vjp(inputs.query, inputs.value, inputs.key, **kwargs)
    np.testing.assert_allclose(out_b, out_a, rtol=1e-12, atol=1e-12)
    do = d_output(case, inputs, "float64")
    rows = do * (inputs.query_mask != 0)[..., None]
    d_value = np.matmul(np.swapaxes(dropped, -2, -1), rows)
    np.testing.assert_allclose(backward(do)["value"], d_value, rtol=1e-12, atol=1e-12)
    _, weights = luong.attention(
        inputs.query,
        inputs.value,
        inputs.key,
        return_attention_scores=True,
        **{**kwargs, "training": False},
    )
    dropped_fraction = np.mean(dropped[weights != 0] == 0)
    assert 0.2 < dropped_fraction < 0.4, dropped_fraction


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("bad", [(2, 6, 3), (3, 6), (2, 3, 6, 1), (1, 3, 6)])
@pytest.mark.parametrize("api", sorted(VJPS))
def test_d_output_of_the_wrong_shape_is_a_value_error(api: str, bad: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 4)).astype(np.float32)
    v = rng.standard_normal((2, 5, 6)).astype(np.float32)
    k = rng.standard_normal((2, 5, 4)).astype(np.float32)
    if api == "layer":
        output, backward = luong.Attention().vjp([q, v, k])
    else:
        output, backward = luong.attention_vjp(q, v, k)
    assert output.shape == (2, 3, 6)
    with pytest.raises(ValueError, match="d_output") as info:
        backward(np.zeros(bad, np.float32))
    message = str(info.value)
    for shape in ((2, 3, 6), bad):
        assert re.search(re.escape(str(shape)), message), f"{shape} not in {message!r}"

"""The JAX reference (jax_reference.py) and the gradient tolerance rule (vjp_cases.py) checked on
their own. Needs no Rust build.

test_vjp.py trusts `jax.vjp` of jax_reference.attention, so here that formula is held to
reference.py's forward (itself held to Keras bit for bit in test_reference.py), its gradients to
finite differences, and the tolerance rule to two requirements: it must bound a float32
computation's error (the premise of comparing two of them), and it must still catch mistakes.
"""

from __future__ import annotations

import itertools

import jax
import jax_reference
import numpy as np
import pytest
from attention_cases import (
    Case,
    assert_close,
    call_reference,
    error_units,
    make_inputs,
    tolerances,
)
from vjp_cases import (
    CASES,
    FD_CASES,
    LARGE_SHAPE,
    assert_matches_finite_differences,
    central_differences,
    d_output,
    gradient_atol,
    gradient_sizes,
    has_fully_masked_row,
    jax_gradients,
    options,
    params,
)

DTYPES = ("float64", "float32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_matches_reference(case: Case, dtype: str) -> None:
    # Held to the forward parity tests' rule (attention_cases.tolerance_for), in both dtypes;
    # in float32 that includes fully masked rows, whose numbers are float32's rounding of s - 1e9.
    inputs = make_inputs(case)
    output, _ = jax_gradients(case, dtype)
    expected, _ = call_reference(case, inputs, dtype)
    _, output_atol = tolerances(case, inputs, dtype)
    assert output.dtype == np.dtype(dtype)
    assert_close(f"{case.id} {dtype} output", output, expected, output_atol)


def test_x64_does_not_leak() -> None:
    # jax_reference turns float64 on only while it computes; other users of JAX keep the default.
    jax_gradients(CASES[0], "float64")
    assert not jax.config.jax_enable_x64
    assert jax.numpy.asarray(1.0).dtype == np.float32




@pytest.mark.parametrize("case", FD_CASES, ids=lambda c: c.id)
def test_jax_gradients_match_finite_differences(case: Case) -> None:
    inputs = make_inputs(case)
    assert not has_fully_masked_row(case, inputs)
    p = params(case, inputs, "float64")
    do = d_output(case, inputs, "float64")
    opts = options(case, inputs)
    _, grads = jax_reference.vjp(p, do, **opts)
    fd = central_differences(lambda p: float(np.sum(do * jax_reference.forward(p, **opts))), p)
    assert_matches_finite_differences(case.id, grads, fd)


NOT_FULLY_MASKED = [c for c in CASES if not has_fully_masked_row(c, make_inputs(c))]


@pytest.mark.parametrize("case", NOT_FULLY_MASKED, ids=lambda c: c.id)
def test_float32_gradients_within_half_the_tolerance_of_exact(case: Case) -> None:
    # The premise of the float32 comparison in test_vjp.py: one float32 computation of the
    # gradients (JAX's) stays within half the tolerance of the exact ones (float64 on the same
    # float32-rounded inputs), so luong's and JAX's stay within the tolerance of each other.
    # Cases with a fully masked row are left out: there float32's rounding of s - 1e9 (steps of
    # 64) is the function being differentiated, not an approximation of the float64 one.
    inputs = make_inputs(case)
    _, grads32 = jax_gradients(case, "float32")
    _, exact = jax_gradients(case, "float64", inputs_as="float32")
    p = params(case, inputs, "float32")
    sizes = gradient_sizes(p, d_output(case, inputs, "float32"), **options(case, inputs))
    assert set(grads32) == set(exact) == set(sizes)
    for name, expected in exact.items():
        atol = gradient_atol(sizes[name], np.float32, fraction=0.5)
        assert_close(f"{case.id} {name}", grads32[name], expected, atol)


def test_matrix_covers_the_backward_paths() -> None:
    # What the matrix is for; if a change of seed or shapes lost one of these, this says so.
    inputs = {c: make_inputs(c) for c in CASES}
    large = [c for c in CASES if c.shape[:2] == LARGE_SHAPE[:2]]
    assert {(c.score_mode, c.key_given) for c in large} == set(
        itertools.product(("dot", "concat"), (False, True))
    )
    for mode in ("dot", "concat"):
        of_mode = [c for c in CASES if c.score_mode == mode]
        assert any(has_fully_masked_row(c, inputs[c]) for c in of_mode)
        assert any(c.shape[0] != c.shape[1] for c in of_mode)
        assert any(c.shape[2] != c.shape[3] for c in of_mode)
        assert {c.leading_dims for c in of_mode} == {0, 1, 2}
        assert any(c.broadcast for c in of_mode)
        assert {c.value_mask for c in of_mode} >= {"bool", "full", "full_allmasked"}
        assert {c.query_mask for c in of_mode} >= {"none", "bool", "allmasked"}


# Mistakes a backward pass could make, as wrong gradients of the case (from JAX, in float64).
# Each must push some case outside the float32 tolerance (the looser one), or the matrix and the
# rule would not catch it. Each returns None where the mistake cannot show.
def _query_mask_ignored(case, inputs, p, do, opts):
    if inputs.query_mask is None or np.all(inputs.query_mask != 0):
        return None
    return jax_reference.vjp(p, do, **{**opts, "query_mask": None})[1]


def _value_mask_ignored(case, inputs, p, do, opts):
    if inputs.value_mask is None or np.all(inputs.value_mask != 0):
        return None
    return jax_reference.vjp(p, do, **{**opts, "value_mask": None})[1]


def _causal_ignored(case, inputs, p, do, opts):
    if not case.causal or case.shape[1] == 1:
        return None
    return jax_reference.vjp(p, do, **{**opts, "use_causal_mask": False})[1]


def _key_path_left_out_of_value(case, inputs, p, do, opts):
    # the key is the value, but only the value path is summed into grads["value"]
    if case.key_given:
        return None
    grads = jax_reference.vjp({**p, "key": p["value"]}, do, **opts)[1]
    del grads["key"]
    return grads


def _bias_stops_gradient(case, inputs, p, do, opts):
    # treating the masked scores as constants: fully masked rows then send nothing to query, key
    # and the scalars (the value gradient is still right)
    if not has_fully_masked_row(case, inputs):
        return None
    keep = jax_reference.score_keep_mask(do.shape[:-1] + (case.shape[1],), **_mask_args(opts))
    has_key = np.asarray(keep).any(-1, keepdims=True)
    grads = jax_reference.vjp(p, do * has_key, **opts)[1]
    grads["value"] = jax_reference.vjp(p, do, **opts)[1]["value"]
    return grads


def _scale_gradient_without_concat_weight(case, inputs, p, do, opts):
    if case.score_mode != "concat" or not case.use_scale:
        return None
    grads = jax_reference.vjp(p, do, **opts)[1]
    grads["scale"] = grads["scale"] / p["concat_score_weight"]
    return grads


def _mask_args(opts: dict) -> dict:
    return {"value_mask": opts["value_mask"], "use_causal_mask": opts["use_causal_mask"]}


MISTAKES = {
    f.__name__.lstrip("_"): f
    for f in (
        _query_mask_ignored,
        _value_mask_ignored,
        _causal_ignored,
        _key_path_left_out_of_value,
        _bias_stops_gradient,
        _scale_gradient_without_concat_weight,
    )
}
MAX_TRIED = 10  # cases per mistake (each costs a JAX compilation)


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_tolerance_catches_mistakes(mistake: str) -> None:
    caught = visible = 0
    for case in CASES:
        inputs = make_inputs(case)
        p = params(case, inputs, "float64")
        do = d_output(case, inputs, "float64")
        opts = options(case, inputs)
        wrong = MISTAKES[mistake](case, inputs, p, do, opts)
        if wrong is None:
            continue
        _, right = jax_gradients(case, "float64")
        # Some cases cannot show a mistake at all (one key, so the weights are constant; every
        # query masked; ...): count only those where it moves a gradient visibly in float64.
        largest = max(float(np.max(np.abs(g), initial=0.0)) for g in right.values())
        moved = max(float(np.max(np.abs(wrong[n] - right[n]), initial=0.0)) for n in right)
        if not moved > 1e-6 * largest:
            continue
        visible += 1
        sizes = gradient_sizes(params(case, inputs, "float32"), do, **opts)
        with np.errstate(over="ignore"):  # where the tolerance is the 1e-308 floor
            units = max(
                error_units(wrong[n], right[n], gradient_atol(sizes[n], np.float32)) for n in right
            )
        caught += units > 1
        if visible == MAX_TRIED:
            break
    assert visible > 0
    # Measured: every mistake caught in all 10 cases (the scalar-gradient one by 4 tolerances
    # at least, the others by hundreds or more).
    assert caught >= 0.7 * visible, f"{mistake}: caught in {caught} of {visible} cases"

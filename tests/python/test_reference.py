"""reference.py against real Keras (numpy backend). Needs no Rust build.

The reference is what `python -m luong` and test_keras_parity.py trust, so it is held to Keras
exactly, over the whole case matrix; the tolerance rule the parity tests use is checked here too
(it must bound a float32 computation's error, and it must still catch real mistakes). Where Keras
itself mis-handles inputs (masks with other than one batch dim), the tests below pin what Keras
does, so the list in attention_cases.keras_is_right cannot silently go stale.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from attention_cases import (
    CASES,
    Case,
    Inputs,
    assert_close,
    call_keras,
    call_reference,
    error_units,
    keras_attention_layer,
    make_inputs,
    reference,
    tolerances,
)
from golden_cases import GOLDEN, assert_golden, check_golden_layer

reference_attention = reference.reference_attention


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_matches_keras_bit_for_bit(case: Case) -> None:
    # reference.py runs the same NumPy operations in the same order as Keras's numpy backend, so
    # in float32 the two agree to the last bit; any difference means the reference drifted.
    inputs = make_inputs(case)
    keras_output, keras_weights = call_keras(case, inputs)
    output, weights = call_reference(case, inputs)
    assert output.dtype == np.float32 and keras_output.dtype == np.float32
    np.testing.assert_array_equal(output, keras_output, strict=True, err_msg=case.id)
    if keras_weights is not None:
        np.testing.assert_array_equal(weights, keras_weights, strict=True, err_msg=case.id)


def _exact(case: Case, inputs: Inputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The float64 answer for the float32-rounded inputs, and which query rows have a key left.

    Fully masked rows are left out of accuracy checks: there float32's rounding of `s - 1e9` *is*
    Keras's answer (see GOLDEN), not an approximation of the float64 one.
    """
    rounded = Inputs(
        inputs.query.astype(np.float32),
        inputs.value.astype(np.float32),
        None if inputs.key is None else inputs.key.astype(np.float32),
        inputs.query_mask,
        inputs.value_mask,
    )
    output, weights = call_reference(case, rounded, dtype="float64")
    keep = reference._calculate_score_mask(weights.shape, inputs.value_mask, case.causal)
    has_key = (
        np.ones(weights.shape[:-1] + (1,), bool) if keep is None else keep.any(-1, keepdims=True)
    )
    return output, weights, has_key


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_keras_float32_is_within_half_the_tolerance_of_exact(case: Case) -> None:
    # The premise of the parity tolerance: one float32 computation stays within C/2 units of the
    # exact answer, so two of them (luong's and Keras's) stay within C units of each other.
    # Measured worst over the matrix: 0.31 of the tolerance (outputs), 0.23 (weights).
    inputs = make_inputs(case)
    output, _ = call_keras(case, inputs)
    _, weights = call_reference(case, inputs)  # bit-identical to Keras's (test above)
    exact_output, exact_weights, has_key = _exact(case, inputs)
    weights_atol, output_atol = tolerances(case, inputs)
    assert_close(
        case.id + " output",
        np.where(has_key, output, 0),
        np.where(has_key, exact_output, 0),
        output_atol / 2,
    )
    assert_close(
        case.id + " weights",
        np.where(has_key, weights, 0),
        np.where(has_key, exact_weights, 0),
        weights_atol / 2,
    )


# Mistakes an implementation could make, each applied to reference.py's arguments. Each must push
# some case of the matrix outside the tolerance, or the matrix and the rule would not catch it.
def _bottom_right_causal(case: Case, kwargs: dict) -> dict:
    tq, tv = kwargs["query"].shape[-2], kwargs["value"].shape[-2]
    # as a full score mask: with all the batch dims, or it would read as a per-key mask
    causal = np.tri(tq, tv, k=tv - tq, dtype=bool).reshape((1,) * case.leading_dims + (tq, tv))
    mask = kwargs["value_mask"]
    if mask is None:
        full = causal
    else:
        mask = np.asarray(mask) != 0
        full = np.logical_and(mask if case.value_mask_is_full else mask[..., None, :], causal)
    return {**kwargs, "value_mask": full, "use_causal_mask": False}


MISTAKES = {
    "scale_ignored": lambda case, kw: {**kw, "scale": None} if case.use_scale else None,
    "concat_weight_ignored": lambda case, kw: (
        {**kw, "concat_score_weight": 1.0} if case.score_mode == "concat" else None
    ),
    "scale_in_wrong_place_concat": lambda case, kw: (
        {**kw, "scale": None, "concat_score_weight": kw["concat_score_weight"] * kw["scale"]}
        if case.score_mode == "concat" and case.use_scale
        else None
    ),
    "value_mask_ignored": lambda case, kw: (
        {**kw, "value_mask": None} if case.value_mask != "none" else None
    ),
    "query_mask_ignored": lambda case, kw: (
        {**kw, "query_mask": None} if case.query_mask != "none" else None
    ),
    "causal_ignored": lambda case, kw: {**kw, "use_causal_mask": False} if case.causal else None,
    "causal_bottom_right": lambda case, kw: _bottom_right_causal(case, kw) if case.causal else None,
    "key_and_value_swapped": lambda case, kw: (
        {**kw, "key": kw["value"], "value": kw["key"]}
        if kw["key"] is not None and case.shape[2] == case.shape[3]
        else None
    ),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_tolerance_catches_mistakes(mistake: str) -> None:
    caught = tried = 0
    for case in CASES:
        inputs = make_inputs(case)
        kwargs = {
            "query": inputs.query,
            "value": inputs.value,
            "key": inputs.key,
            "query_mask": inputs.query_mask,
            "value_mask": inputs.value_mask,
            "score_mode": case.score_mode,
            "scale": 0.37 if case.use_scale else None,
            "concat_score_weight": 1.7,
            "use_causal_mask": case.causal,
        }
        wrong = MISTAKES[mistake](case, kwargs)
        if wrong is None:
            continue
        tried += 1
        good_output, good_weights = call_reference(case, inputs)
        bad_output, bad_weights = reference_attention(**wrong)
        weights_atol, output_atol = tolerances(case, inputs)
        if (
            error_units(bad_output, good_output, output_atol) > 1
            or error_units(bad_weights, good_weights, weights_atol) > 1
        ):
            caught += 1
    assert tried > 0
    # Some cases cannot show a mistake (a random mask that happens to keep everything, Tq = 1 for
    # the causal mask, ...), but most must.
    assert caught >= 0.5 * tried, f"{mistake}: caught in {caught} of {tried} applicable cases"


@pytest.mark.parametrize("golden", GOLDEN, ids=lambda g: g.name)
def test_golden_reference(golden) -> None:
    a = golden.arrays()
    output, weights = reference_attention(
        a["query"],
        a["value"],
        a["key"],
        query_mask=a["query_mask"],
        value_mask=a["value_mask"],
        score_mode=golden.score_mode,
        scale=golden.scale,
        concat_score_weight=golden.concat_score_weight,
        use_causal_mask=golden.causal,
    )
    assert_golden(golden.name + " weights", weights, golden.expected_weights)
    assert_golden(golden.name + " output", output, golden.expected_output)


@pytest.mark.parametrize("golden", GOLDEN, ids=lambda g: g.name)
def test_golden_keras(golden) -> None:
    # The hand-computed numbers are Keras's numbers too.
    layer = keras_attention_layer(
        use_scale=golden.scale is not None,
        score_mode=golden.score_mode,
        scale=golden.scale,
        concat_score_weight=golden.concat_score_weight,
    )
    check_golden_layer(layer, golden)


def test_reference_float64_is_float64() -> None:
    rng = np.random.default_rng(0)
    q, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    output, weights = reference_attention(q, v, dtype=np.float64)
    assert output.dtype == weights.dtype == np.float64
    # float64 keeps what float32 rounds away.
    output32, _ = reference_attention(q, v)
    assert output32.dtype == np.float32
    assert np.max(np.abs(output - output32)) > 0


def test_reference_float16_uses_keras_bias() -> None:
    # float16 cannot hold 1e9; Keras subtracts 65504 (float16's largest finite value) instead, so a
    # masked score stays finite and its weight underflows to 0.
    q = np.array([[[1.0, 0.0]]])
    v = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    output, weights = reference_attention(
        q, v, value_mask=np.array([[True, False]]), dtype=np.float16
    )
    assert weights.dtype == np.float16
    assert np.all(np.isfinite(weights))
    np.testing.assert_array_equal(weights, np.array([[[1.0, 0.0]]], np.float16))


def test_reference_rejects_bad_inputs() -> None:
    q, v = np.ones((2, 3, 4)), np.ones((2, 5, 4))
    with pytest.raises(ValueError, match="query and key"):
        reference_attention(q, v, np.ones((2, 5, 3)))
    with pytest.raises(ValueError, match="key and value"):
        reference_attention(q, v, np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="do not broadcast"):
        reference_attention(q, np.ones((3, 5, 4)))
    with pytest.raises(ValueError, match="value_mask"):
        reference_attention(q, v, value_mask=np.ones((3, 5), bool))
    with pytest.raises(ValueError, match="Tv >= 1"):
        reference_attention(q, np.ones((2, 0, 4)))
    with pytest.raises(ValueError, match="must end in Tv"):
        reference_attention(q, v, value_mask=np.ones((2, 1), bool))
    with pytest.raises(ValueError, match="must end in Tq"):
        reference_attention(q, v, query_mask=np.ones((2, 1), bool))
    with pytest.raises(ValueError, match=re.escape("must end in (Tq, Tv)")):
        reference_attention(q, v, value_mask=np.ones((2, 3, 1), bool))
    with pytest.raises(ValueError, match="score_mode"):
        reference_attention(q, v, score_mode="add")
    with pytest.raises(TypeError, match="query"):
        reference_attention(np.array([["a"]]), v)


# ---------------------------------------------------------------------------------------------
# What Keras does where it disagrees with what luong promises (attention_cases.keras_is_right).


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_keras_quirk_nd_per_key_mask_is_misaligned() -> None:
    # Keras expands only 2-D value masks, so a (B1, B2, Tv) mask is right-aligned against the
    # (B1, B2, Tq, Tv) scores: it fails when the shapes clash ...
    layer = keras_attention_layer()
    q, v = _rand(2, 3, 4, 5), _rand(2, 3, 6, 5, seed=1)
    mask = np.random.default_rng(2).random((2, 3, 6)) < 0.5
    with pytest.raises(ValueError, match="broadcast"):
        layer([q, v], mask=[None, mask])
    # ... and silently masks the wrong entries when they happen to fit (B2 == Tq == B1).
    q, v = _rand(3, 3, 3, 5), _rand(3, 3, 6, 5, seed=1)
    mask = np.random.default_rng(2).random((3, 3, 6)) < 0.5
    keras_output = np.asarray(layer([q, v], mask=[None, mask]))
    expected, _ = reference_attention(q, v, value_mask=mask)
    assert keras_output.shape == expected.shape
    assert not np.allclose(keras_output, expected)
    # Our reading (every query row sees its batch entry's keys) is Keras's own 3-D behaviour:
    folded = np.asarray(
        layer([q.reshape(9, 3, 5), v.reshape(9, 6, 5)], mask=[None, mask.reshape(9, 6)])
    )
    np.testing.assert_array_equal(folded.reshape(expected.shape), expected)


def test_keras_quirk_full_mask_with_causal_breaks() -> None:
    # With use_causal_mask Keras expands every value mask at -2, so a full (B, Tq, Tv) mask becomes
    # (B, Tq, 1, Tv), then (B, Tq, Tq, Tv) after the AND with the (1, Tq, Tv) causal mask. Against
    # the (B, Tq, Tv) scores that fails unless B is 1 or Tq, and then the output grows a dim.
    layer = keras_attention_layer()
    q, v = _rand(2, 3, 4), _rand(2, 5, 4, seed=1)
    mask = np.ones((2, 3, 5), bool)
    with pytest.raises(ValueError, match="broadcast"):
        layer([q, v], mask=[None, mask], use_causal_mask=True)
    q, v, mask = q[:1], v[:1], mask[:1]
    assert np.asarray(layer([q, v], mask=[None, mask], use_causal_mask=True)).shape == (1, 3, 3, 4)
    expected, _ = reference_attention(q, v, value_mask=mask, use_causal_mask=True)
    assert expected.shape == (1, 3, 4)
    # Keras gets it right when the causal triangle is ANDed into the full mask by hand:
    by_hand = np.logical_and(mask, np.tri(3, 5, dtype=bool))
    np.testing.assert_array_equal(np.asarray(layer([q, v], mask=[None, by_hand])), expected)


def test_keras_quirk_causal_without_batch_dims_adds_one() -> None:
    # Keras's causal mask is (1, Tq, Tv), so unbatched (Tq, D) inputs come back as (1, Tq, Dv);
    # the numbers themselves are right.
    layer = keras_attention_layer()
    q, v = _rand(3, 4), _rand(5, 4, seed=1)
    keras_output = np.asarray(layer([q, v], use_causal_mask=True))
    expected, _ = reference_attention(q, v, use_causal_mask=True)
    assert keras_output.shape == (1, 3, 4) and expected.shape == (3, 4)
    np.testing.assert_array_equal(keras_output[0], expected)


def test_keras_quirk_unbatched_full_mask_is_read_as_per_key() -> None:
    # An unbatched (Tq, Tv) full mask is 2-D, so Keras takes it for a (batch, Tv) per-key mask and
    # expands it to (Tq, 1, Tv): the output comes back (Tq, Tq, Dv).
    layer = keras_attention_layer()
    q, v = _rand(3, 4), _rand(5, 4, seed=1)
    mask = np.random.default_rng(2).random((3, 5)) < 0.5
    assert np.asarray(layer([q, v], mask=[None, mask])).shape == (3, 3, 4)
    expected, _ = reference_attention(q, v, value_mask=mask)
    assert expected.shape == (3, 4)


def test_keras_fully_masked_row_with_large_scores_is_not_the_unmasked_softmax() -> None:
    # In float32, s - 1e9 keeps only s rounded to a multiple of 64, so a fully masked row is neither
    # uniform nor softmax(s): Keras gives [0, e^-64, 1] for scores [0, 40, 100] (see GOLDEN). The
    # reference reproduces it; float64 (exact shift) gives the plain softmax instead.
    q, k, v = (
        np.array([[[1.0]]]),
        np.array([[[0.0], [40.0], [100.0]]]),
        np.array([[[1.0], [2.0], [3.0]]]),
    )
    mask = np.zeros((1, 3), bool)
    _, weights32 = reference_attention(q, v, k, value_mask=mask)
    _, weights64 = reference_attention(q, v, k, value_mask=mask, dtype=np.float64)
    unmasked = np.exp(np.array([0.0, 40.0, 100.0]) - 100.0)
    unmasked /= unmasked.sum()
    np.testing.assert_allclose(weights64[0, 0], unmasked, rtol=1e-12)
    # float32 sees the scores as [0, 64, 128]: weights [0, e^-64, 1], not [e^-100, e^-60, 1].
    np.testing.assert_array_equal(
        weights32[0, 0], np.array([0.0, np.exp(np.float32(-64)), 1.0], np.float32)
    )
    assert weights32[0, 0, 1] / unmasked[1] == pytest.approx(np.exp(-4.0), rel=1e-6)

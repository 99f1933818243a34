"""luong against real Keras (numpy backend) over the randomized case matrix.

The cases, the way Keras is called (in the one layout Keras gets right where it mis-handles masks
with other than one batch dim) and the tolerance rule are in attention_cases.py, shared with
test_reference.py, which also shows reference.py equals Keras bit for bit on these cases.
"""

from __future__ import annotations

import numpy as np
import pytest
from attention_cases import (
    CASES,
    Case,
    Inputs,
    assert_close,
    call_keras,
    call_reference,
    effective_weights,
    layer_weights,
    make_inputs,
    reference,
    tolerance_for,
    tolerances,
)

import luong


def _call_layer(layer: luong.Attention, case: Case, inputs: Inputs):
    result = layer(
        inputs.layer_inputs,
        mask=inputs.mask,
        training=False,
        return_attention_scores=case.return_scores,
        use_causal_mask=case.causal,
    )
    if case.return_scores:
        assert isinstance(result, tuple) and len(result) == 2
        return result
    assert isinstance(result, np.ndarray)
    return result, None


def _call_functional(case: Case, inputs: Inputs, dtype: str = "float32"):
    w = effective_weights(case, dtype)
    return luong.attention(
        inputs.query,
        inputs.value,
        inputs.key,
        query_mask=inputs.query_mask,
        value_mask=inputs.value_mask,
        score_mode=case.score_mode,
        scale=w["scale"],
        concat_score_weight=w["concat_score_weight"],
        dropout=case.dropout,
        training=False,
        return_attention_scores=True,
        use_causal_mask=case.causal,
        dtype=dtype,
    )


def _assert_query_masked_rows_are_zero(case: Case, inputs: Inputs, output: np.ndarray) -> None:
    if inputs.query_mask is None:
        return
    dropped = np.broadcast_to(inputs.query_mask[..., None] == 0, output.shape)
    assert np.all(output[dropped] == 0), (
        f"{case.id}: rows under a false query mask are not exactly 0"
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_layer_matches_keras(case: Case) -> None:
    inputs = make_inputs(case)
    layer = luong.Attention(
        use_scale=case.use_scale, score_mode=case.score_mode, dropout=case.dropout
    )
    layer.set_weights(layer_weights(case))
    output, weights = _call_layer(layer, case, inputs)

    keras_output, keras_weights = call_keras(case, inputs)
    weights_atol, output_atol = tolerances(case, inputs)
    assert output.dtype == np.float32, case.id
    assert_close(case.id + " output", output, keras_output, output_atol)
    if case.return_scores:
        assert weights.dtype == np.float32, case.id
        assert_close(case.id + " weights", weights, keras_weights, weights_atol)
    _assert_query_masked_rows_are_zero(case, inputs, output)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_functional_is_the_layer(case: Case) -> None:
    # `luong.attention` is the layer's computation without the object: the same bits.
    inputs = make_inputs(case)
    layer = luong.Attention(use_scale=case.use_scale, score_mode=case.score_mode)
    layer.set_weights(layer_weights(case))
    output, weights = layer(
        inputs.layer_inputs,
        mask=inputs.mask,
        return_attention_scores=True,
        use_causal_mask=case.causal,
    )
    f_output, f_weights = _call_functional(case, inputs)
    np.testing.assert_array_equal(f_output, output, strict=True, err_msg=case.id)
    np.testing.assert_array_equal(f_weights, weights, strict=True, err_msg=case.id)


def _as_float64(inputs: Inputs) -> Inputs:
    def f64(x):
        return None if x is None else x.astype(np.float64)

    return Inputs(
        f64(inputs.query), f64(inputs.value), f64(inputs.key), inputs.query_mask, inputs.value_mask
    )


@pytest.mark.parametrize("case", CASES[::2], ids=lambda c: c.id)
def test_float64_matches_reference(case: Case) -> None:
    # dtype="float64" computes in float64 for real (Keras would silently use float32), so the
    # comparison is with reference.py in float64, with the same tolerance rule at eps64.
    inputs = _as_float64(make_inputs(case))
    layer = luong.Attention(use_scale=case.use_scale, score_mode=case.score_mode, dtype="float64")
    layer.set_weights(layer_weights(case, "float64"))
    if layer.scale is not None:
        assert layer.scale.dtype == np.float64 and layer.scale.shape == ()
    output, weights = layer(
        inputs.layer_inputs,
        mask=inputs.mask,
        return_attention_scores=True,
        use_causal_mask=case.causal,
    )
    expected_output, expected_weights = call_reference(case, inputs, dtype="float64")
    weights_atol, output_atol = tolerances(case, inputs, dtype="float64")
    assert output.dtype == weights.dtype == np.float64
    assert_close(case.id + " output", output, expected_output, output_atol)
    assert_close(case.id + " weights", weights, expected_weights, weights_atol)
    _assert_query_masked_rows_are_zero(case, inputs, output)

    f_output, f_weights = _call_functional(case, inputs, dtype="float64")
    np.testing.assert_array_equal(f_output, output, strict=True, err_msg=case.id)
    np.testing.assert_array_equal(f_weights, weights, strict=True, err_msg=case.id)


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
@pytest.mark.parametrize("return_scores", [False, True])
def test_thread_count_does_not_change_results(score_mode: str, return_scores: bool) -> None:
    # Each output row is computed in a fixed order by one thread, so any thread count gives the
    # same bits. Big enough that the work is split.
    rng = np.random.default_rng(7)
    q = rng.standard_normal((4, 96, 40)).astype(np.float32)
    k = rng.standard_normal((4, 130, 40)).astype(np.float32)
    v = rng.standard_normal((4, 130, 24)).astype(np.float32)
    value_mask = rng.random((4, 130)) < 0.8
    before = luong.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            luong.set_num_threads(threads)
            assert luong.get_num_threads() == threads
            results.append(
                luong.attention(
                    q,
                    v,
                    k,
                    value_mask=value_mask,
                    score_mode=score_mode,
                    scale=0.37,
                    return_attention_scores=return_scores,
                    use_causal_mask=True,
                )
            )
    finally:
        luong.set_num_threads(before)
    for other in results[1:]:
        if return_scores:
            np.testing.assert_array_equal(other[0], results[0][0], strict=True)
            np.testing.assert_array_equal(other[1], results[0][1], strict=True)
        else:
            np.testing.assert_array_equal(other, results[0], strict=True)
    # and the numbers are Keras's (reference.py is Keras's arithmetic, see test_reference.py)
    output = results[0][0] if return_scores else results[0]
    expected, _ = reference.reference_attention(
        q,
        v,
        k,
        value_mask=value_mask,
        score_mode=score_mode,
        scale=float(np.float32(0.37)),
        use_causal_mask=True,
    )
    _, output_atol = tolerance_for(q, v, k, score_mode, float(np.float32(0.37)), 1.0)
    assert_close("output", output, expected, output_atol)


def _random_shapes_problem(rng: np.random.Generator) -> tuple:
    """Random shapes with NumPy-style broadcasting of the leading dims, and sometimes a mask shape
    that does not fit at all."""
    batch = tuple(int(x) for x in rng.integers(1, 4, size=rng.integers(0, 3)))
    tq, tv, d, dv = (int(x) for x in rng.integers(1, 5, size=4))

    def like(b: tuple) -> tuple:  # broadcastable to b: some dims 1, sometimes one dim fewer
        b = tuple(1 if rng.random() < 0.3 else x for x in b)
        return b[1:] if b and rng.random() < 0.2 else b

    def odd() -> tuple:
        return tuple(int(x) for x in rng.integers(1, 5, size=rng.integers(1, 5)))

    def keep(shape: tuple) -> np.ndarray:
        return rng.random(shape) < 0.6

    q = rng.standard_normal((*batch, tq, d)).astype(np.float32)
    k = None
    if rng.random() < 0.5:
        k = rng.standard_normal((*like(batch), tv, d)).astype(np.float32)
    else:
        dv = d  # value is also the key
    v = rng.standard_normal((*like(batch), tv, dv)).astype(np.float32)

    value_mask, r = None, rng.random()
    if r < 0.3:
        value_mask = keep((*like(batch), tv))
    elif r < 0.5:
        value_mask = keep((*like(batch), tq, tv))
    elif r < 0.7:
        value_mask = keep(odd())
    query_mask, r = None, rng.random()
    if r < 0.4:
        query_mask = keep((*like(batch), tq))
    elif r < 0.5:
        query_mask = keep(odd())

    kwargs = {
        "query_mask": query_mask,
        "value_mask": value_mask,
        "score_mode": ("dot", "concat")[int(rng.integers(2))],
        "scale": float(np.float32(0.37)),
        "use_causal_mask": bool(rng.integers(2)),
    }
    return q, v, k, kwargs


@pytest.mark.parametrize("seed", range(10))
def test_random_shapes_accepted_and_rejected_like_reference(seed: int) -> None:
    # luong and reference.py take the same shapes (leading dims broadcast, T and D dims exact) and
    # reject the same ones with ValueError; where both accept, the numbers agree.
    rng = np.random.default_rng(seed)
    accepted = 0
    for _ in range(100):
        q, v, k, kwargs = _random_shapes_problem(rng)
        shapes = [None if x is None else x.shape for x in (q, v, k)]
        shapes += [
            None if kwargs[m] is None else kwargs[m].shape for m in ("query_mask", "value_mask")
        ]
        what = "query, value, key, query_mask, value_mask shapes " + str(shapes)
        try:
            expected = reference.reference_attention(q, v, k, **kwargs)
        except ValueError:
            with pytest.raises(ValueError):
                luong.attention(q, v, k, return_attention_scores=True, **kwargs)
            continue
        accepted += 1
        output, weights = luong.attention(q, v, k, return_attention_scores=True, **kwargs)
        weights_atol, output_atol = tolerance_for(q, v, k, kwargs["score_mode"], kwargs["scale"])
        assert_close(what + " output", output, expected[0], output_atol)
        assert_close(what + " weights", weights, expected[1], weights_atol)
    assert accepted > 50  # most problems are well-formed

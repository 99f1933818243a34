"""Keras's own tests for `keras.layers.Attention`, ported to luong.

Source: keras/src/layers/attention/attention_test.py (Keras 3.15.1). Each test keeps Keras's name,
inputs and, where Keras hard-codes expected numbers, Keras's numbers and tolerances. Tests that
reach into Keras internals (`_calculate_scores`, `_calculate_score_mask`) or symbolic tensors are
adapted to the same check through luong's public API; the comment on each says how.
Then: Keras's exact error texts, the hand-computed golden cases, luong's own input checks, and
the dropout contract.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from attention_cases import assert_close, tolerance_for
from golden_cases import GOLDEN, check_golden_layer

import luong

# Keras's `assertAllClose` defaults (keras/src/testing/test_case.py), for ports that use them.
KERAS_ATOL = KERAS_RTOL = 1e-6


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# attention_test.py


def test_attention_basics() -> None:
    # Keras's run_layer_test: output shape, weight counts, masking support and a config round trip.
    # (Its seed-generator count and training check are Keras-object specifics: luong's dropout RNG
    # is internal and counter-based, and luong has no training loop.)
    rng = np.random.default_rng(0)
    query, value = rng.random((2, 3, 4)), rng.random((2, 4, 4))
    for kwargs, num_weights in (
        ({"score_mode": "dot", "dropout": 0.5}, 0),
        ({"use_scale": True, "score_mode": "concat", "dropout": 0.5}, 2),
    ):
        layer = luong.Attention(**kwargs)
        assert layer.supports_masking is True
        assert len(layer.get_weights()) == num_weights
        for w in layer.get_weights():
            assert w.shape == () and w == 1.0  # Keras initialises both scalars to ones
        assert layer([query, value]).shape == (2, 3, 4)
        assert layer([query, value], training=True).shape == (2, 3, 4)
        config = layer.get_config()
        restored = luong.Attention.from_config(config)
        assert restored.get_config() == config
        assert len(restored.get_weights()) == num_weights


def test_attention_seed_preserved_in_config() -> None:
    layer = luong.Attention(dropout=0.5, seed=1337)
    config = layer.get_config()
    assert config["seed"] == 1337
    restored = luong.Attention.from_config(config)
    assert restored.seed == 1337


def test_attention_correctness() -> None:
    # Keras's expected numbers, rounded by Keras to 3 decimals, hence its atol=1e-3.
    query = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    key = np.array([[[0.0, 1.0], [1.0, 0.0]]])
    value = np.array([[[1.0, 2.0], [3.0, 4.0]]])

    # Dot.
    layer = luong.Attention(score_mode="dot")
    output, scores = layer([query, value, key], return_attention_scores=True)
    np.testing.assert_allclose(output, [[[2.462, 3.462], [1.538, 2.538]]], atol=1e-3)
    np.testing.assert_allclose(scores, [[[0.269, 0.731], [0.731, 0.269]]], atol=1e-3)

    # Concat.
    layer = luong.Attention(score_mode="concat")
    output, scores = layer([query, value, key], return_attention_scores=True)
    np.testing.assert_allclose(output, [[[1.727, 2.727], [2.272, 3.272]]], atol=1e-3)
    np.testing.assert_allclose(scores, [[[0.636, 0.363], [0.363, 0.636]]], atol=1e-3)


def test_attention_with_mask() -> None:
    layer = luong.Attention()
    query = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    value = np.array([[[1.0, 1.0], [1.0, 1.0]]])
    query_mask = np.array([[True, False]])
    value_mask = np.array([[True, False]])
    output, scores = layer(
        [query, value], mask=[query_mask, value_mask], return_attention_scores=True
    )
    np.testing.assert_allclose(output, [[[1.0, 1.0], [0.0, 0.0]]], atol=KERAS_ATOL, rtol=KERAS_RTOL)
    np.testing.assert_allclose(scores, [[[1.0, 0.0], [1.0, 0.0]]], atol=KERAS_ATOL, rtol=KERAS_RTOL)


def test_attention_2D_mask_shape_mismatch() -> None:
    layer = luong.Attention()
    batch_size, Tq, Tv, dim = 2, 3, 4, 5
    rng = np.random.default_rng(0)
    query = rng.random((batch_size, Tq, dim)).astype(np.float32)
    value = rng.random((batch_size, Tv, dim)).astype(np.float32)
    query_mask = np.array([[True, False, True], [True, False, True]])
    value_mask = np.array([[True, False, True, True], [True, False, True, True]])
    output, scores = layer(
        [query, value], mask=[query_mask, value_mask], return_attention_scores=True
    )
    assert output.shape == (batch_size, Tq, dim)
    assert scores.shape == (batch_size, Tq, Tv)


def test_attention_errors() -> None:
    layer = luong.Attention()
    tensor = np.array([[[1.0, 1.0], [1.0, 1.0]]])
    with pytest.raises(ValueError, match="must be called on a list"):
        layer(tensor)
    with pytest.raises(ValueError, match="length 2 or 3"):
        layer([tensor, tensor, tensor, tensor])
    with pytest.raises(ValueError, match="layer mask must be a list"):
        layer([tensor, tensor], mask=tensor)
    with pytest.raises(ValueError, match="length 2 or 3"):
        layer([tensor, tensor], mask=[tensor])


def test_attention_with_dropout() -> None:
    query = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    value = np.array([[[1.0, 1.0], [1.0, 1.0]]])
    layer_with_dropout = luong.Attention(dropout=0.2)
    layer_without_dropout = luong.Attention()
    output1, scores1 = layer_with_dropout(
        [query, value], return_attention_scores=True, training=True
    )
    output2, scores2 = layer_without_dropout(
        [query, value], return_attention_scores=True, training=True
    )
    # Inverted dropout rescales the kept weights by 1/0.8, so these differ whatever is dropped.
    assert not np.allclose(output1, output2)
    assert not np.allclose(scores1, scores2)


def test_attention_invalid_score_mode() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape("Invalid value for argument score_mode. Expected one of {'dot', 'concat'}"),
    ):
        luong.Attention(score_mode="invalid_mode")


@pytest.mark.parametrize("scale", [None, 0.37])
def test_attention_calculate_scores_with_scale(scale) -> None:
    # Keras checks its private `_calculate_scores` against q @ kᵀ * scale. luong returns the
    # scores after softmax, so the same expectation is checked through softmax; also with a
    # non-default scale (None keeps the initial 1.0, as in Keras's test).
    rng = np.random.default_rng(0)
    query = rng.random((2, 3, 4))
    key = rng.random((2, 4, 4))
    layer = luong.Attention(use_scale=True, score_mode="dot")
    if scale is not None:
        layer.set_weights([np.asarray(scale, np.float32)])
    expected_scores = np.matmul(query, key.transpose((0, 2, 1)))
    expected_scores *= float(layer.scale)
    _, weights = layer([query, key, key], return_attention_scores=True)
    weights_atol, _ = tolerance_for(query, key, key, "dot", float(layer.scale))
    # tolerance_for covers two float32 computations; this one is against float64, so half of it
    assert_close("weights", weights, _softmax(expected_scores), weights_atol / 2)


def test_attention_calculate_score_mask_no_causal_no_vmask() -> None:
    # Keras: the private score mask is None. Public equivalent: nothing is masked, every weight
    # is the plain softmax of q @ kᵀ (all positive).
    rng = np.random.default_rng(0)
    query, key = rng.random((2, 3, 4)), rng.random((2, 4, 4))
    _, weights = luong.Attention()([query, key], return_attention_scores=True)
    assert np.all(weights > 0)
    weights_atol, _ = tolerance_for(query, key)
    assert_close("weights", weights, _softmax(query @ key.transpose(0, 2, 1)), weights_atol / 2)


def test_attention_calculate_score_mask_with_causal_no_vmask() -> None:
    # Keras: the causal score mask equals np.tril(ones((1, Tq, Tv))). Public equivalent: weights
    # are exactly 0 outside that triangle and positive inside it.
    rng = np.random.default_rng(0)
    query, key = rng.random((2, 3, 4)), rng.random((2, 4, 4))
    _, weights = luong.Attention()([query, key], return_attention_scores=True, use_causal_mask=True)
    expected_causal_mask = np.tril(np.ones((1, 3, 4)), k=0).astype(bool)
    expected_causal_mask = np.broadcast_to(expected_causal_mask, weights.shape)
    assert np.all(weights[~expected_causal_mask] == 0)
    assert np.all(weights[expected_causal_mask] > 0)


def test_attention_calculate_score_mask_with_causal_and_vmask() -> None:
    # Keras: the combined mask equals tril AND v_mask[:, None, :], with a (1, Tv) v_mask
    # broadcast over the batch. Public equivalent: weights are 0 exactly where it is false.
    rng = np.random.default_rng(0)
    query, key = rng.random((2, 3, 4)), rng.random((2, 4, 4))
    v_mask = np.array([[True, False, True, False]])
    _, weights = luong.Attention()(
        [query, key], mask=[None, v_mask], return_attention_scores=True, use_causal_mask=True
    )
    expected_causal_mask = np.tril(np.ones((1, 3, 4)), k=0)
    expected_combined_mask = np.logical_and(expected_causal_mask, v_mask[:, np.newaxis, :])
    expected_combined_mask = np.broadcast_to(expected_combined_mask, weights.shape)
    assert np.all(weights[~expected_combined_mask] == 0)
    assert np.all(weights[expected_combined_mask] > 0)


def _dummy_inputs(shape_q=(2, 3, 4), shape_v=(2, 4, 4), ones=False):
    rng = np.random.default_rng(0)
    make = np.ones if ones else rng.random
    return [make(shape_q), make(shape_v)]


def test_attention_compute_mask_with_no_mask() -> None:
    assert luong.Attention().compute_mask(inputs=_dummy_inputs(), mask=None) is None


def test_attention_compute_mask_with_first_element_none() -> None:
    mask = [None, np.array([True, False, True])]
    assert luong.Attention().compute_mask(inputs=_dummy_inputs(), mask=mask) is None


def test_attention_compute_mask_does_not_return_none_with_valid_mask() -> None:
    valid_mask = np.array([True, False, True])
    mask = [valid_mask, np.array([False, True, False])]
    assert luong.Attention().compute_mask(inputs=_dummy_inputs(), mask=mask) is not None


def test_attention_compute_mask_returns_correct_tensor_with_valid_mask() -> None:
    valid_mask = np.array([True, False, True])
    mask = [valid_mask, np.array([False, True, False])]
    computed_mask = np.asarray(luong.Attention().compute_mask(inputs=_dummy_inputs(), mask=mask))
    assert np.array_equal(computed_mask, valid_mask)


@pytest.mark.parametrize("value", [True, False])
def test_attention_compute_mask_returns_correct_tensor_with_all_same_mask(value: bool) -> None:
    # Keras's ..._with_all_true_mask and ..._with_all_false_mask.
    valid_mask = np.array([value] * 3)
    mask = [valid_mask, np.array([value] * 3)]
    computed_mask = np.asarray(
        luong.Attention().compute_mask(inputs=_dummy_inputs(ones=True), mask=mask)
    )
    assert np.array_equal(computed_mask, np.array([value] * 3))


@pytest.mark.parametrize("atol", [1e-3, 1e-5, 1e-7])
def test_attention_compute_mask_with_tolerance(atol: float) -> None:
    # Keras's ..._with_tolerance_1e_3, _1e_5 and _1e_7: a float mask comes back as it went in.
    valid_mask = np.array([1.0, 0.0, 1.0], dtype=float)
    mask = [valid_mask, np.array([0.0, 1.0, 0.0], dtype=float)]
    computed_mask = np.asarray(
        luong.Attention().compute_mask(inputs=_dummy_inputs(ones=True), mask=mask)
    )
    assert np.allclose(computed_mask, valid_mask, atol=atol)


def test_attention_compute_mask_with_single_element_masks() -> None:
    mask = [np.array([True]), np.array([False])]
    computed_mask = np.asarray(
        luong.Attention().compute_mask(inputs=_dummy_inputs(ones=True), mask=mask)
    )
    assert computed_mask.shape == (1,)


def test_attention_compute_mask_with_non_boolean_masks() -> None:
    valid_mask = np.array([1, 0, 1])
    mask = [valid_mask, np.array([0, 1, 0])]
    computed_mask = np.asarray(
        luong.Attention().compute_mask(inputs=_dummy_inputs(ones=True), mask=mask)
    )
    assert np.array_equal(computed_mask, valid_mask)


def test_attention_compute_mask_with_edge_case_masks() -> None:
    layer = luong.Attention()
    for mask in (
        np.array([True, True, True]),
        np.array([False, False, False]),
        np.array([True, False, True]),
    ):
        computed_mask = np.asarray(
            layer.compute_mask(inputs=_dummy_inputs(ones=True), mask=[mask, mask])
        )
        assert np.array_equal(computed_mask, mask)


def test_attention_compute_mask_with_different_input_shapes() -> None:
    layer = luong.Attention()
    valid_mask = np.array([True, False, True])
    for shape in [(2, 3, 4), (3, 2, 5), (4, 1, 6)]:
        mask = [valid_mask, np.array([False, True, False])]
        computed_mask = np.asarray(
            layer.compute_mask(inputs=[np.ones(shape), np.ones(shape)], mask=mask)
        )
        assert np.array_equal(computed_mask, valid_mask)


def test_attention_compute_output_shape() -> None:
    rng = np.random.default_rng(0)
    query = rng.random((2, 3, 4))
    value = rng.random((2, 3, 5))
    key = rng.random((2, 3, 4))
    layer = luong.Attention()
    output = layer([query, value, key])
    assert output.shape == value.shape
    assert (
        layer.compute_output_shape(input_shape=[query.shape, value.shape, key.shape])
        == output.shape
    )


def test_attention_nd_inputs() -> None:
    layer = luong.Attention()
    rng = np.random.default_rng(0)
    query = rng.random((2, 8, 6, 4)).astype(np.float32)
    value = rng.random((2, 8, 6, 4)).astype(np.float32)
    output = layer([query, value])
    assert output.shape == (2, 8, 6, 4)
    output, scores = layer([query, value], return_attention_scores=True)
    assert output.shape == (2, 8, 6, 4)
    assert scores.shape == (2, 8, 6, 6)


def _return_scores_inputs():
    rng = np.random.default_rng(0)
    return rng.random((2, 8, 16)).astype(np.float32), rng.random((2, 4, 16)).astype(np.float32)


def test_return_attention_scores_true() -> None:
    query, value = _return_scores_inputs()
    output, attention_scores = luong.Attention()([query, value], return_attention_scores=True)
    assert output.shape == (2, 8, 16)
    assert attention_scores.shape == (2, 8, 4)


def test_return_attention_scores_true_and_tuple() -> None:
    query, value = _return_scores_inputs()
    outputs = luong.Attention()([query, value], return_attention_scores=True)
    assert isinstance(outputs, tuple), "Expected the outputs to be a tuple"


def test_return_attention_scores_true_tuple_then_unpack() -> None:
    query, value = _return_scores_inputs()
    output, attention_scores = luong.Attention()([query, value], return_attention_scores=True)
    assert output.shape == (2, 8, 16)
    assert attention_scores.shape == (2, 8, 4)


# test_return_attention_scores_with_symbolic_tensors: dropped, luong has no symbolic tensors
# (keras.layers.Input); its shape rule is covered by compute_output_shape below.


def test_symbolic_call_does_not_leak_return_attention_scores() -> None:
    # Keras's version uses symbolic Inputs; the part that applies to luong: after an eager call
    # with return_attention_scores=True, later calls and compute_output_shape (with an unknown
    # batch dim, as symbolic shapes have) return just the output.
    attention = luong.Attention()
    rng = np.random.default_rng(0)
    q_eager = rng.random((2, 3, 5)).astype("float32")
    v_eager = rng.random((2, 4, 5)).astype("float32")
    attention([q_eager, v_eager], return_attention_scores=True)
    output = attention([q_eager, v_eager])
    assert not isinstance(output, (tuple, list))
    assert output.shape == (2, 3, 5)
    assert attention.compute_output_shape([(None, 3, 5), (None, 4, 5)]) == (None, 3, 5)


# ---------------------------------------------------------------------------------------------
# Keras's error texts (keras/src/layers/attention/attention.py, `_validate_inputs` and __init__),
# checked on Keras too so the expected texts are known to be Keras's.

INPUTS_NOT_LIST = (
    "Attention layer must be called on a list of inputs, "
    "namely [query, value] or [query, value, key]. Received: inputs="
)
INPUTS_LENGTH = (
    "Attention layer accepts inputs list of length 2 or 3, "
    "namely [query, value] or [query, value, key]. Received length: {}."
)
MASK_NOT_LIST = (
    "Attention layer mask must be a list, namely [query_mask, value_mask]. Received: mask="
)
MASK_LENGTH = "Attention layer accepts mask list of length 2 or 3. Received: inputs="
SCORE_MODE = (
    "Invalid value for argument score_mode. Expected one of {'dot', 'concat'}. "
    "Received: score_mode=invalid_mode"
)

_T = np.ones((1, 2, 2), np.float32)
ERROR_CALLS = {
    "inputs_array": (lambda layer: layer(_T), INPUTS_NOT_LIST),
    "inputs_tuple": (lambda layer: layer((_T, _T)), INPUTS_NOT_LIST),
    "inputs_length_1": (lambda layer: layer([_T]), INPUTS_LENGTH.format(1)),
    "inputs_length_4": (lambda layer: layer([_T, _T, _T, _T]), INPUTS_LENGTH.format(4)),
    "mask_array": (lambda layer: layer([_T, _T], mask=_T), MASK_NOT_LIST),
    "mask_tuple": (lambda layer: layer([_T, _T], mask=(None, None)), MASK_NOT_LIST),
    "mask_length_1": (lambda layer: layer([_T, _T], mask=[None]), MASK_LENGTH),
    "mask_length_4": (lambda layer: layer([_T, _T], mask=[None] * 4), MASK_LENGTH),
}


@pytest.mark.parametrize("call", sorted(ERROR_CALLS))
@pytest.mark.parametrize("implementation", ["keras", "luong"])
def test_keras_error_texts(implementation: str, call: str, make_keras_attention) -> None:
    layer = make_keras_attention() if implementation == "keras" else luong.Attention()
    bad_call, text = ERROR_CALLS[call]
    with pytest.raises(ValueError, match=re.escape(text)):
        bad_call(layer)


@pytest.mark.parametrize("implementation", ["keras", "luong"])
def test_keras_error_text_score_mode(implementation: str, keras) -> None:
    cls = keras.layers.Attention if implementation == "keras" else luong.Attention
    with pytest.raises(ValueError, match=re.escape(SCORE_MODE)):
        cls(score_mode="invalid_mode")


def test_functional_error_text_score_mode() -> None:
    with pytest.raises(ValueError, match=re.escape(SCORE_MODE)):
        luong.attention(_T, _T, score_mode="invalid_mode")


def test_third_mask_entry_is_ignored(make_keras_attention) -> None:
    # Keras accepts [query_mask, value_mask, key_mask] and ignores the third; so does luong.
    rng = np.random.default_rng(0)
    q, v = rng.random((2, 3, 4)), rng.random((2, 5, 4))
    masks = [rng.random((2, 3)) < 0.5, rng.random((2, 5)) < 0.7]
    junk = np.zeros((2, 5), bool)
    layer = luong.Attention()
    np.testing.assert_array_equal(layer([q, v], mask=[*masks, junk]), layer([q, v], mask=masks))
    keras_output = np.asarray(make_keras_attention()([q, v], mask=[*masks, junk]))
    _, output_atol = tolerance_for(q, v)
    assert_close("output", layer([q, v], mask=masks), keras_output, output_atol)


# ---------------------------------------------------------------------------------------------
# golden values computed by hand (attention_cases.GOLDEN; test_reference.py checks them on Keras)


@pytest.mark.parametrize("golden", GOLDEN, ids=lambda g: g.name)
def test_golden_luong(golden) -> None:
    layer = luong.Attention(use_scale=golden.scale is not None, score_mode=golden.score_mode)
    weights = ([] if golden.scale is None else [golden.scale]) + (
        [golden.concat_score_weight] if golden.score_mode == "concat" else []
    )
    layer.set_weights([np.asarray(w, np.float32) for w in weights])
    check_golden_layer(layer, golden)


# ---------------------------------------------------------------------------------------------
# luong's own input checks (DESIGN.md §2)


def test_shape_mismatch_names_argument_and_shapes() -> None:
    layer = luong.Attention()
    q, v = np.ones((2, 3, 4)), np.ones((2, 5, 4))
    cases = [
        ([q, v, np.ones((2, 5, 3))], None, "key", "2, 5, 3"),
        ([q, v, np.ones((2, 6, 4))], None, "key", "2, 6, 4"),
        ([q, np.ones((3, 5, 4))], None, "value", "3, 5, 4"),
        ([q, v], [np.ones((2, 4), bool), None], "query_mask", "2, 4"),
        ([q, v], [None, np.ones((2, 6), bool)], "value_mask", "2, 6"),
    ]
    for inputs, mask, name, shape in cases:
        with pytest.raises(ValueError) as excinfo:
            layer(inputs, mask=mask)
        message = str(excinfo.value)
        # the shape as "(2, 5, 3)" or "[2, 5, 3]": either spelling names it
        assert name in message and shape in message, message


@pytest.mark.parametrize(
    "bad",
    [np.array([["a", "b"]]), np.array([[object(), object()]]), np.ones((1, 2, 2), np.complex64)],
    ids=["str", "object", "complex"],
)
def test_non_numeric_input_is_type_error(bad) -> None:
    with pytest.raises(TypeError):
        luong.Attention()([bad, np.ones((1, 2, 2))])
    with pytest.raises(TypeError):
        luong.attention(np.ones((1, 2, 2)), bad)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_outside_unit_interval_is_value_error(dropout: float) -> None:
    with pytest.raises(ValueError):
        luong.Attention(dropout=dropout)


@pytest.mark.parametrize("seed", ["abc", 1.5])
def test_non_int_seed_is_value_error(seed) -> None:
    with pytest.raises(ValueError):
        luong.Attention(dropout=0.5, seed=seed)


# ---------------------------------------------------------------------------------------------
# dropout (DESIGN.md §2): inverted dropout on the post-softmax weights, returned scores are the
# dropped ones, masks from (seed, call, position).


def test_dropout_is_inverted_and_feeds_the_output() -> None:
    rng = np.random.default_rng(0)
    q, k, v = (
        rng.standard_normal((4, 16, 8)),
        rng.standard_normal((4, 32, 8)),
        rng.standard_normal((4, 32, 5)),
    )
    rate = 0.5
    layer = luong.Attention(dropout=rate, seed=11)
    output, dropped = layer([q, v, k], return_attention_scores=True, training=True)
    _, weights = luong.Attention()([q, v, k], return_attention_scores=True)
    kept = dropped != 0
    # about half dropped: 2048 draws, 4.4 standard deviations either side
    assert 0.45 < 1 - kept.mean() < 0.55
    # kept weights are scaled by 1 / (1 - rate): one multiply (or divide) in float32
    assert_close(
        "kept weights",
        dropped[kept],
        weights[kept] / (1 - rate),
        2 * np.finfo(np.float32).eps * weights[kept] / (1 - rate),
    )
    # the output is the dropped weights times value: each side sums Tv products in float32, each
    # within Tv eps sum_j |w_j v_j| of exact
    v32 = v.astype(np.float32)
    bound = np.abs(dropped.astype(np.float64)) @ np.abs(v32.astype(np.float64))
    assert_close(
        "output",
        output,
        dropped.astype(np.float64) @ v32.astype(np.float64),
        2 * 32 * np.finfo(np.float32).eps * bound,
    )


def test_dropout_masks_follow_the_seed_and_the_call_count() -> None:
    rng = np.random.default_rng(0)
    q, v = rng.standard_normal((2, 8, 4)), rng.standard_normal((2, 8, 4))
    a, b = luong.Attention(dropout=0.3, seed=5), luong.Attention(dropout=0.3, seed=5)
    first_a = a([q, v], training=True)
    np.testing.assert_array_equal(first_a, b([q, v], training=True))  # same seed, same call: same
    assert not np.array_equal(a([q, v], training=True), first_a)  # next call: new masks
    other_seed = luong.Attention(dropout=0.3, seed=6)([q, v], training=True)
    assert not np.array_equal(other_seed, first_a)
    # inference ignores dropout: the same numbers as a layer without it
    np.testing.assert_array_equal(a([q, v], training=False), luong.Attention()([q, v]))

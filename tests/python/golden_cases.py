"""Tiny attention problems whose answers are computed by hand, in the comments beside them.

test_reference.py checks them on reference.py and on Keras (so the hand numbers are Keras's too),
test_keras_cases.py on luong. σ(x) = 1 / (1 + e^-x), e = 2.718281828459045.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from attention_cases import EPS, assert_close


@dataclass(frozen=True)
class Golden:
    name: str
    query: list
    value: list
    key: list | None = None
    query_mask: list | None = None
    value_mask: list | None = None
    score_mode: str = "dot"
    scale: float | None = None
    concat_score_weight: float = 1.0
    causal: bool = False
    expected_output: list | None = None
    expected_weights: list | None = None

    def arrays(self) -> dict:
        def arr(x, dtype=np.float32):
            return None if x is None else np.asarray(x, dtype=dtype)

        return {
            "query": arr(self.query),
            "value": arr(self.value),
            "key": arr(self.key),
            "query_mask": arr(self.query_mask, bool),
            "value_mask": arr(self.value_mask, bool),
        }


GOLDEN = (
    # scores = q @ kᵀ = I, so each row is softmax([1, 0]) or softmax([0, 1]):
    # σ(1) = e / (1 + e) = 0.7310585786300049, σ(-1) = 1 - σ(1) = 0.2689414213699951.
    # output row 0 = [10 σ(1), 20 σ(-1)] = [7.310585786300049, 5.3788284273999025].
    Golden(
        "dot_identity",
        query=[[[1, 0], [0, 1]]],
        key=[[[1, 0], [0, 1]]],
        value=[[[10, 0], [0, 20]]],
        expected_weights=[
            [[0.7310585786300049, 0.2689414213699951], [0.2689414213699951, 0.7310585786300049]]
        ],
        expected_output=[
            [[7.310585786300049, 5.3788284273999025], [2.689414213699951, 14.621171572600098]]
        ],
    ),
    # scores = 0.5 * [2, 0, 2] = [1, 0, 1]; the third key is masked, so weights = [σ(1), σ(-1), 0]
    # (exp(-1e9) underflows to exactly 0), output = σ(1) * 1 + σ(-1) * 0 = 0.7310585786300049.
    Golden(
        "dot_scale_value_mask",
        query=[[[2, 0]]],
        key=[[[1, 0], [0, 1], [1, 1]]],
        value=[[[1], [0], [100]]],
        value_mask=[[True, True, False]],
        scale=0.5,
        expected_weights=[[[0.7310585786300049, 0.2689414213699951, 0.0]]],
        expected_output=[[[0.7310585786300049]]],
    ),
    # concat: scores = [tanh 0 + tanh 0, 2 tanh(1/2)] = [0, 2 (e - 1)/(e + 1)]
    #   = [0, 0.9242343145200195];
    # weights = [1/(1 + e^0.92423), e^0.92423/(1 + e^0.92423)]
    #   = [0.2840959097024519, 0.7159040902975481];
    # output = 0.28410 * 1 + 0.71590 * 2 = 1.7159040902975481.
    Golden(
        "concat",
        query=[[[0, 0]]],
        key=[[[0, 0], [0.5, 0.5]]],
        value=[[[1], [2]]],
        score_mode="concat",
        expected_weights=[[[0.2840959097024519, 0.7159040902975481]]],
        expected_output=[[[1.7159040902975481]]],
    ),
    # causal, Tq = 2 < Tv = 3, all scores 0: row 0 keeps key 0 only, row 1 keys 0 and 1 (top-left):
    # weights [[1, 0, 0], [1/2, 1/2, 0]], output [[1], [(1 + 3)/2]] = [[1], [2]].
    Golden(
        "causal_top_left",
        query=[[[0], [0]]],
        key=[[[0], [0], [0]]],
        value=[[[1], [3], [100]]],
        causal=True,
        expected_weights=[[[1, 0, 0], [0.5, 0.5, 0]]],
        expected_output=[[[1], [2]]],
    ),
    # Every key masked, scores all 0: Keras subtracts 1e9 from all of them, so the row is uniform
    # and the output is the plain mean of the values ([1 + 0 + 4, 0 + 1 + 4] / 3), not nan, not 0.
    Golden(
        "fully_masked_row_is_uniform",
        query=[[[0, 0]]],
        value=[[[1, 0], [0, 1], [4, 4]]],
        value_mask=[[False, False, False]],
        expected_weights=[[[1 / 3, 1 / 3, 1 / 3]]],
        expected_output=[[[5 / 3, 5 / 3]]],
    ),
    # Every key masked, scores [0, 40, 100]. In float32, -1e9 + s rounds to a multiple of 64 (the
    # spacing of floats near 1e9): -1e9, -1e9 + 64, -1e9 + 128. So the softmax sees [-128, -64, 0]:
    # weights [e^-128 (underflows to 0 in float32), e^-64, 1] = [0, float32(e^-64) =
    # 1.6038108185805577e-28, 1]; output = 2 e^-64 + 3 = 3. Unmasked it would be [e^-100, e^-60, 1].
    Golden(
        "fully_masked_row_quantized_by_the_bias",
        query=[[[1]]],
        key=[[[0], [40], [100]]],
        value=[[[1], [2], [3]]],
        value_mask=[[False, False, False]],
        expected_weights=[[[0.0, 1.6038108185805577e-28, 1.0]]],
        expected_output=[[[3.0]]],
    ),
    # The query mask zeroes output rows but leaves the weights alone (weights as in dot_identity).
    Golden(
        "query_mask_zeroes_output_rows_only",
        query=[[[1, 0], [0, 1]]],
        value=[[[1, 0], [0, 1]]],
        query_mask=[[True, False]],
        expected_weights=[
            [[0.7310585786300049, 0.2689414213699951], [0.2689414213699951, 0.7310585786300049]]
        ],
        expected_output=[[[0.7310585786300049, 0.2689414213699951], [0.0, 0.0]]],
    ),
)

# Golden values are float32 results of a handful of roundings each (exp, one sum, one division, one
# product per output term), so they hold to a few float32 ulps relative; exact zeros stay exact.
GOLDEN_RTOL = 4 * EPS[np.dtype(np.float32)]


def assert_golden(what: str, actual, expected) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    assert_close(what, actual, expected, GOLDEN_RTOL * np.abs(expected))


def check_golden_layer(layer, golden) -> None:
    """Calls an Attention layer (luong's or Keras's, weights already set) on a golden case and
    checks its weights and output against the hand-computed numbers."""
    a = golden.arrays()
    inputs = [a["query"], a["value"]] + ([] if a["key"] is None else [a["key"]])
    no_masks = a["query_mask"] is None and a["value_mask"] is None
    masks = None if no_masks else [a["query_mask"], a["value_mask"]]
    output, weights = layer(
        inputs, mask=masks, return_attention_scores=True, use_causal_mask=golden.causal
    )
    assert_golden(golden.name + " weights", weights, golden.expected_weights)
    assert_golden(golden.name + " output", output, golden.expected_output)

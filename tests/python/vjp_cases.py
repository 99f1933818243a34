"""The randomized case matrix and tolerance rule for the gradient tests (test_vjp.py), and the
JAX reference's own checks (test_jax_reference.py).

The cases reuse attention_cases.Case and make_inputs (the same input, mask and broadcasting
generators as the Keras-parity tests), over a matrix chosen for the backward pass: every
combination of score mode x use_scale x key given x causal x leading dims, with value masks
(including fully masked rows) and query masks cycled through, and shapes including one with
Tq, Tv > 64 so a blocked kernel runs its loops and tails.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax_reference
import numpy as np
from attention_cases import (
    QUERY_MASKS,
    VALUE_MASKS,
    Case,
    Inputs,
    effective_weights,
)

# (Tq, Tv, D, Dv); Dv == D when no key is given. Edges (Tq = 1, Tv = 1, Tq != Tv, Dv != D) and
# two large ones: 65 keys (one past a 64 block) and Tq = 70, Tv = 129 (loops plus tails in both).
SHAPES = (
    (3, 5, 4, 2),
    (5, 3, 2, 6),
    (1, 6, 5, 1),
    (6, 1, 2, 4),
    (2, 7, 8, 3),
    (9, 37, 24, 10),
    (16, 65, 64, 17),
    (70, 129, 24, 9),
)
LARGE_SHAPE = SHAPES[-1]
# 5.0 (used by the forward parity tests) saturates the softmax so that most gradients vanish;
# 3.0 still gives weights close to one-hot in the larger shapes.
MAGNITUDES = (0.1, 1.0, 3.0)

# Relative tolerances, as multiples of the size of each gradient (`gradient_atol`). Measured
# worst over the matrix, in these units (see test_jax_reference.py and test_vjp.py):
#   JAX float64 vs finite differences: see test_jax_reference_matches_finite_differences.
RTOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 2e-4}


def _build_cases() -> list[Case]:
    """Main factors: score_mode x use_scale x key given x causal x leading dims (48), each twice;
    (value mask, query mask) pairs (35) cycle through them in two different shuffles, so every
    pair appears two or three times. Shape, magnitude, input dtype and broadcasting are drawn at
    random (seeded), except that the large shape is placed once in each main combination of score
    mode and key given, so it is certain to run both score paths with and without a key."""
    rng = np.random.default_rng(20240917)
    main = list(
        itertools.product(("dot", "concat"), (False, True), (False, True), (False, True), (0, 1, 2))
    )
    secondary = list(itertools.product(VALUE_MASKS, QUERY_MASKS))
    large_at: dict[tuple[str, bool], int] = {}
    cases = []
    for round_ in range(2):
        order = rng.permutation(len(secondary))
        for i, (mode, use_scale, key_given, causal, lead) in enumerate(main):
            vmask, qmask = secondary[order[i % len(secondary)]]
            shape = SHAPES[int(rng.integers(len(SHAPES) - 1))]
            if round_ == 1 and large_at.setdefault((mode, key_given), i) == i:
                shape = LARGE_SHAPE
            if not key_given:
                shape = (shape[0], shape[1], shape[2], shape[2])
            cases.append(
                Case(
                    score_mode=mode,
                    use_scale=use_scale,
                    leading_dims=lead,
                    causal=causal,
                    value_mask=vmask,
                    query_mask=qmask,
                    key_given=key_given,
                    return_scores=False,
                    magnitude=MAGNITUDES[int(rng.integers(len(MAGNITUDES)))],
                    shape=shape,
                    in_dtype=("float32", "float64")[int(rng.integers(2))],
                    broadcast=bool(lead > 0 and rng.integers(3) == 0),
                    dropout=0.0,
                    seed=1000 + len(cases),
                )
            )
    return cases


CASES = _build_cases()


def params(case: Case, inputs: Inputs, dtype: Any) -> dict[str, np.ndarray]:
    """The differentiable inputs, keyed as the layer's gradients, cast to the compute `dtype`."""
    dt = np.dtype(dtype)
    w = effective_weights(case, dt.name)
    p = {"query": inputs.query.astype(dt), "value": inputs.value.astype(dt)}
    if inputs.key is not None:
        p["key"] = inputs.key.astype(dt)
    if w["scale"] is not None:
        p["scale"] = np.asarray(w["scale"], dtype=dt)
    if case.score_mode == "concat":
        p["concat_score_weight"] = np.asarray(w["concat_score_weight"], dtype=dt)
    return p


def options(case: Case, inputs: Inputs) -> dict[str, Any]:
    """The non-differentiable arguments of jax_reference.attention."""
    return {
        "score_mode": case.score_mode,
        "query_mask": inputs.query_mask,
        "value_mask": inputs.value_mask,
        "use_causal_mask": case.causal,
    }


def output_shape(inputs: Inputs) -> tuple[int, ...]:
    q, v = inputs.query, inputs.value
    k = v if inputs.key is None else inputs.key
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return (*batch, q.shape[-2], v.shape[-1])


def d_output(case: Case, inputs: Inputs, dtype: Any) -> np.ndarray:
    """A random cotangent for the output (seeded by the case)."""
    rng = np.random.default_rng(case.seed + 7919)
    return rng.standard_normal(output_shape(inputs)).astype(dtype)


def has_fully_masked_row(case: Case, inputs: Inputs) -> bool:
    """Whether some query row has no key left (its scores all carry the 1e9 bias)."""
    tq, tv = case.shape[:2]
    keep = jax_reference.score_keep_mask(
        (*output_shape(inputs)[:-2], tq, tv), inputs.value_mask, case.causal
    )
    return keep is not None and bool((~keep.any(-1)).any())


def gradient_atol(
    name: str, expected: np.ndarray, rtol: float, sizes: dict[str, float]
) -> float:
    """Absolute tolerance for gradient `name`: `rtol` times its size.

    Arrays (query, value, key): the largest entry of the expected gradient; an entry's rounding
    error scales with the whole row of terms it is summed from, not with the entry itself, which
    may be a near-cancelled 0. Scalars (scale, concat_score_weight): the sum of the absolute terms
    `|∂L/∂s · ∂s/∂θ|` it adds up (jax_reference.directional_derivatives), for the same reason.
    """
    if name in sizes:
        size = sizes[name]
    else:
        size = float(np.max(np.abs(expected), initial=0.0))
    return rtol * size + np.finfo(np.float64).tiny

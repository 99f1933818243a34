"""The randomized case matrix and tolerance rule for the gradient tests (test_vjp.py), and the
JAX reference's own checks (test_jax_reference.py).

The cases reuse attention_cases.Case and make_inputs (the same input, mask and broadcasting
generators as the Keras-parity tests), over a matrix chosen for the backward pass: every
combination of score mode x use_scale x key given x causal x leading dims, with value masks
(including fully masked rows) and query masks cycled through, and shapes including one with
Tq, Tv > 64 so a blocked kernel runs its loops and tails.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable

import jax_reference
import numpy as np
from attention_cases import (
    QUERY_MASKS,
    VALUE_MASKS,
    Case,
    Inputs,
    assert_close,
    effective_weights,
    make_inputs,
    reference,
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

# Tolerance constant for gradient_atol, measured as attention_cases.C is: two float32
# computations of the gradients (luong's and JAX's) may differ by C units, as each stays within
# C/2 of the exact answer (test_jax_reference.test_float32_gradients_within_half_the_tolerance_
# of_exact). Measured worst over the matrix, in units with C = 1 (no fully masked rows):
#   JAX float32 vs exact: 1.33 (value gradient, magnitude 0.1: the score sensitivity K is ~0
#     there, so softmax's own few ulps and the sums over Tq dominate), 0.94 key, 0.6 query,
#     0.05 scalars;
#   luong's first backward vs exact: 3.03 in float64 and 2.4 in float32 (value gradient,
#     9x37x24x10, magnitude 0.1), 0.95 key, 0.53 query, 0.055 scalars.
C = 8.0
# The scalar gradients get their own constant: their size adds up |terms| over every score of
# every batch entry, while the terms' rounding errors, independent from row to row, mostly
# cancel (errors grow like the square root of the number of rows); measured worst 0.05 (JAX
# float32) and 0.055 (luong) units, both dtypes. With C the scalars' tolerance would be ~2% of
# the gradient in float32 at the median case.
C_SCALAR = 0.5


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
    # second round: one main combination per (score mode, key given) gets the large shape
    large = {
        int(rng.choice([i for i, m in enumerate(main) if (m[0], m[2]) == group]))
        for group in itertools.product(("dot", "concat"), (False, True))
    }
    cases = []
    for round_ in range(2):
        order = rng.permutation(len(secondary))
        for i, (mode, use_scale, key_given, causal, lead) in enumerate(main):
            vmask, qmask = secondary[order[i % len(secondary)]]
            shape = SHAPES[int(rng.integers(len(SHAPES) - 1))]
            if round_ == 1 and i in large:
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
    """A random cotangent for the output (seeded by the case). Its values are float32 numbers in
    every dtype, so the float32 and float64 computations differentiate the same function."""
    rng = np.random.default_rng(case.seed + 7919)
    return rng.standard_normal(output_shape(inputs)).astype(np.float32).astype(dtype)


@functools.cache
def jax_gradients(
    case: Case, dtype: str, inputs_as: str | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`(output, grads)` of jax_reference for the case, computed in `dtype` (read-only, cached:
    test_jax_reference.py and test_vjp.py share them). `inputs_as="float32"` first rounds the
    inputs to float32 (for measuring a float32 computation against float64)."""
    inputs = make_inputs(case)
    p = {k: v.astype(dtype) for k, v in params(case, inputs, inputs_as or dtype).items()}
    output, grads = jax_reference.vjp(
        p, d_output(case, inputs, dtype), dtype, **options(case, inputs)
    )
    for x in (output, *grads.values()):
        x.setflags(write=False)
    return output, grads


def has_fully_masked_row(case: Case, inputs: Inputs) -> bool:
    """Whether some query row has no key left (its scores all carry the 1e9 bias)."""
    tq, tv = case.shape[:2]
    keep = jax_reference.score_keep_mask(
        (*output_shape(inputs)[:-2], tq, tv), inputs.value_mask, case.causal
    )
    return keep is not None and bool((~keep.any(-1)).any())


def sum_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`x` summed over the leading dims that `shape` broadcasts (as a gradient is)."""
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    return x.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1), keepdims=True)


def gradient_sizes(
    p: dict[str, np.ndarray],
    d_output: np.ndarray,
    *,
    score_mode: str = "dot",
    query_mask: Any = None,
    value_mask: Any = None,
    use_causal_mask: bool = False,
    dropout_keep: Any = None,
    dropout_rate: float = 0.0,
) -> dict[str, np.ndarray]:
    """For each gradient, an estimate of its rounding error in units of eps: `(grad's shape)`.

    The forward rule (attention_cases.tolerance_for) carried through the backward pass. With
    weights w, g = d_output · valueᵀ and K_i the score sensitivity of query row i:
    - a weight is off by ~eps (1 + K_i) w_ij (or by the smallest normal number, where it
      underflows); the score gradient ds_ij = w_ij (g_ij - Σ_l w_il g_il)
      by ~eps DS_ij, DS_ij = (1 + K_i) w_ij (|g|_ij + Σ_l w_il |g|_il) (|g| = |d_output| · |v|ᵀ;
      the difference cancels, so its error scales with the terms, not with the result);
    - query, key and scale gradients sum DS times the size of ∂s/∂(input):
      dot: |scale| |k|, |scale| |q|, |q|·|k|; concat: |w scale|, |w scale|, |w| (Σ|q| + Σ|k|),
      and Σ_d |tanh| for concat_score_weight;
    - the value gradient sums (1 + K_i) w_ij |d_output|_i (plus the key terms when key is value).
    Dropout multiplies g by keep / (1 - rate); rows under a false query mask contribute nothing.
    Computed in float64 from reference.py's weights in the parameters' dtype (so a fully masked
    row has the weights of that dtype's rounding of `s - 1e9`). Summed over broadcast batch dims.
    """
    dt = p["query"].dtype
    f64 = {name: np.asarray(x, dtype=np.float64) for name, x in p.items()}
    q, v = f64["query"], f64["value"]
    k = f64.get("key", v)
    scale = abs(float(f64["scale"])) if "scale" in f64 else 1.0
    csw = abs(float(f64.get("concat_score_weight", 1.0)))
    _, weights = reference.reference_attention(
        p["query"],
        p["value"],
        p.get("key"),
        query_mask=None,
        value_mask=value_mask,
        score_mode=score_mode,
        scale=float(p["scale"]) if "scale" in p else None,
        concat_score_weight=float(p.get("concat_score_weight", 1.0)),
        use_causal_mask=use_causal_mask,
        dtype=dt,
    )
    w = weights.astype(np.float64)
    batch = w.shape[:-2]
    q = np.broadcast_to(np.abs(q), (*batch, *q.shape[-2:]))
    k = np.broadcast_to(np.abs(k), (*batch, *k.shape[-2:]))
    v_abs = np.broadcast_to(np.abs(v), (*batch, *v.shape[-2:]))
    do = np.abs(np.asarray(d_output, dtype=np.float64))
    if query_mask is not None:
        do = do * (np.asarray(query_mask) != 0)[..., None]
    drop = 1.0
    if dropout_keep is not None:
        drop = (np.asarray(dropout_keep) != 0) / (1.0 - dropout_rate)

    if score_mode == "dot":
        sens = scale * np.matmul(q, np.swapaxes(k, -2, -1))
    else:
        sens = csw * (q.shape[-1] + scale * (q.sum(-1)[..., :, None] + k.sum(-1)[..., None, :]))
    cond = 1.0 + sens.max(axis=-1, keepdims=True)  # (..., Tq, 1)
    # A weight's error: relative to it, or the smallest normal number where it underflows.
    w_err = cond * w + np.finfo(dt).tiny / np.finfo(dt).eps
    g = drop * np.matmul(do, np.swapaxes(v_abs, -2, -1))
    ds = w_err * (g + (w * g).sum(-1, keepdims=True))

    sizes = {"value": np.matmul(np.swapaxes(w_err * drop, -2, -1), do)}
    if score_mode == "dot":
        size_q = scale * np.matmul(ds, k)
        size_k = scale * np.matmul(np.swapaxes(ds, -2, -1), q)
        size_scale = np.sum(ds * np.matmul(q, np.swapaxes(k, -2, -1)))
    else:
        ones = np.ones(q.shape[-1])
        size_q = csw * scale * ds.sum(-1)[..., None] * ones
        size_k = csw * scale * ds.sum(-2)[..., None] * ones
        size_scale = csw * np.sum(ds * (q.sum(-1)[..., :, None] + k.sum(-1)[..., None, :]))
        signed = {n: np.asarray(x, dtype=np.float64) for n, x in p.items()}
        key = signed.get("key", signed["value"])
        summed = signed["query"][..., :, None, :] + key[..., None, :, :]
        if "scale" in signed:
            summed = signed["scale"] * summed
        sizes["concat_score_weight"] = np.asarray(np.sum(ds * np.abs(np.tanh(summed)).sum(-1)))
    sizes["query"] = size_q
    if "key" in p:
        sizes["key"] = size_k
    else:
        sizes["value"] = sizes["value"] + size_k
    if "scale" in p:
        sizes["scale"] = np.asarray(size_scale)
    return {
        name: size if size.ndim == 0 else sum_to(size, p[name].shape)
        for name, size in sizes.items()
    }


def gradient_atol(size: np.ndarray, dtype: Any, fraction: float = 1.0) -> np.ndarray:
    """`c · eps · size` (see gradient_sizes), c = `fraction` of C (arrays) or C_SCALAR (0-d
    sizes: scale, concat_score_weight), with a floor of the smallest normal float64, so that a
    gradient whose size is 0 (e.g. a row under a false query mask) must be exactly 0."""
    c = fraction * (C_SCALAR if np.ndim(size) == 0 else C)
    return c * np.finfo(dtype).eps * size + np.finfo(np.float64).tiny


# ---------------------------------------------------------------------------------------------
# finite differences

FD_STEP = 1e-6
FD_RTOL = 1e-6


def central_differences(
    loss: Callable[[dict[str, np.ndarray]], float],
    p: dict[str, np.ndarray],
    step: float = FD_STEP,
) -> dict[str, np.ndarray]:
    """`∂loss/∂x` for every entry x of every float64 array in `p`, by central differences."""
    grads = {}
    for name, x in p.items():
        g = np.zeros(x.shape)
        for index in np.ndindex(x.shape):
            shifted = {**p, name: x.copy()}
            shifted[name][index] = x[index] + step
            up = loss(shifted)
            shifted[name][index] = x[index] - step
            down = loss(shifted)
            g[index] = (up - down) / (2 * step)
        grads[name] = g
    return grads


def assert_matches_finite_differences(
    what: str, grads: dict[str, np.ndarray], fd: dict[str, np.ndarray], rtol: float = FD_RTOL
) -> None:
    """Same keys; every gradient within `rtol` of the largest finite difference of its array.

    The finite differences' own error is absolute (~eps |loss| / step from rounding, ~step² from
    truncation), so it is measured against the array's scale, not entry by entry.
    """
    assert set(grads) == set(fd), f"{what}: keys {sorted(grads)}, expected {sorted(fd)}"
    for name, expected in fd.items():
        scale = float(np.max(np.abs(expected), initial=0.0))
        assert scale > 0, f"{what} {name}: the finite differences are all 0; a useless check"
        assert_close(f"{what} {name}", grads[name], expected, rtol * scale)


# Small float64 cases for finite differences, with no fully masked rows: there the float64
# rounding of `s - 1e9` (steps of 2^-23 ≈ 1.2e-7) would swamp a 1e-6 step; the comparison with
# JAX covers those rows. Shared by test_jax_reference.py (JAX's gradients) and test_vjp.py
# (luong's).
FD_CASES = [
    Case("dot", True, 1, False, "bool", "bool", True, False, 1.0, (3, 5, 4, 2), "float64",
         False, 0.0, 11),
    Case("concat", True, 0, True, "none", "none", False, False, 1.0, (4, 4, 3, 3), "float64",
         False, 0.0, 12),
    Case("concat", True, 2, False, "full", "int", True, False, 1.0, (2, 3, 2, 3), "float64",
         True, 0.0, 14),
    Case("concat", False, 2, False, "full", "int", True, False, 1.0, (2, 3, 2, 3), "float64",
         True, 0.0, 14),
    Case("dot", False, 0, True, "float", "none", False, False, 1.0, (5, 3, 2, 2), "float64",
         False, 0.0, 13),
    Case("dot", True, 2, False, "int", "float", False, False, 0.5, (2, 4, 3, 3), "float64",
         True, 0.0, 10),
]  # fmt: skip

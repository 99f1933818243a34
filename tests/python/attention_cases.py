"""The randomized case matrix, the Keras oracle and the tolerance rule shared by the parity tests.

test_reference.py holds reference.py to Keras over these cases (no Rust needed);
test_keras_parity.py holds luong to Keras over the same cases. Keeping the cases, the way Keras is
called and the tolerance in one file keeps the two comparisons the same comparison.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

# Non-default weights, set on every layer with set_weights (Keras's initial value is 1.0 for both).
SCALE = 0.37
CONCAT_SCORE_WEIGHT = 1.7

EPS = {
    np.dtype(np.float32): float(np.finfo(np.float32).eps),
    np.dtype(np.float64): float(np.finfo(np.float64).eps),
}

# Tolerance constant: `tolerances` below gives the rule it multiplies; errors here are quoted in
# units of eps * (1 + K), i.e. as multiples of that rule with C = 1. Measured over the whole matrix:
#   reference.py vs Keras, float32: 0 — bit-identical (same NumPy operations in the same order as
#     Keras's numpy backend); test_reference.py asserts exact equality.
#   Keras float32 vs the exact answer (reference.py in float64 on the same float32 inputs, fully
#     masked rows left out): worst 0.48 for weights, 0.63 for outputs.
#   A reordered float32 algorithm, simulated in NumPy the way a kernel computes (sums in another
#     order, tanh via 1 - 2/(1 + e^2x), online softmax with running max and rescaling): worst 0.48
#     (weights) and 0.72 (outputs) against the exact answer, 0.50 and 0.72 against Keras.
# luong's float32 result and Keras's are each such an approximation, so they should differ by well
# under 2 units: C = 2. Measured for luong's first build: worst 0.50 (weights) and 0.70 (outputs)
# against Keras in float32, 0.48 and 0.67 against reference.py in float64. test_reference.py
# checks the premise (Keras within C/2 of exact) and that the rule still catches real mistakes
# (test_tolerance_catches_mistakes).
C = 2.0


@dataclass(frozen=True)
class Case:
    """One point of the matrix. `seed` fixes the random inputs."""

    score_mode: str  # "dot" | "concat"
    use_scale: bool
    leading_dims: int  # 0, 1 or 2 batch dims in front of (T, D)
    causal: bool
    value_mask: str  # see VALUE_MASKS
    query_mask: str  # see QUERY_MASKS
    key_given: bool
    return_scores: bool
    magnitude: float  # inputs are magnitude * N(0, 1)
    shape: tuple[int, int, int, int]  # (Tq, Tv, D, Dv); Dv == D when no key is given
    in_dtype: str  # dtype of the arrays handed to the layer ("float64" is cast like Keras does)
    broadcast: bool  # key/value (and per-key masks) have batch dim 1 where query has B
    dropout: float  # the layer's dropout rate; always called with training=False
    seed: int

    @property
    def id(self) -> str:
        tq, tv, d, dv = self.shape
        flags = [
            (self.use_scale, "scale"),
            (self.causal, "causal"),
            (self.key_given, "key"),
            (self.return_scores, "ret"),
            (self.broadcast, "bcast"),
            (self.dropout > 0, "drop"),
        ]
        return "-".join(
            [f"{self.seed:03d}", self.score_mode, f"lead{self.leading_dims}"]
            + [f"v_{self.value_mask}", f"q_{self.query_mask}"]
            + [f"m{self.magnitude:g}", f"{tq}x{tv}x{d}x{dv}", self.in_dtype]
            + [name for on, name in flags if on]
        )

    @property
    def value_mask_is_full(self) -> bool:
        return self.value_mask.startswith("full")

    @property
    def value_mask_is_per_key(self) -> bool:
        return self.value_mask != "none" and not self.value_mask_is_full


@dataclass(frozen=True)
class Inputs:
    query: np.ndarray
    value: np.ndarray
    key: np.ndarray | None
    query_mask: np.ndarray | None
    value_mask: np.ndarray | None

    @property
    def mask(self) -> list | None:
        """The layer's `mask=` argument."""
        if self.query_mask is None and self.value_mask is None:
            return None
        return [self.query_mask, self.value_mask]

    @property
    def layer_inputs(self) -> list:
        return [self.query, self.value] if self.key is None else [self.query, self.value, self.key]


# per-key masks (..., Tv): bool, ints (any non-zero keeps), floats, and one with a fully masked
# batch entry; full score masks (..., Tq, Tv): random, and with a fully masked query row.
VALUE_MASKS = ("none", "bool", "int", "float", "keys_allmasked", "full", "full_allmasked")
QUERY_MASKS = ("none", "bool", "int", "float", "allmasked")
# Small shapes for the edges (Tq = 1, Tv = 1, Tq != Tv, Dv != D); two larger ones so a blocked or
# vectorised kernel runs its main loops and remainders (65 = 64 + 1 keys, D = 24 and 64).
SHAPES = (
    (3, 5, 4, 2),
    (5, 3, 2, 6),
    (4, 4, 3, 3),
    (1, 6, 5, 1),
    (6, 1, 2, 4),
    (2, 7, 8, 3),
    (9, 37, 24, 10),
    (16, 65, 64, 17),
)
MAGNITUDES = (0.1, 1.0, 5.0)


def _build_cases() -> list[Case]:
    """Every combination of the main factors; the others cycle through their own combinations.

    Main: score_mode x use_scale x leading dims x causal x value mask (168). Secondary (key given,
    query mask, returned scores, magnitude: 60 combinations) are drawn from a shuffled cycle, twice
    over with different shuffles, so each secondary combination meets ~6 main ones. Shape, input
    dtype, broadcasting and dropout are drawn at random (seeded) for each case.
    """
    rng = np.random.default_rng(20240601)
    main = list(
        itertools.product(("dot", "concat"), (False, True), (0, 1, 2), (False, True), VALUE_MASKS)
    )
    secondary = list(itertools.product((False, True), QUERY_MASKS, (False, True), MAGNITUDES))
    cases = []
    for _ in range(2):
        order = rng.permutation(len(secondary))
        for i, (mode, use_scale, lead, causal, vmask) in enumerate(main):
            key_given, qmask, ret, mag = secondary[order[i % len(secondary)]]
            seed = len(cases)
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
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
                    return_scores=ret,
                    magnitude=mag,
                    shape=shape,
                    in_dtype=("float32", "float64")[int(rng.integers(2))],
                    broadcast=bool(lead > 0 and rng.integers(3) == 0),
                    dropout=(0.0, 0.0, 0.3)[int(rng.integers(3))],
                    seed=seed,
                )
            )
    return cases


CASES = _build_cases()


def make_inputs(case: Case) -> Inputs:
    rng = np.random.default_rng(case.seed)
    tq, tv, d, dv = case.shape
    batch = ((), (3,), (2, 3))[case.leading_dims]
    kv_batch = (1, *batch[1:]) if case.broadcast else batch

    def normal(*shape: int) -> np.ndarray:
        x = case.magnitude * rng.standard_normal(shape)
        return x.astype(case.in_dtype)

    query = normal(*batch, tq, d)
    value = normal(*kv_batch, tv, dv)
    key = normal(*kv_batch, tv, d) if case.key_given else None

    value_mask = None
    if case.value_mask_is_full:
        value_mask = rng.random((*batch, tq, tv)) < 0.7
        if case.value_mask == "full_allmasked":
            value_mask[..., 0, :] = False
    elif case.value_mask_is_per_key:
        value_mask = _random_mask(rng, case.value_mask, (*kv_batch, tv))
    query_mask = (
        None if case.query_mask == "none" else _random_mask(rng, case.query_mask, (*batch, tq))
    )
    return Inputs(query, value, key, query_mask, value_mask)


def _random_mask(rng: np.random.Generator, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "int":
        return rng.choice(
            np.array([0, 1, 2, -3], dtype=np.int32), size=shape, p=[0.3, 0.3, 0.2, 0.2]
        )
    if kind == "float":
        return rng.choice(np.array([0.0, 1.0, 0.5], dtype=np.float32), size=shape)
    mask = rng.random(shape) < 0.7
    if kind.endswith("allmasked"):
        mask[(0,) * (len(shape) - 1)] = (
            False  # the first batch entry (all of it with no batch dims)
        )
    return mask


def layer_weights(case: Case, dtype: str = "float32") -> list[np.ndarray]:
    """The layer's weights in Keras's order (scale first), as 0-d arrays."""
    weights = []
    if case.use_scale:
        weights.append(np.asarray(SCALE, dtype=dtype))
    if case.score_mode == "concat":
        weights.append(np.asarray(CONCAT_SCORE_WEIGHT, dtype=dtype))
    return weights


def effective_weights(case: Case, dtype: str = "float32") -> dict:
    """`scale` and `concat_score_weight` as the layer holds them (rounded to its dtype)."""
    np_dtype = np.dtype(dtype)
    return {
        "scale": float(np_dtype.type(SCALE)) if case.use_scale else None,
        "concat_score_weight": float(np_dtype.type(CONCAT_SCORE_WEIGHT)),
    }


# ---------------------------------------------------------------------------------------------
# Keras


def keras_attention_layer(
    *,
    use_scale: bool = False,
    score_mode: str = "dot",
    scale: float | None = None,
    concat_score_weight: float | None = None,
    dropout: float = 0.0,
    seed: int | None = None,
):
    """A built `keras.layers.Attention`; weights left None keep Keras's initial 1.0."""
    import keras

    layer = keras.layers.Attention(
        use_scale=use_scale, score_mode=score_mode, dropout=dropout, seed=seed
    )
    layer.build([(1, 1, 1), (1, 1, 1)])  # the weights are scalars; build only validates the list
    weights = []
    if use_scale:
        weights.append(np.asarray(1.0 if scale is None else scale, dtype=np.float32))
    if score_mode == "concat":
        weights.append(
            np.asarray(
                1.0 if concat_score_weight is None else concat_score_weight, dtype=np.float32
            )
        )
    layer.set_weights(weights)
    return layer


def keras_is_right(case: Case) -> bool:
    """Whether Keras, called on the case's inputs as they are, computes what luong promises.

    Keras handles any leading dims for query/key/value, but its masks assume exactly one batch dim:
    - it expands only 2-D value masks at axis -2, so an N-D per-key mask (2 leading dims, no causal
      mask) lines up against the wrong axes, and a (Tq, Tv) full mask with no batch dims is taken
      for a per-key mask;
    - with use_causal_mask it always expands the value mask at -2 and builds a (1, Tq, Tv) causal
      mask, so a full score mask becomes (B, Tq, Tq, Tv): a broadcasting error, or an output with
      an extra dim when B is 1 or Tq; and with no batch dims at all the output gains a leading 1.
    test_reference.py pins each of these (test_keras_quirk_*), so this list cannot silently rot.
    """
    full, per_key = case.value_mask_is_full, case.value_mask_is_per_key
    if case.leading_dims == 0:
        return not case.causal and not full
    if case.leading_dims == 1:
        return not (full and case.causal)
    return not (per_key and not case.causal) and not (full and case.causal)


def call_keras(case: Case, inputs: Inputs) -> tuple[np.ndarray, np.ndarray | None]:
    """Keras's (output, weights-or-None) for the case.

    Where `keras_is_right` says Keras would mis-handle the inputs as given, Keras is called on the
    same problem in the one layout it gets right — one batch dim (leading dims broadcast and
    folded), 2-D per-key masks, and a full mask with the causal triangle ANDed in by hand — and
    the result is unfolded. Either way the numbers are Keras's arithmetic.
    """
    layer = keras_attention_layer(
        use_scale=case.use_scale,
        score_mode=case.score_mode,
        scale=SCALE,
        concat_score_weight=CONCAT_SCORE_WEIGHT,
        dropout=case.dropout,
    )
    if keras_is_right(case):
        layer_inputs, mask, causal, unfold = inputs.layer_inputs, inputs.mask, case.causal, None
    else:
        layer_inputs, mask, causal, unfold = _fold_to_3d(case, inputs)
    with warnings.catch_warnings():
        # Keras warns that a softmax over an axis of size 1 is always 1. For Tv == 1 that is the
        # point of the case, not a mistake.
        warnings.filterwarnings(
            "ignore", message=".*softmax over axis -1 of a tensor of shape", category=UserWarning
        )
        result = layer(
            layer_inputs,
            mask=mask,
            training=False,
            return_attention_scores=case.return_scores,
            use_causal_mask=causal,
        )
    output, weights = result if case.return_scores else (result, None)
    output = np.asarray(output)
    weights = None if weights is None else np.asarray(weights)
    if unfold is not None:
        output = output.reshape(*unfold, *output.shape[-2:])
        weights = None if weights is None else weights.reshape(*unfold, *weights.shape[-2:])
    return output, weights


def _fold_to_3d(case: Case, inputs: Inputs):
    q, v = inputs.query, inputs.value
    k = v if inputs.key is None else inputs.key
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    n = math.prod(batch)

    def fold(x: np.ndarray | None, tail: tuple[int, ...]) -> np.ndarray | None:
        return None if x is None else np.broadcast_to(x, (*batch, *tail)).reshape(n, *tail)

    tq, tv = q.shape[-2], k.shape[-2]
    q3, v3, k3 = fold(q, q.shape[-2:]), fold(v, v.shape[-2:]), fold(k, k.shape[-2:])
    qm = fold(inputs.query_mask, (tq,))
    vm = inputs.value_mask
    causal = case.causal
    if vm is not None and case.value_mask_is_full:
        vm = fold(vm, (tq, tv))
        if causal:
            vm = np.logical_and(vm != 0, np.tri(tq, tv, dtype=bool))
            causal = False
    else:
        vm = fold(vm, (tv,))
    mask = None if qm is None and vm is None else [qm, vm]
    return [q3, v3, k3], mask, causal, batch


# ---------------------------------------------------------------------------------------------
# reference.py

_REFERENCE_PATH = Path(__file__).resolve().parents[2] / "python" / "luong" / "reference.py"


def load_reference() -> ModuleType:
    """reference.py loaded from the source tree by path: it needs no compiled core."""
    spec = importlib.util.spec_from_file_location("luong_reference_under_test", _REFERENCE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = load_reference()


def call_reference(
    case: Case, inputs: Inputs, dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    return reference.reference_attention(
        inputs.query,
        inputs.value,
        inputs.key,
        query_mask=inputs.query_mask,
        value_mask=inputs.value_mask,
        score_mode=case.score_mode,
        use_causal_mask=case.causal,
        dtype=dtype,
        **effective_weights(case, dtype),
    )


# ---------------------------------------------------------------------------------------------
# tolerance


def tolerances(case: Case, inputs: Inputs, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """`tolerance_for` the case's inputs and weights."""
    w = effective_weights(case, dtype)
    return tolerance_for(
        inputs.query,
        inputs.value,
        inputs.key,
        case.score_mode,
        w["scale"],
        w["concat_score_weight"],
        dtype,
    )


def tolerance_for(
    query: np.ndarray,
    value: np.ndarray,
    key: np.ndarray | None = None,
    score_mode: str = "dot",
    scale: float | None = None,
    concat_score_weight: float = 1.0,
    dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """Absolute tolerances `(for weights, for output)`, per query row, for two `dtype` computations.

    Why this shape: a float computation of the scores is exact for inputs perturbed by a few ulps,
    so its error is eps times the scores' sensitivity to relative changes of q and k:
      dot:    |scale| * sum_d |q_d k_d|                  (each product moves by eps |q_d k_d|)
      concat: |w| * sum_d (1 + |scale| (|q_d| + |k_d|))  (tanh' <= 1, plus tanh's own rounding)
    Softmax turns score errors δs into weight errors |δw_j| <= w_j (|δs_j| + sum_l w_l |δs_l|)
    <= 2 max|δs|, and it sums to 1, so the output, sum_j w_j v_j, moves by <= max|v| * sum_j |δw_j|.
    Hence weights: C eps (1 + K_i), outputs: C eps max|v| (1 + K_i), with K_i the largest score
    sensitivity in query row i (the 1 covers exp's, the sums' and the division's own rounding).
    C is measured; see its definition above.
    """
    eps = EPS[np.dtype(dtype)]

    def magnitude(x: np.ndarray) -> np.ndarray:
        return np.abs(np.asarray(x).astype(dtype).astype(np.float64))

    q, v = magnitude(query), magnitude(value)
    k = v if key is None else magnitude(key)
    s = 1.0 if scale is None else abs(scale)
    if score_mode == "dot":
        sensitivity = s * np.matmul(q, np.swapaxes(k, -2, -1))
    else:
        d = q.shape[-1]
        sensitivity = abs(concat_score_weight) * (
            d + s * (q.sum(-1)[..., :, None] + k.sum(-1)[..., None, :])
        )
    k_row = sensitivity.max(axis=-1, keepdims=True)  # (..., Tq, 1)
    v_max = v.max(axis=(-2, -1), keepdims=True)  # per batch entry
    weights_atol = C * eps * (1.0 + k_row)
    output_atol = C * eps * v_max * (1.0 + k_row)
    return weights_atol, output_atol


def error_units(actual: np.ndarray, expected: np.ndarray, atol: np.ndarray) -> float:
    """max |actual - expected| / atol: below 1 passes. For reporting how tight a bound is."""
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    return float(np.max(diff / np.broadcast_to(atol, diff.shape), initial=0.0))


def assert_close(what: str, actual, expected, atol) -> None:
    """Same shape, values within `atol` (broadcast); the message says where and by how much."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (
        f"{what}: shape {actual.shape}, expected {expected.shape}"
    )
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    atol = np.broadcast_to(np.asarray(atol, dtype=np.float64), diff.shape)
    bad = ~(diff <= atol)  # also catches nan
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        ratio = np.where(bad, diff / atol, 0.0)
        worst = (
            tuple(int(i) for i in np.unravel_index(np.nanargmax(ratio), ratio.shape))
            if not np.isnan(diff).all()
            else where
        )
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements differ. First at {where}: "
            f"actual {actual[where]!r}, expected {expected[where]!r}, |diff| {diff[where]:.3g}, "
            f"atol {atol[where]:.3g}. Worst at {worst}: |diff| {diff[worst]:.3g} = "
            f"{diff[worst] / atol[worst]:.3g} x atol."
        )

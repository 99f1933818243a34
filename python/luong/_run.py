"""The one path every call takes: convert inputs (without copying when they already fit), then
hand them to the Rust kernel. Shared by the `Attention` layer and the functional `attention`."""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from . import _core

# Keras dtype policy names -> (compute dtype, variable dtype). Half precision stores inputs and
# outputs in float16 / bfloat16 and computes in float32 (see the README's "Half precision").
_POLICIES: dict[str, tuple[str, str]] = {
    "float32": ("float32", "float32"),
    "float64": ("float64", "float64"),
    "float16": ("float16", "float16"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "mixed_float16": ("float16", "float32"),
    "mixed_bfloat16": ("bfloat16", "float32"),
}


def _np_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a name; bfloat16 comes from `ml_dtypes` (what Keras uses)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as e:
            raise ImportError(
                "bfloat16 needs the `ml_dtypes` package: `pip install ml_dtypes` "
                "(or `pip install luong[half]`)"
            ) from e
        bf16: np.dtype = np.dtype(ml_dtypes.bfloat16)
        return bf16
    return np.dtype(name)


def policy_name(dtype: Any) -> str:
    """The Keras dtype policy name of a `dtype` argument: None is "float32" (Keras's default);
    also accepts NumPy dtypes, Keras DTypePolicy objects and their configs."""
    if dtype is None:
        return "float32"
    if isinstance(dtype, dict):  # a Keras DTypePolicy config, e.g. from `get_config()`
        dtype = dtype.get("config", {}).get("name", dtype)
    found = getattr(dtype, "name", dtype)  # a Keras DTypePolicy or a NumPy dtype
    name = found if isinstance(found, str) else repr(dtype)
    if not isinstance(found, str):
        try:
            name = np.dtype(found).name
        except TypeError:
            pass
    if name not in _POLICIES:
        raise ValueError(
            "Invalid value for argument `dtype`: luong computes in 'float32' (the default, as "
            "Keras), 'float64', 'float16', 'bfloat16', 'mixed_float16' or 'mixed_bfloat16'. "
            f"Received: dtype={dtype!r}"
        )
    return name


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype inputs are converted to and results come in: float32 by default (as Keras);
    float64; or float16 / bfloat16 (computed in float32 inside)."""
    return _np_dtype(_POLICIES[policy_name(dtype)][0])


def variable_dtype(dtype: Any) -> np.dtype:
    """The dtype of a layer's weights: float32 under the mixed policies, else the compute dtype."""
    return _np_dtype(_POLICIES[policy_name(dtype)][1])


HALF = ("float16", "bfloat16")


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether `shape` broadcasts to `target` without growing it (NumPy's rule): how a mask's
    leading dims must relate to the batch dims. Shared by the JAX and Dask bridges."""
    try:
        return bool(np.broadcast_shapes(shape, target) == tuple(target))
    except ValueError:
        return False


def as_input(x: Any, arg: str, dtype: np.dtype) -> np.ndarray:
    """`x` as an array of the compute dtype: the same array when it already is one (no copy)."""
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype == dtype:
        return a
    if a.dtype.kind not in "fiub" and a.dtype.name != "bfloat16":
        raise TypeError(
            f"`{arg}` must hold real numbers; got an array of dtype {a.dtype} and shape {a.shape}"
        )
    return a.astype(dtype)


def as_mask(m: Any, arg: str) -> np.ndarray | None:
    """A mask as a bool array (non-zero keeps), or None."""
    if m is None:
        return None
    a = m if isinstance(m, np.ndarray) else np.asarray(m)
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind not in "iuf":
        raise TypeError(
            f"`{arg}` must be bool or numeric (non-zero keeps); got dtype {a.dtype} "
            f"and shape {a.shape}"
        )
    keep: np.ndarray = a != 0
    return keep


def check_dropout(dropout: Any) -> float:
    """Keras's Dropout rule: a float in [0, 1)."""
    try:
        rate = float(dropout)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Invalid value received for argument `dropout`. Expected a float value in [0, 1). "
            f"Received: dropout={dropout!r}"
        ) from e
    if not 0.0 <= rate < 1.0:
        raise ValueError(
            "Invalid value received for argument `dropout`. Expected a float value in [0, 1). "
            f"Received: dropout={dropout!r}"
        )
    return rate


def check_seed(seed: Any) -> int:
    """Keras's SeedGenerator rule: an integer; None draws one. Returns an unsigned 64-bit key."""
    if seed is None:
        return secrets.randbits(64)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"Argument `seed` must be an integer. Received: seed={seed!r}")
    return int(seed) % (1 << 64)




@dataclass(frozen=True)
class Options:
    """One call's kernel settings, as the layer, the functional form and every bridge hand them
    to `_core`: build it with `Options.of(...)` from the user's arguments (which validates
    them), change a field with `replace`, and pass `to_core()` to the kernel.

    `dropout` is the rate in effect (0 outside training), `seed` the unsigned 64-bit key of the
    dropout masks, `call` the call index that picks them."""

    score_mode: str = "dot"
    scale: float | None = None
    concat_score_weight: float = 1.0
    dropout: float = 0.0
    seed: int = 0
    call: int = 0
    causal: bool = False
    return_scores: bool = False

    @classmethod
    def of(
        cls,
        *,
        score_mode: str = "dot",
        scale: float | None = None,
        concat_score_weight: float = 1.0,
        dropout: float = 0.0,
        seed: Any = None,
        training: bool = False,
        call: int = 0,
        use_causal_mask: bool = False,
        return_attention_scores: bool = False,
    ) -> Options:
        """The settings of a call from its Keras-named arguments, checked by Keras's rules:
        dropout applies only when `training`, and then `seed` None draws a fresh key."""
        rate = check_dropout(dropout) if training else 0.0
        return cls(
            score_mode=score_mode,
            scale=None if scale is None else float(scale),
            concat_score_weight=float(concat_score_weight),
            dropout=rate,
            seed=check_seed(seed) if rate > 0 else 0,
            call=int(call),
            causal=bool(use_causal_mask),
            return_scores=bool(return_attention_scores),
        ).validate()

    def validate(self) -> Options:
        """Raises Keras's ValueError for an unknown score mode or a dropout rate outside
        [0, 1); returns the options."""
        if self.score_mode not in ("dot", "concat"):
            raise ValueError(
                "Invalid value for argument score_mode. Expected one of {'dot', 'concat'}. "
                f"Received: score_mode={self.score_mode}"
            )
        check_dropout(self.dropout)
        return self

    def replace(self, **changes: Any) -> Options:
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def to_core(self) -> dict[str, Any]:
        """The dict `_core` takes."""
        return dataclasses.asdict(self)


# (query, value, key, query_mask, value_mask) as the kernel takes them.
Arrays = tuple[
    np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]
]


def convert(
    query: Any, value: Any, key: Any, query_mask: Any, value_mask: Any, dtype: np.dtype
) -> Arrays:
    """The inputs as the kernel takes them: compute-dtype arrays (no copy when they already
    are) and bool masks."""
    return (
        as_input(query, "query", dtype),
        as_input(value, "value", dtype),
        None if key is None else as_input(key, "key", dtype),
        as_mask(query_mask, "query_mask"),
        as_mask(value_mask, "value_mask"),
    )


def run(
    query: Any,
    value: Any,
    key: Any,
    query_mask: Any,
    value_mask: Any,
    *,
    dtype: np.dtype,
    options: Options,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Converts the arrays and runs the kernel; returns (output, scores or None)."""
    arrays = convert(query, value, key, query_mask, value_mask, dtype)
    return _core.attention(*arrays, options.to_core())


Backward = Callable[[Any], dict[str, np.ndarray]]


def vjp(
    arrays: Arrays, *, dtype: np.dtype, options: Options
) -> tuple[np.ndarray, Backward]:
    """The forward output and a function from the upstream gradient to the gradients.

    The backward reuses the converted inputs and the same options (so the same dropout masks);
    gradient keys: query, value, key (when a key was passed), scale (when set),
    concat_score_weight (concat mode).
    """
    core = options.replace(return_scores=False).to_core()
    # The forward keeps each row's softmax statistics, so the backward recomputes the weights
    # block by block instead of rerunning the forward (half precision reruns it, in float32).
    half = dtype.name in HALF
    if half:
        output, _ = _core.attention(*arrays, core)
    else:
        output, stats = _core.forward_saved(*arrays, core)
    has_key = arrays[2] is not None

    def backward(d_output: Any) -> dict[str, np.ndarray]:
        d = as_input(d_output, "d_output", dtype)
        saved = None if half else (output, stats)
        dq, dk, dv, d_scale, d_weight = _core.backward(*arrays, d, core, saved=saved)
        grads = {"query": dq, "value": dv}
        if has_key and dk is not None:
            grads["key"] = dk
        if d_scale is not None:
            grads["scale"] = np.asarray(d_scale, dtype=dtype)
        if d_weight is not None:
            grads["concat_score_weight"] = np.asarray(d_weight, dtype=dtype)
        return grads

    return output, backward

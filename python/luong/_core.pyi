"""Type stubs for the compiled extension `luong._core` (src/python.rs)."""

from typing import Any, TypedDict

import numpy as np

__version__: str
__all__ = [
    "__version__",
    "attention",
    "backward",
    "check_shapes",
    "forward_saved",
    "get_num_threads",
    "kernel_isa",
    "parallel_backend",
    "planned_isa",
    "set_num_threads",
]

class _Options(TypedDict):
    score_mode: str
    scale: float | None
    concat_score_weight: float
    dropout: float
    seed: int
    call: int
    causal: bool
    return_scores: bool

def attention(
    query: np.ndarray,
    value: np.ndarray,
    key: np.ndarray | None,
    query_mask: np.ndarray | None,
    value_mask: np.ndarray | None,
    options: _Options | dict[str, Any],
) -> tuple[np.ndarray, np.ndarray | None]: ...
def forward_saved(
    query: np.ndarray,
    value: np.ndarray,
    key: np.ndarray | None,
    query_mask: np.ndarray | None,
    value_mask: np.ndarray | None,
    options: _Options | dict[str, Any],
) -> tuple[np.ndarray, np.ndarray]: ...
def backward(
    query: np.ndarray,
    value: np.ndarray,
    key: np.ndarray | None,
    query_mask: np.ndarray | None,
    value_mask: np.ndarray | None,
    d_output: np.ndarray,
    options: _Options | dict[str, Any],
    saved: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, float | None, float | None]: ...
def set_num_threads(threads: int) -> None: ...
def get_num_threads() -> int: ...
def kernel_isa() -> str: ...
def parallel_backend() -> str: ...
def check_shapes(
    query: tuple[int, ...],
    value: tuple[int, ...],
    key: tuple[int, ...] | None,
    query_mask: tuple[int, ...] | None,
    value_mask: tuple[int, ...] | None,
) -> list[int]: ...
def planned_isa(
    dims: tuple[int, int, int, int, int], dtype: str, options: _Options | dict[str, Any]
) -> str: ...

"""Type stubs for the compiled extension `luong._core` (src/python.rs)."""

from typing import Any, Optional, TypedDict

import numpy as np

__version__: str

class _Options(TypedDict):
    score_mode: str
    scale: Optional[float]
    concat_score_weight: float
    dropout: float
    seed: int
    call: int
    causal: bool
    return_scores: bool

def attention(
    query: np.ndarray,
    value: np.ndarray,
    key: Optional[np.ndarray],
    query_mask: Optional[np.ndarray],
    value_mask: Optional[np.ndarray],
    options: _Options | dict[str, Any],
) -> tuple[np.ndarray, Optional[np.ndarray]]: ...
def set_num_threads(threads: int) -> None: ...
def get_num_threads() -> int: ...

"""Attention heatmaps with matplotlib (an optional dependency, imported when a plot is drawn).

    out, weights = luong.attention(q, v, k, return_attention_scores=True)
    ax = luong.plot.heatmap(weights, query_labels=words_q, key_labels=words_k)
    ax.figure.savefig("attention.png")

Rows are queries (Tq, top to bottom), columns keys (Tv, left to right); each row of the weights
sums to 1 (0 under a false query mask), so the colour scale runs from 0 to the largest weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["heatmap"]


def heatmap(
    scores: Any,
    query_labels: Sequence[Any] | None = None,
    key_labels: Sequence[Any] | None = None,
    ax: Axes | None = None,
    **kwargs: Any,
) -> Axes:
    """Draws attention weights as a heatmap and returns the Axes.

    Args:
        scores: the weights `(Tq, Tv)`, e.g. the scores `luong.attention(...,
            return_attention_scores=True)` returns. With leading batch dims `(..., Tq, Tv)` the
            first item, `scores[0, ..., 0]`, is drawn and the title says so.
        query_labels: Tq tick labels for the rows (e.g. the query's tokens); default: the
            indices (every one up to 32 rows, else matplotlib's choice).
        key_labels: Tv tick labels for the columns; default as for the rows.
        ax: the Axes to draw on; None draws on a new `matplotlib.pyplot` figure.
        **kwargs: passed to `Axes.imshow` (e.g. `cmap`, `vmin`, `vmax`); defaults: cmap
            "viridis", vmin 0, nearest interpolation, aspect "auto".

    Returns:
        The Axes, with a colorbar beside it, x labelled "key", y "query".

    Raises:
        ValueError: fewer than 2 dims, or a label list of the wrong length.
        ImportError: matplotlib is not installed.
    """
    weights = np.asarray(scores)
    if weights.ndim < 2:
        raise ValueError(
            f"`scores` must be (Tq, Tv) or (..., Tq, Tv); got shape {weights.shape}"
        )
    title = None
    if weights.ndim > 2:
        first = (0,) * (weights.ndim - 2)
        title = f"attention weights, batch item {first} of {weights.shape[:-2]}"
        weights = weights[first]
    tq, tv = weights.shape
    for name, labels, n in (("query_labels", query_labels, tq), ("key_labels", key_labels, tv)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"`{name}` has {len(labels)} labels for {n} rows/columns")

    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots()
    assert ax is not None  # for mypy: pyplot gave one
    options = {"cmap": "viridis", "vmin": 0.0, "interpolation": "nearest", "aspect": "auto"}
    image = ax.imshow(weights, **{**options, **kwargs})
    ax.figure.colorbar(image, ax=ax)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    # One tick per row/column when labelled or few (<= 32); else matplotlib's own ticks.
    if key_labels is not None or tv <= 32:
        ax.set_xticks(range(tv), None if key_labels is None else [str(x) for x in key_labels])
    if query_labels is not None or tq <= 32:
        ax.set_yticks(range(tq), None if query_labels is None else [str(x) for x in query_labels])
    if key_labels is not None:
        ax.tick_params(axis="x", labelrotation=90)
    if title is not None:
        ax.set_title(title)
    return ax

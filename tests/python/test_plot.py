"""luong.plot.heatmap and `python -m luong --plot`: a PNG of the attention weights is written,
reads back as an image of the figure's size, and carries the labels on its axes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread

import luong
from luong.plot import heatmap

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _weights(batch: tuple[int, ...] = ()) -> np.ndarray:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((*batch, 4, 8), dtype=np.float32)
    v = rng.standard_normal((*batch, 6, 8), dtype=np.float32)
    _, weights = luong.attention(q, v, use_causal_mask=True, return_attention_scores=True)
    return weights


def _figure() -> Figure:
    fig = Figure(figsize=(5, 4), dpi=80)
    FigureCanvasAgg(fig)
    return fig


def _tick_labels(labels: Sequence[Any]) -> list[str]:
    return [t.get_text() for t in labels]


def test_heatmap_writes_a_png_with_the_labels(tmp_path: Path) -> None:
    fig = _figure()
    words_q = ["the", "cat", "sat", "down"]
    words_k = ["le", "chat", "s'est", "assis", ".", "<eos>"]
    weights = _weights()
    ax = heatmap(weights, query_labels=words_q, key_labels=words_k, ax=fig.add_subplot())
    assert ax.figure is fig
    assert _tick_labels(ax.get_yticklabels()) == words_q
    assert _tick_labels(ax.get_xticklabels()) == words_k
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("key", "query")
    image = ax.get_images()[0]
    np.testing.assert_array_equal(image.get_array(), weights, strict=False)
    assert len(fig.axes) == 2, "the heatmap and its colorbar"

    path = tmp_path / "attention.png"
    fig.savefig(path)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert 2_000 < len(data) < 500_000, len(data)
    pixels = imread(path)
    assert pixels.shape == (4 * 80, 5 * 80, 4), pixels.shape  # figsize x dpi, RGBA
    assert pixels[..., :3].std() > 0.05, "a blank image"


def test_batched_scores_draw_the_first_item_and_say_so() -> None:
    weights = _weights(batch=(3, 2))
    ax = heatmap(weights, ax=_figure().add_subplot())
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), weights[0, 0], strict=False)
    assert ax.get_title() == "attention weights, batch item (0, 0) of (3, 2)"
    # unlabelled and small: one tick per row and column, labelled by index
    assert _tick_labels(ax.get_yticklabels()) == ["0", "1", "2", "3"]


def test_imshow_options_pass_through_and_ax_none_uses_pyplot() -> None:
    import matplotlib.pyplot as plt

    ax = heatmap(_weights(), cmap="magma", vmax=0.5)
    fig = ax.figure
    assert isinstance(fig, Figure)
    try:
        image = ax.get_images()[0]
        assert image.get_cmap().name == "magma"
        assert image.get_clim() == (0.0, 0.5)
        assert plt.gcf() is fig
    finally:
        plt.close(fig)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scores": np.ones(5)}, r"\(Tq, Tv\).*shape \(5,\)"),
        ({"scores": np.ones((2, 3)), "query_labels": ["a"]}, "`query_labels` has 1 labels for 2"),
        ({"scores": np.ones((2, 3)), "key_labels": ["a", "b"]}, "`key_labels` has 2 labels for 3"),
    ],
)
def test_bad_input_is_a_value_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        heatmap(ax=_figure().add_subplot(), **kwargs)


def test_python_m_luong_plot_writes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sample.png"
    package_root = str(Path(luong.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
    }
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "luong", "--plot", str(path)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {path}" in result.stdout
    assert "self-check" not in result.stdout, "--plot writes the plot instead of the self-check"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert imread(path).shape == (480, 640, 4)  # 6.4 x 4.8 inches at 100 dpi

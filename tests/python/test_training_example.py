"""examples/train_copy_task.py learns: a model trained with luong's gradients and NumPy Adam
halves its loss on the retrieval task within 300 steps (untrained it sits near 1 - 1/T)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_copy_task.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_copy_task", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_copy_task_loss_falls_by_half() -> None:
    losses = _load_example().train(steps=300, seed=0)
    assert len(losses) == 300
    assert np.all(np.isfinite(losses)), "a loss is not finite"
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    assert last <= 0.5 * first, f"loss {first:.4f} -> {last:.4f}: did not halve"

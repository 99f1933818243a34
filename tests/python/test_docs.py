"""Every Python example in the README and in docs/ runs, as written, and its asserts hold.

Each ```python block runs on its own (a fresh namespace), so a reader can paste any one of them.
A block that imports PyTorch needs it installed, as the torch bridge's own tests do (CI installs
it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 2
            found.append((f"{page.relative_to(ROOT)}:{line}", m.group(1)))
    return found


BLOCKS = blocks()


def test_the_pages_have_python_examples() -> None:
    assert len(BLOCKS) >= 6, [where for where, _ in BLOCKS]


@pytest.mark.parametrize("where, code", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_python_example_runs(where: str, code: str) -> None:
    if re.search(r"^import torch|^import luong\.torch", code, re.M):
        # PyTorch is an optional extra (3 GB); CI installs it, so these blocks run there.
        pytest.importorskip("torch")
    exec(compile(code, where, "exec"), {"__name__": "__doc_example__"})

"""The import-cycle gate (scripts/import_cycles.py, run by .ci/run) finds cycles and only cycles.

Small crates written here hold a cycle through a `use`, through a qualified path, through a
re-export, or none (the same names in comments, strings and a test module); the crate itself
must have none.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "import_cycles.py"


def gate(src: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--src", str(src)],
        capture_output=True,
        text=True,
        check=False,
    )


def crate(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src"
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return src


LIB = "mod a;\nmod b;\nmod k;\n"
CYCLES = {
    "use": {
        "a.rs": "use crate::b::Bee;\npub(crate) struct Ay;\n",
        "b.rs": "use super::a::Ay;\npub(crate) struct Bee;\n",
    },
    "path": {
        "a.rs": "pub(crate) fn f() { crate::b::g() }\n",
        "b.rs": "pub(crate) fn g() { let _ = super::a::f; }\n",
    },
    "re-export": {
        # a -> k (names k's re-export of k::item::Ctx) -> resolved to k::item -> a
        "a.rs": "pub(crate) struct Ay;\nfn f(_: crate::k::Ctx) {}\n",
        "k/mod.rs": "mod item;\npub(crate) use item::{Ctx, Other as Renamed};\n",
        "k/item.rs": "use crate::a::Ay;\npub(crate) struct Ctx;\npub(crate) struct Other;\n",
    },
}


@pytest.mark.parametrize("kind", sorted(CYCLES))
def test_a_cycle_fails_the_gate_and_names_its_edges(tmp_path: Path, kind: str) -> None:
    files = {"lib.rs": LIB, "b.rs": "", "k/mod.rs": "", **CYCLES[kind]}
    result = gate(crate(tmp_path, files))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "import cycle through 2 modules" in result.stdout
    first = "crate::a -> crate::b" if kind != "re-export" else "crate::a -> crate::k::item"
    assert first in result.stdout


def test_comments_strings_and_test_modules_are_not_imports(tmp_path: Path) -> None:
    files = {
        "lib.rs": LIB,
        "a.rs": (
            "use crate::b::Bee;\n"
            "pub(crate) struct Ay;\n"
            "fn f(_: Bee) {}\n"
        ),
        "b.rs": (
            "//! Read with [`crate::a::Ay`].\n"
            "pub(crate) struct Bee;\n"
            "/* crate::a::Ay */\n"
            'const S: &str = "crate::a::Ay";\n'
            "#[cfg(test)]\n"
            "mod tests {\n"
            "    use crate::a::Ay;\n"
            "    fn g() { let _ = { super::super::a::Ay }; }\n"
            "}\n"
        ),
        "k/mod.rs": "",
    }
    result = gate(crate(tmp_path, files))
    assert result.returncode == 0, result.stdout
    assert "no import cycle: 4 modules, 1 edges" in result.stdout


def test_the_crate_has_no_import_cycle() -> None:
    result = gate(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("no import cycle")

"""This build of luong against another build of it, in one process: did a change move speed?

    git worktree add /tmp/old <commit> && (cd /tmp/old && maturin build --release -o /tmp/old/w)
    unzip -o /tmp/old/w/luong-*.whl 'luong/_core*' -d /tmp/old/wheel
    python benches/ab_builds.py --old /tmp/old/wheel/luong/_core.abi3.so [--calls 40]

Both extension modules are loaded side by side (each with its own thread pool of 2 threads) and
called through `_core` with the same arrays and options, for the luong side of compare.py's
rows: dot attention at its six shapes, masks with causal, returned weights, concat, forward +
backward, the backward alone, and the small call. The two take turns in compare.py's steady runs
(`interleaved`: a warm call, then `--run` timed calls, runs 20 ms apart, the order rotating), so
a ratio `new / old` near 1 within the spread of repeated runs is "within noise". The `LUONG_ISA`
environment variable picks the kernel family of both.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (its `interleaved` and `inputs`; importing it sets 2 threads)

from luong import _core as new_core  # noqa: E402
from luong import _run  # noqa: E402
from luong._timing import cpu_model  # noqa: E402


def load_core(path: str) -> ModuleType:
    """The extension module at `path`, under a name of its own (its init function is still
    `PyInit__core`, which the last part of the name selects)."""
    name = "luong_ab_old._core"
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def dot_call(core: ModuleType, arrays: tuple[np.ndarray, ...]) -> Callable[[], Any]:
    q, k, v = arrays
    plain = _run.Options.of().to_core()
    return lambda: core.attention(q, v, k, None, None, plain)


def rows(core: ModuleType) -> dict[str, Callable[[], Any]]:
    """Each row's call on `core`, by row name (the arrays are made once, shared by both)."""
    out: dict[str, Callable[[], Any]] = {}
    plain = _run.Options.of().to_core()
    for shape in [(8, 512, 512, 64), (2, 2048, 2048, 64), (32, 128, 128, 64), (8, 1, 4096, 64),
                  (1, 1, 8192, 64), (1, 1024, 16384, 64)]:
        out[f"dot {shape}"] = dot_call(core, ARRAYS.setdefault(shape, compare.inputs(*shape)))
    shape = (8, 512, 512, 64)
    q, k, v = ARRAYS[shape]
    vm = MASKS.setdefault("vm", np.random.default_rng(1).random((8, 512)) < 0.8)
    causal = _run.Options.of(use_causal_mask=True).to_core()
    out["value mask + causal"] = lambda: core.attention(q, v, k, None, vm, causal)
    weights = _run.Options.of(return_attention_scores=True).to_core()
    out["returned scores"] = lambda: core.attention(q, v, k, None, None, weights)
    d_out = MASKS.setdefault("d_out", np.random.default_rng(2).standard_normal(
        (8, 512, 64), np.float32))

    def forward_backward() -> Any:
        saved = core.forward_saved(q, v, k, None, None, plain)
        return core.backward(q, v, k, None, None, d_out, plain, saved=saved)

    out["forward + backward"] = forward_backward
    saved = core.forward_saved(q, v, k, None, None, plain)
    out["backward alone"] = lambda: core.backward(q, v, k, None, None, d_out, plain, saved=saved)
    cq, ck, cv = ARRAYS.setdefault((8, 128, 128, 64), compare.inputs(8, 128, 128, 64))
    concat = _run.Options.of(score_mode="concat", scale=0.5).to_core()
    out["concat (8, 128, 128, 64)"] = lambda: core.attention(cq, cv, ck, None, None, concat)
    sq, sk, sv = ARRAYS.setdefault((1, 8, 8, 16), compare.inputs(1, 8, 8, 16))
    out["small call (1, 8, 8, 16)"] = lambda: core.attention(sq, sv, sk, None, None, plain)
    return out


ARRAYS: dict[tuple[int, ...], tuple[np.ndarray, ...]] = {}
MASKS: dict[str, np.ndarray] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="path of the other build's _core extension")
    ap.add_argument("--calls", type=int, default=40, help="timed calls of each, per row")
    args = ap.parse_args()
    old_core = load_core(args.old)
    for core in (old_core, new_core):
        core.set_num_threads(compare.THREADS)
    new_rows, old_rows = rows(new_core), rows(old_core)
    print(f"# {cpu_model()}; kernels {new_core.kernel_isa()} (new) / {old_core.kernel_isa()} "
          f"(old); {compare.THREADS} threads; medians of {args.calls} calls in steady runs")
    print(f"{'row':<34} {'old ms':>9} {'new ms':>9} {'new/old':>8}")
    for name in new_rows:
        small = name.startswith("small")
        run, gap = (1, 0.0) if small else (None, None)
        calls = args.calls * 10 if small else args.calls
        t = compare.interleaved({"old": old_rows[name], "new": new_rows[name]}, calls, run, gap)
        print(f"{name:<34} {t['old'] * 1e3:9.3f} {t['new'] * 1e3:9.3f} {t['new'] / t['old']:8.3f}")


if __name__ == "__main__":
    main()

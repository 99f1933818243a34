"""`python -m luong`: run attention on sample batches, check each against the plain NumPy
reference (`luong.reference`), and print a table of time, speed-up and error.

Times are steady medians: each side runs its calls back to back, started once the other's
worker threads have stopped spinning (see `luong._timing`). Exits with status 1 when any result
differs from the reference by more than float32 rounding allows, so the command doubles as an
installation self-check.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Any

import numpy as np

import luong
from luong._run import Options
from luong._timing import cpu_model, steady_ms
from luong.reference import reference_attention

# (label, score_mode, (B, Tq, Tv, D), masks + causal, return scores)
CASES = [
    ("dot", "dot", (8, 256, 256, 64), False, False),
    ("dot, value mask + causal", "dot", (8, 256, 256, 64), True, False),
    ("dot, returned scores", "dot", (8, 256, 256, 64), False, True),
    ("concat, scaled", "concat", (4, 64, 64, 32), True, True),
]


def write_plot(path: str) -> int:
    """Writes a heatmap of the attention weights of batch item 0 of a small sample batch
    (2 x 8 queries x 10 keys, D = 16, seed 0, causal, the last two keys masked), drawn with the
    non-interactive Agg backend (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from luong.plot import heatmap

    rng = np.random.default_rng(0)
    b, tq, tv, d = 2, 8, 10, 16
    q = rng.standard_normal((b, tq, d), dtype=np.float32)
    k = rng.standard_normal((b, tv, d), dtype=np.float32)
    v = rng.standard_normal((b, tv, d), dtype=np.float32)
    value_mask = np.arange(tv) < tv - 2
    _, weights = luong.attention(
        q, v, k, value_mask=value_mask, scale=1.0 / np.sqrt(d), use_causal_mask=True,
        return_attention_scores=True,
    )
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = heatmap(
        weights,
        query_labels=[f"q{i}" for i in range(tq)],
        key_labels=[f"k{j}" + ("" if value_mask[j] else " (masked)") for j in range(tv)],
        ax=fig.add_subplot(),
    )
    ax.set_title("luong sample batch, item 0: causal, last two keys masked")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}: attention weights {weights.shape[1:]} of batch item 0 of {b}")
    return 0


def path(mode: str, shape: tuple[int, int, int, int], causal: bool, scores: bool) -> str:
    """The kernel family this case runs on (`_core.planned_isa`)."""
    b, tq, tv, d = shape
    options = Options(score_mode=mode, causal=causal, return_scores=scores)
    return luong._core.planned_isa((b, tq, tv, d, d), "float32", options.to_core())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m luong", description=__doc__)
    parser.add_argument("--calls", type=int, default=30, help="timed calls per case and side")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="instead of the self-check, write a heatmap of the sample batch's attention "
        "weights to FILE.png (needs matplotlib)",
    )
    args = parser.parse_args(argv)
    if args.plot is not None:
        return write_plot(args.plot)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, received {args.calls}")

    rng = np.random.default_rng(0)
    eps = float(np.finfo(np.float32).eps)
    isa = luong.kernel_isa()
    print(f"luong {luong.__version__} on {cpu_model()}: {isa} kernels, "
          f"{luong.get_num_threads()} threads, float32; NumPy {np.__version__}")
    print(f"times: medians of {args.calls} calls back to back, each side started once the other's "
          "threads are idle")
    header = f"{'case':<26} {'(B, Tq, Tv, D)':<18} {'kernels':<8} {'luong ms':>9} "
    header += f"{'NumPy ms':>9} {'speed-up':>8} {'max error':>10}"
    print(header)
    print("-" * len(header))
    failed = False
    other_path = False
    for label, mode, (b, tq, tv, d), masked, with_scores in CASES:
        q = rng.standard_normal((b, tq, d), dtype=np.float32)
        k = rng.standard_normal((b, tv, d), dtype=np.float32)
        v = rng.standard_normal((b, tv, d), dtype=np.float32)
        vm = rng.random((b, tv)) > 0.2 if masked else None
        scale = 1.0 / np.sqrt(d) if mode == "dot" or masked else None
        kwargs: dict[str, Any] = dict(
            value_mask=vm, score_mode=mode, scale=scale, use_causal_mask=masked
        )
        call_luong = partial(
            luong.attention, q, v, k, return_attention_scores=with_scores, **kwargs
        )
        out, weights = luong.attention(q, v, k, return_attention_scores=True, **kwargs)
        run_numpy = partial(reference_attention, q, v, k, **kwargs)
        ref_out, ref_w = run_numpy()
        # float32 rounding of a score is about eps·Σ|terms|; weights move by that, outputs by
        # that times |v|. 16× leaves room for the different summation orders.
        terms = d * (np.abs(q).max() * np.abs(k).max() * (scale or 1.0) if mode == "dot" else 1.0)
        tol = 16 * eps * (1 + terms) * max(1.0, float(np.abs(v).max()))
        err = max(float(np.abs(out - ref_out).max()), float(np.abs(weights - ref_w).max()))
        ok = err <= tol
        failed |= not ok
        t_numpy = steady_ms(run_numpy, args.calls)
        t_luong = steady_ms(call_luong, args.calls)
        kernels = path(mode, (b, tq, tv, d), masked, with_scores)
        if kernels != isa:
            kernels += "*"
            other_path = True
        shape = f"({b}, {tq}, {tv}, {d})"
        flag = "" if ok else f"  FAIL (tolerance {tol:.1e})"
        print(
            f"{label:<26} {shape:<18} {kernels:<8} {t_luong:>9.2f} {t_numpy:>9.2f} "
            f"{t_numpy / t_luong:>7.1f}x {err:>10.1e}{flag}"
        )
    if other_path:
        print(f"* not the {isa} kernels: on AMX the tiles take only dot-score calls past the "
              "tile gate (see docs/design.md)")
    print("self-check:", "FAILED" if failed else "ok (every result within float32 rounding)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

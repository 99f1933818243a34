"""`python -m luong`: run attention on sample batches, check each against the plain NumPy
reference (`luong.reference`), and print a table of time, speed-up and error.

Exits with status 1 when any result differs from the reference by more than float32 rounding
allows, so the command doubles as an installation self-check.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from typing import Any, Callable

import numpy as np

import luong
from luong.reference import reference_attention

# (label, score_mode, (B, Tq, Tv, D), masks + causal, return scores)
CASES = [
    ("dot", "dot", (8, 256, 256, 64), False, False),
    ("dot, value mask + causal", "dot", (8, 256, 256, 64), True, False),
    ("dot, returned scores", "dot", (8, 256, 256, 64), False, True),
    ("concat, scaled", "concat", (4, 64, 64, 32), True, True),
]


def median_ms(fn: Callable[[], Any], calls: int) -> float:
    """Median wall time of `calls` calls, in milliseconds."""
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m luong", description=__doc__)
    parser.add_argument("--calls", type=int, default=7, help="timed calls per case (median)")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="instead of the self-check, write a heatmap of the sample batch's attention "
        "weights to FILE.png (needs matplotlib)",
    )
    args = parser.parse_args(argv)
    if args.plot is not None:
        return write_plot(args.plot)

    rng = np.random.default_rng(0)
    eps = float(np.finfo(np.float32).eps)
    print(f"luong {luong.__version__}, {luong.get_num_threads()} threads, float32")
    header = f"{'case':<26} {'(B, Tq, Tv, D)':<20} {'luong ms':>9} {'NumPy ms':>9} "
    header += f"{'speed-up':>8} {'max error':>10}"
    print(header)
    print("-" * len(header))
    failed = False
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
        # luong first: NumPy's BLAS workers spin for a while after each call and would slow
        # whatever runs next on this 2-core budget.
        for _ in range(3):
            call_luong()
        t_luong = median_ms(call_luong, args.calls)
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
        t_numpy = median_ms(run_numpy, max(3, args.calls // 2))
        shape = f"({b}, {tq}, {tv}, {d})"
        flag = "" if ok else f"  FAIL (tolerance {tol:.1e})"
        print(
            f"{label:<26} {shape:<20} {t_luong:>9.2f} {t_numpy:>9.2f} "
            f"{t_numpy / t_luong:>7.1f}x {err:>10.1e}{flag}"
        )
    print("self-check:", "FAILED" if failed else "ok (every result within float32 rounding)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

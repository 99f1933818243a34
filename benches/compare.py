"""Side-by-side speed of luong against PyTorch, JAX, Keras and NumPy on this machine.

    python benches/compare.py [--calls 30] [--chart benches/compare.png] [--quick]

Every contender of a row runs in this one process, and the contenders take turns in short runs:
a run is one untimed call then `--run` (4) timed calls back to back, and runs alternate, in an
order that rotates each round, until each contender has `--calls` timed calls. The table quotes
medians and ratios: this machine is shared and noisy, so only ratios measured together mean
anything. Runs rather than single calls, because PyTorch's OpenMP workers spin for 2-7 ms of CPU
after each call (GNU OpenMP's default; measured with process_time around a sleep) and go to
sleep 5-10 ms after it, and both ways of interleaving single calls are unfair to someone:
- back to back, or after a pause shorter than the spin, torch's spinning worker takes a core
  from the next contender (luong 1.95 -> 2.54 ms at (8, 512, 512, 64) after SDPA, 2 ms pause);
- after a longer pause torch wakes a sleeping worker and pays 1.4-7 ms for it (SDPA at
  (32, 128, 128, 64): 0.81 ms back to back, 5.9 ms after a 10 ms pause).
Runs give each library the steady state of a program that calls it in a loop; each run starts
after a `--gap` (20 ms) so the previous contender's workers are idle, and its first call, which
wakes them, is not timed. Shortening torch's spin (GOMP_SPINCOUNT) or turning it off
(OMP_WAIT_POLICY=passive) would slow torch itself, so torch keeps its default. Peers that are
not installed are skipped and named.
glibc keeps its defaults, as a user's program has them, and they move torch's times. Its
bmm-softmax-bmm at (8, 512, 512, 64) took 7.0-7.9 ms in 10 of 16 processes, each call faulting
in ~4000 fresh pages for its 8 MB intermediates, and 2.5-3.1 ms with 0-100 faults in the other six:
a process whose row shows such a torch time is in that mode, and its ratios are inflated. With
MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ at 1 GiB (freed memory kept for reuse) it took
2.4-2.7 ms in every process; the eager concat formula, whose 33.5 MB intermediates glibc maps
afresh on every call by default, then took 10.0 ms instead of 27.5 (luong 0.47 ms: 21x instead
of 59-74x in runs with the defaults), and SDPA's rows stayed within noise.
PyTorch runs on the CPU with `torch.set_num_threads(2)`; its SDPA gets its best layout (4-D
`(B, 1, T, D)` inputs, `scale=1.0`, the same boolean mask). Keras runs on JAX, its fastest CPU
backend, under `jax.jit`. FLOP counts are 4·B·Tq·Tv·D (two products).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")
# The same for NumPy's OpenBLAS workers (luong 2.5 -> 4.8 ms interleaved with the NumPy
# reference); a short spin leaves NumPy's own time unchanged (12.0 vs 11.5 ms).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np

import luong
from luong._timing import cpu_model
from luong.reference import reference_attention

THREADS = 2
RUN = 4  # timed calls per run (see the module docstring); --run sets it
GAP = 0.02  # seconds of sleep before each run; --gap sets it


def optional(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        print(f"# {name} is not installed: its columns are skipped")
        return None


torch = optional("torch")
jax = optional("jax")
keras = optional("keras") if jax is not None else None
if torch is not None:
    torch.set_num_threads(THREADS)
luong.set_num_threads(THREADS)


def interleaved(
    fns: dict[str, Callable[[], Any]], calls: int, run: int | None = None, gap: float | None = None
) -> dict[str, float]:
    """Median seconds per call for each contender: the contenders take turns in runs of one
    untimed call and `run` timed ones, each run after `gap` seconds of sleep, the order rotated
    each round (defaults RUN and GAP; `run=1, gap=0` interleaves single calls)."""
    run = RUN if run is None else run
    gap = GAP if gap is None else gap
    names = list(fns)
    for n in names:  # warm up: first-call costs (jit, allocation, thread start) are not measured
        for _ in range(2):
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(-(-calls // run)):
        for n in names[i % len(names):] + names[: i % len(names)]:
            if gap:
                time.sleep(gap)
                fns[n]()  # wakes the contender's workers; not timed
            for _ in range(run):
                t = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t)
    return {n: statistics.median(ts) for n, ts in times.items()}


def measure(
    row: str, shape: tuple[int, int, int, int], ours: Callable[[], Any],
    groups: list[dict[str, Callable[[], Any]]], calls: int, run: int | None = None,
    gap: float | None = None,
) -> dict[str, Any]:
    """Interleaves luong with each group of peers; ratios come from within a group. JAX runs in
    a group of its own: its worker pool spins after each call and slows whatever runs next
    (luong 2.5 -> 4 ms at (8, 512, 512, 64)), which would bias every other column."""
    peers: list[tuple[str, float, float]] = []
    ours_time = None
    for group in groups or [{}]:
        times = interleaved({"luong": ours, **group}, calls, run, gap)
        ours_time = times["luong"] if ours_time is None else ours_time
        peers += [(n, t, t / times["luong"]) for n, t in times.items() if n != "luong"]
    return {"row": row, "shape": shape, "luong": ours_time, "peers": peers}


def inputs(b: int, tq: int, tv: int, d: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, tq, d), dtype=np.float32)
    k = rng.standard_normal((b, tv, d), dtype=np.float32)
    v = rng.standard_normal((b, tv, d), dtype=np.float32)
    return q, k, v


def torch_sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Any = None) -> Callable[[], Any]:
    tq, tk, tv = (torch.from_numpy(x)[:, None] for x in (q, k, v))  # (B, 1, T, D): its best layout
    f = torch.nn.functional.scaled_dot_product_attention
    return lambda: f(tq, tk, tv, attn_mask=mask, scale=1.0)


def rows_dot(calls: int, quick: bool) -> list[dict[str, Any]]:
    # The four shapes, then single-sequence decoding (B = 1: the keys are split across
    # the threads, see src/kernel/decode.rs), then long keys (in chunks, kernel::flash).
    shapes = [(8, 512, 512, 64), (2, 2048, 2048, 64), (32, 128, 128, 64), (8, 1, 4096, 64),
              (1, 1, 8192, 64), (1, 1024, 16384, 64)]
    return [row_dot(shape, calls) for shape in (shapes[:2] if quick else shapes)]


def row_dot(shape: tuple[int, int, int, int], calls: int) -> dict[str, Any]:
    q, k, v = inputs(*shape)
    main: dict[str, Callable[[], Any]] = {}
    jax_group: dict[str, Callable[[], Any]] = {}
    if torch is not None:
        main["torch SDPA 4-D"] = torch_sdpa(q, k, v)
        t3 = [torch.from_numpy(x) for x in (q, k, v)]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        main["torch SDPA 3-D"] = lambda: sdpa(t3[0], t3[1], t3[2], scale=1.0)
    if shape[0] * shape[1] * shape[2] <= 8 * 512 * 512:
        main["numpy"] = lambda: reference_attention(q, v, k)
    if jax is not None:
        jq, jk, jv = (jax.numpy.asarray(x[:, :, None]) for x in (q, k, v))  # (B, T, N=1, H)
        f = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, scale=1.0))
        jax_group["jax dot_product_attention"] = lambda: f(jq, jk, jv).block_until_ready()
    groups = [g for g in (main, jax_group) if g]
    return measure("dot", shape, lambda: luong.attention(q, v, k), groups, calls)


def rows_masked(calls: int) -> list[dict[str, Any]]:
    shape = (8, 512, 512, 64)
    b, tq, tv, _ = shape
    q, k, v = inputs(*shape)
    vm = np.random.default_rng(1).random((b, tv)) < 0.8
    fns: dict[str, Callable[[], Any]] = {}
    if torch is not None:
        causal = torch.ones(tq, tv, dtype=torch.bool).tril()
        mask = torch.from_numpy(vm)[:, None, None, :] & causal  # (B, 1, Tq, Tv), bool
        fns["torch SDPA 4-D"] = torch_sdpa(q, k, v, mask)

    def ours() -> Any:
        return luong.attention(q, v, k, value_mask=vm, use_causal_mask=True)

    return [measure("value mask + causal", shape, ours, [fns], calls)]


def rows_scores(calls: int) -> list[dict[str, Any]]:
    shape = (8, 512, 512, 64)
    q, k, v = inputs(*shape)
    fns: dict[str, Callable[[], Any]] = {}
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

        def eager() -> Any:
            w = torch.softmax(torch.bmm(tq, tk.transpose(1, 2)), dim=-1)
            return torch.bmm(w, tv), w

        fns["torch bmm-softmax-bmm"] = eager
    # What the weights cost luong: the same call without them, in the same runs (torch's time
    # over this one bounds the row's ratio).
    fns["luong, no weights"] = lambda: luong.attention(q, v, k)

    def ours() -> Any:
        return luong.attention(q, v, k, return_attention_scores=True)

    return [measure("returned scores", shape, ours, [fns], calls)]


def rows_concat(calls: int) -> list[dict[str, Any]]:
    shape = (8, 128, 128, 64)
    q, k, v = inputs(*shape)
    fns: dict[str, Callable[[], Any]] = {}
    jax_group: dict[str, Callable[[], Any]] = {}
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

        def eager() -> Any:
            s = torch.tanh(0.5 * (tq[:, :, None] + tk[:, None])).sum(-1)
            return torch.bmm(torch.softmax(s, dim=-1), tv)

        fns["torch eager formula"] = eager
    if keras is not None:
        layer = keras.layers.Attention(use_scale=True, score_mode="concat")
        layer.build([q.shape, v.shape, k.shape])
        layer.set_weights([np.float32(0.5), np.float32(1.0)])
        f = jax.jit(lambda a, b, c: layer([a, b, c]))
        jq, jk, jv = (jax.numpy.asarray(x) for x in (q, k, v))
        jax_group["keras (jax, jit)"] = lambda: f(jq, jv, jk).block_until_ready()
    fns["numpy"] = lambda: reference_attention(q, v, k, score_mode="concat", scale=0.5)

    def ours() -> Any:
        return luong.attention(q, v, k, score_mode="concat", scale=0.5)

    return [measure("concat", shape, ours, [g for g in (fns, jax_group) if g], calls)]


def rows_training(calls: int) -> list[dict[str, Any]]:
    """Forward + backward: luong's vjp against torch autograd through SDPA (4-D layout)."""
    shape = (8, 512, 512, 64)
    q, k, v = inputs(*shape)
    d_out = np.random.default_rng(2).standard_normal(q.shape[:2] + (v.shape[-1],), np.float32)
    layer = luong.Attention()

    def ours() -> Any:
        _, backward = layer.vjp([q, v, k])
        return backward(d_out)

    fns: dict[str, Callable[[], Any]] = {}
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(x)[:, None].clone().requires_grad_() for x in (q, k, v))
        td = torch.from_numpy(d_out)[:, None]
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def torch_fb() -> Any:
            out = sdpa(tq, tk, tv, scale=1.0)
            return torch.autograd.grad(out, (tq, tk, tv), td)

        fns["torch SDPA autograd"] = torch_fb
    # The backward alone (from one vjp's saved statistics) against luong's own forward: the
    # ratio is forward / backward (the training issue's goal: backward <= 2.5x the forward).
    _, saved_backward = layer.vjp([q, v, k])
    alone = {"luong forward": lambda: layer([q, v, k])}
    return [
        measure("forward + backward", shape, ours, [fns], calls),
        measure("backward alone", shape, lambda: saved_backward(d_out), [alone], calls),
    ]


def rows_small(calls: int) -> list[dict[str, Any]]:
    shape = (1, 8, 8, 16)
    q, k, v = inputs(*shape)
    layer = luong.Attention()
    main: dict[str, Callable[[], Any]] = {"numpy": lambda: reference_attention(q, v, k)}
    jax_group: dict[str, Callable[[], Any]] = {}
    if keras is not None:
        klayer = keras.layers.Attention()
        jax_group["keras (jax, eager call)"] = lambda: np.asarray(klayer([q, v, k]))
    groups = [g for g in (main, jax_group) if g]
    # Single calls interleaved, no sleep: these calls use no worker threads (luong runs calls
    # under 1 MFLOP on the calling thread), and a sleep before a 10 us call measures cold
    # caches instead of the call.
    small = measure("small call", shape, lambda: layer([q, v, k]), groups, calls * 10, 1, 0.0)
    return [small]


def rows_threads(calls: int) -> list[dict[str, Any]]:
    shape = (8, 512, 512, 64)
    q, k, v = inputs(*shape)
    # Resizing the pool starts threads, and the first few calls on a new pool run slow (measured:
    # 3-4.7 ms instead of 2.4 for about four calls), so alternate blocks of calls, each after
    # six unmeasured ones.
    times: dict[int, list[float]] = {2: [], 1: []}
    for rnd in range(max(4, calls // 5)):
        for n in (2, 1) if rnd % 2 == 0 else (1, 2):
            luong.set_num_threads(n)
            for _ in range(6):
                luong.attention(q, v, k)
            for _ in range(5):
                t = time.perf_counter()
                luong.attention(q, v, k)
                times[n].append(time.perf_counter() - t)
    luong.set_num_threads(THREADS)
    two, one = statistics.median(times[2]), statistics.median(times[1])
    return [{"row": "threads", "shape": shape, "luong": two,
             "peers": [("luong, 1 thread", one, one / two)]}]


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 1e-3 else f"{s * 1e3:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | (B, Tq, Tv, D) | luong ms | GFLOP/s | peer | peer ms | peer / luong |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        b, tq, tv, d = r["shape"]
        lu = r["luong"]
        gf = 4 * b * tq * tv * d / lu / 1e9
        for i, (n, t, ratio) in enumerate(r["peers"] or [("-", float("nan"), float("nan"))]):
            first = f"| {r['row']} | {r['shape']} | {fmt_ms(lu)} | {gf:.0f} |"
            head = first if i == 0 else "| | | | |"
            lines.append(f"{head} {n} | {fmt_ms(t)} | {ratio:.2f}x |")
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no chart")
        return
    labels, ratios = [], []
    for r in rows:
        for n, _, ratio in r["peers"]:
            if n != "numpy":
                labels.append(f"{r['row']} {r['shape']}\nvs {n}")
                ratios.append(ratio)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.2))
    ax.barh(range(len(labels)), ratios, color=["#2a7" if x >= 1 else "#c44" for x in ratios])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("peer time / luong time (higher: luong faster), median, interleaved calls")
    ax.set_title(f"luong vs peers, float32, {THREADS} threads, {platform.processor() or 'CPU'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"# chart: {path}")


def main() -> int:
    global RUN, GAP
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--calls", type=int, default=30, help="timed calls per contender and row (median)"
    )
    ap.add_argument("--chart", default="benches/compare.png", help="PNG path ('' for none)")
    ap.add_argument("--quick", action="store_true", help="fewer rows (for a smoke run)")
    ap.add_argument("--run", type=int, default=RUN, help="timed calls per run, back to back")
    ap.add_argument("--gap", type=float, default=GAP, help="seconds of sleep before each run")
    args = ap.parse_args()
    RUN, GAP = args.run, args.gap
    print(f"# luong {luong.__version__} on {cpu_model()} ({luong.kernel_isa()} kernels), "
          f"python {sys.version.split()[0]}, "
          f"torch {getattr(torch, '__version__', '-')}, jax {getattr(jax, '__version__', '-')}, "
          f"keras {getattr(keras, '__version__', '-')}; {THREADS} threads; {args.calls} calls; "
          f"runs of 1 + {args.run} calls, {args.gap * 1e3:g} ms apart")
    rows = rows_dot(args.calls, args.quick)
    if not args.quick:
        rows += rows_masked(args.calls) + rows_scores(args.calls) + rows_concat(args.calls)
        rows += rows_training(args.calls) + rows_small(args.calls) + rows_threads(args.calls)
    print(table(rows))
    if args.chart:
        chart(rows, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())

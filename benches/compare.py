"""Side-by-side speed of luong against PyTorch, JAX, Keras and NumPy on this machine.

    python benches/compare.py [--isa native|avx2|avx512] [--calls 30] [--chart PNG] [--quick]

`--isa` holds luong and PyTorch to one instruction set (environment set before either is
imported: LUONG_ISA, ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA); `native`
(the default) clears them, which is what a user gets. ONNX Runtime has no such switch: its MLAS
kernels always take the best set the CPU has, and the table's header says so. Before
the rows, benches/peak.rs (`cargo bench --bench peak`) measures the float32 FMA peak of the set,
and each row quotes its share of it. On AMX machines `native` runs the tile kernels where luong's
gate sends them, which the FMA peak does not bound: the AVX-512 peak is quoted as a reference.

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
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

# What `--isa` sets, before luong and torch are imported (their kernels are chosen at import).
ISA_ENV = {
    "avx2": {"LUONG_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2"},
    # AVX-512 without AMX or AVX512-FP16: oneDNN's highest level below them is AVX512_CORE_BF16.
    "avx512": {"LUONG_ISA": "avx512", "ATEN_CPU_CAPABILITY": "avx512",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}


def isa_from_argv(argv: list[str]) -> str:
    """The `--isa` value, read before argparse runs (the environment must be set before the
    imports below); argparse checks it again."""
    for i, a in enumerate(argv):
        if a == "--isa" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--isa="):
            return a.split("=", 1)[1]
    return "native"


# Only when run as the script: ab_builds.py imports this module and keeps its LUONG_ISA.
ISA = isa_from_argv(sys.argv[1:]) if __name__ == "__main__" else None
if ISA is not None:
    for _name in {n for env in ISA_ENV.values() for n in env}:
        os.environ.pop(_name, None)
    os.environ.update(ISA_ENV.get(ISA, {}))
os.environ.setdefault("KERAS_BACKEND", "jax")
# The same for NumPy's OpenBLAS workers (luong 2.5 -> 4.8 ms interleaved with the NumPy
# reference); a short spin leaves NumPy's own time unchanged (12.0 vs 11.5 ms).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

# After the environment above, which chooses luong's and torch's kernels: hence E402.
import numpy as np  # noqa: E402

import luong  # noqa: E402
from luong._timing import cpu_model  # noqa: E402
from luong.reference import reference_attention  # noqa: E402

THREADS = 2
RUN = 4  # timed calls per run (see the module docstring); --run sets it
GAP = 0.02  # seconds of sleep before each run; --gap sets it
# Rows whose work is the two products (4·B·Tq·Tv·D FLOPs), the only ones quoted against the FMA
# peak: the backward does more products, concat and small calls are bound by other things.
PRODUCT_ROWS = {"dot", "value mask + causal", "returned scores", "threads"}


def optional(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        print(f"# {name} is not installed: its columns are skipped")
        return None


torch = optional("torch")
ort = optional("onnxruntime")
onnx = optional("onnx") if ort is not None else None
jax = optional("jax")
keras = optional("keras") if jax is not None else None
if torch is not None:
    torch.set_num_threads(THREADS)
luong.set_num_threads(THREADS)


def fma_peak(isa: str) -> float | None:
    """GFLOP/s of float32 FMAs in `isa` on THREADS threads, from benches/peak.rs (None where
    cargo or the set is missing). Runs before any row, never beside one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "LUONG_NUM_THREADS": str(THREADS)}
    cmd = ["cargo", "bench", "--quiet", "--bench", "peak", "--", isa]
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"# no FMA peak: {' '.join(cmd)} failed ({e})")
        return None
    for line in out.stdout.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == isa and words[2] == "GFLOP/s":
            return float(words[1])
    print(f"# no FMA peak for {isa}: {out.stdout.strip()}")
    return None


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


def torch_sdpa(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Any = None, dtype: Any = None
) -> Callable[[], Any]:
    """SDPA on (B, 1, T, D) tensors, its best layout; in `dtype` (a torch dtype) when given."""
    tq, tk, tv = (torch.from_numpy(x)[:, None].to(dtype or torch.float32) for x in (q, k, v))
    f = torch.nn.functional.scaled_dot_product_attention
    return lambda: f(tq, tk, tv, attn_mask=mask, scale=1.0)


def ort_mha(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Callable[[], Any]:
    """ONNX Runtime's `com.microsoft` MultiHeadAttention with one head (its MLAS flash kernel on
    the CPU), `scale=1.0`, THREADS intra-op threads that sleep rather than spin between calls."""
    assert onnx is not None and ort is not None
    helper, f32 = onnx.helper, onnx.TensorProto.FLOAT
    d, dv = q.shape[-1], v.shape[-1]
    node = helper.make_node("MultiHeadAttention", ["query", "key", "value"], ["out"],
                            domain="com.microsoft", num_heads=1, scale=1.0)
    graph = helper.make_graph(
        [node], "attention",
        [helper.make_tensor_value_info("query", f32, ["B", "Tq", d]),
         helper.make_tensor_value_info("key", f32, ["B", "Tv", d]),
         helper.make_tensor_value_info("value", f32, ["B", "Tv", dv])],
        [helper.make_tensor_value_info("out", f32, ["B", "Tq", dv])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"query": q, "key": k, "value": v}
    return lambda: sess.run(None, feed)


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
    if onnx is not None:
        main["onnxruntime MHA"] = ort_mha(q, k, v)
    if shape[0] * shape[1] * shape[2] <= 8 * 512 * 512:
        main["numpy"] = lambda: reference_attention(q, v, k)
    if jax is not None:
        jq, jk, jv = (jax.numpy.asarray(x[:, :, None]) for x in (q, k, v))  # (B, T, N=1, H)
        f = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, scale=1.0))
        jax_group["jax dot_product_attention"] = lambda: f(jq, jk, jv).block_until_ready()
    groups = [g for g in (main, jax_group) if g]
    return measure("dot", shape, lambda: luong.attention(q, v, k), groups, calls)


def luong_call(q: np.ndarray, k: np.ndarray, v: np.ndarray, dtype: str) -> Callable[[], Any]:
    return lambda: luong.attention(q, v, k, dtype=dtype)


def rows_half(calls: int) -> list[dict[str, Any]]:
    """float16 and bfloat16 inputs against luong's own float32 call on the same data (the
    half-precision issue asks for a time ratio of at least 0.97) and against torch's SDPA in
    the same dtype."""
    halves: dict[str, Any] = {"float16": np.float16}
    ml_dtypes = optional("ml_dtypes")
    if ml_dtypes is not None:
        halves["bfloat16"] = ml_dtypes.bfloat16
    rows = []
    for shape in [(8, 512, 512, 64), (2, 2048, 2048, 64), (32, 128, 128, 64)]:
        q, k, v = inputs(*shape)
        for name, dt in halves.items():
            hq, hk, hv = (x.astype(dt) for x in (q, k, v))
            fns = {"luong float32": luong_call(q, k, v, "float32")}
            if torch is not None:
                fns[f"torch SDPA 4-D {name}"] = torch_sdpa(q, k, v, dtype=getattr(torch, name))
            rows.append(measure(name, shape, luong_call(hq, hk, hv, name), [fns], calls))
    return rows


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


def rows_model_step(calls: int) -> list[dict[str, Any]]:
    """luong inside a PyTorch model: `Linear(64 -> 192) -> split -> attention -> Linear(64 -> 64)`
    at (8, 512, 512, 64), torch with its default OpenMP settings, the attention by luong.torch,
    by SDPA (4-D) or left out (the value passes through), forward alone (no_grad) and forward +
    backward (the gradients of the two Linear layers' parameters). Each step row compares the
    luong step with the SDPA step; each share row is a step's time minus the step without
    attention, against the same attention called alone (the training issue asks for a share of
    at most 1.15x the standalone time: ratio >= 0.87)."""
    if torch is None:
        return []
    import luong.torch as lt

    b, t, d = 8, 512, 64
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, d, generator=gen)
    proj, out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
    params = [*proj.parameters(), *out.parameters()]
    layer = lt.Attention()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    attentions: dict[str, Callable[[Any, Any, Any], Any]] = {
        "luong": lambda q, k, v: layer(q, v, k),
        "SDPA": lambda q, k, v: sdpa(q[:, None], k[:, None], v[:, None], scale=1.0)[:, 0],
        "none": lambda q, k, v: v,
    }

    def step(att: Callable[[Any, Any, Any], Any], grad: bool) -> Callable[[], Any]:
        def forward() -> Any:
            q, k, v = proj(x).split(d, -1)
            return out(att(q, k, v))

        def train() -> Any:
            return torch.autograd.grad(forward().sum(), params)

        def infer() -> Any:
            with torch.no_grad():
                return forward()

        return train if grad else infer

    q, k, v = (torch.randn(b, t, d, generator=gen) for _ in range(3))
    leaves = [z.clone().requires_grad_() for z in (q, k, v)]
    d_out = torch.randn(b, t, d, generator=gen)

    def alone(grad: bool) -> Callable[[], Any]:
        def infer() -> Any:
            with torch.no_grad():
                return layer(q, v, k)

        def train() -> Any:
            return torch.autograd.grad(layer(leaves[0], leaves[2], leaves[1]), leaves, d_out)

        return train if grad else infer

    rows = []
    shape = (b, t, t, d)
    for grad, name in ((False, "model step"), (True, "model step fwd + bwd")):
        fns = {n: step(a, grad) for n, a in attentions.items()}
        fns["luong alone"] = alone(grad)
        times = interleaved(fns, calls)
        share = times["luong"] - times["none"]
        sdpa_share = times["SDPA"] - times["none"]
        rows.append({"row": name, "shape": shape, "luong": times["luong"],
                     "peers": [("same step, SDPA", times["SDPA"], times["SDPA"] / times["luong"]),
                               ("same step, no attention", times["none"], float("nan"))]})
        rows.append({"row": f"{name}: attention's share", "shape": shape, "luong": share,
                     "peers": [("luong alone", times["luong alone"],
                                times["luong alone"] / share),
                               ("SDPA's share", sdpa_share, sdpa_share / share)]})
    return rows


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


def table(rows: list[dict[str, Any]], peak: float | None) -> str:
    lines = [
        "| case | (B, Tq, Tv, D) | luong ms | GFLOP/s | % of peak | peer | peer ms "
        "| peer / luong |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        b, tq, tv, d = r["shape"]
        lu = r["luong"]
        gf = 4 * b * tq * tv * d / lu / 1e9
        share = f"{100 * gf / peak:.0f} %" if peak and r["row"] in PRODUCT_ROWS else "-"
        for i, (n, t, ratio) in enumerate(r["peers"] or [("-", float("nan"), float("nan"))]):
            first = f"| {r['row']} | {r['shape']} | {fmt_ms(lu)} | {gf:.0f} | {share} |"
            head = first if i == 0 else "| | | | | |"
            shown = f"{ratio:.2f}x" if ratio == ratio else "-"  # NaN: a time without a ratio
            lines.append(f"{head} {n} | {fmt_ms(t)} | {shown} |")
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
        if "share" in r["row"]:  # a time against a time, not luong against a peer
            continue
        for n, _, ratio in r["peers"]:
            if n != "numpy" and ratio == ratio:
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
    ap.add_argument("--isa", choices=["native", *ISA_ENV], default="native",
                    help="instruction set for luong and torch (read before the imports)")
    args = ap.parse_args()
    RUN, GAP = args.run, args.gap
    ours = luong.kernel_isa()
    if args.isa != "native" and ours != args.isa:
        print(f"--isa {args.isa}: this CPU has no {args.isa} (luong runs {ours})", file=sys.stderr)
        return 2
    # On AMX the tiles are not bounded by the FMA peak; AVX-512's is quoted as a reference.
    peak_isa = {"amx": "avx512", "scalar": None}.get(ours, ours)
    peak = fma_peak(peak_isa) if peak_isa else None
    torch_isa = torch.backends.cpu.get_cpu_capability() if torch is not None else "-"
    print(f"# luong {luong.__version__} on {cpu_model()} ({ours} kernels, --isa {args.isa}), "
          f"python {sys.version.split()[0]}, torch {getattr(torch, '__version__', '-')} "
          f"({torch_isa}), onnxruntime {getattr(ort, '__version__', '-')}, "
          f"jax {getattr(jax, '__version__', '-')}, keras {getattr(keras, '__version__', '-')}; "
          f"{THREADS} threads on {luong.parallel_backend()}'s; {args.calls} calls; "
          f"runs of 1 + {args.run} calls, {args.gap * 1e3:g} ms apart")
    if args.isa != "native" and ort is not None:
        print("# onnxruntime is not held to --isa: MLAS runs the best set this CPU has")
    if peak:
        ref = " (a reference: AMX tiles are not bound by it)" if ours == "amx" else ""
        print(f"# float32 FMA peak, {peak_isa}, {THREADS} threads: {peak:.0f} GFLOP/s{ref}")
    rows = rows_dot(args.calls, args.quick)
    if not args.quick:
        rows += rows_masked(args.calls) + rows_scores(args.calls) + rows_concat(args.calls)
        rows += rows_training(args.calls) + rows_model_step(args.calls)
        rows += rows_small(args.calls) + rows_threads(args.calls)
    half = [] if args.quick else rows_half(args.calls)
    print(table(rows + half, peak))
    if args.chart:
        chart(rows, args.chart)  # float32 only
    return 0


if __name__ == "__main__":
    sys.exit(main())

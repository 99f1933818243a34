"""Odd but valid inputs give the right answer, bad inputs a clear exception, and nothing leaks.

Odd: Fortran order, negative strides, non-contiguous slices, big-endian, read-only arrays,
Python lists, int and float masks; inputs are never mutated; NaN stays in its row; ±inf and
zero-sized dims do not crash. Bad: every wrong shape, type and setting, with the argument named.
"""

from __future__ import annotations

import resource

import numpy as np
import pytest

import luong

RNG = np.random.default_rng(5)
Q = RNG.standard_normal((3, 6, 4)).astype(np.float32)
K = RNG.standard_normal((3, 7, 4)).astype(np.float32)
V = RNG.standard_normal((3, 7, 5)).astype(np.float32)
VM = RNG.random((3, 7)) < 0.7


def _base() -> tuple[np.ndarray, np.ndarray]:
    return luong.attention(Q, V, K, value_mask=VM, return_attention_scores=True)


@pytest.mark.parametrize(
    "layout",
    ["fortran", "negative_strides", "slices", "big_endian", "read_only", "lists", "int_mask"],
)
def test_odd_layouts_give_the_same_answer(layout: str) -> None:
    want_out, want_w = _base()
    q, k, v, vm = Q.copy(), K.copy(), V.copy(), VM.copy()
    if layout == "fortran":
        q, k, v = (np.asfortranarray(x) for x in (q, k, v))
    elif layout == "negative_strides":
        q, k, v = (x[::-1, ::-1].copy()[::-1, ::-1] for x in (q, k, v))
        assert q.strides[0] < 0
    elif layout == "slices":
        wide = np.zeros((3, 12, 8), np.float32)
        wide[:, ::2, ::2] = q
        q = wide[:, ::2, ::2]
        assert not q.flags.c_contiguous
    elif layout == "big_endian":
        q, k, v = (x.astype(">f4") for x in (q, k, v))
    elif layout == "read_only":
        for x in (q, k, v, vm):
            x.flags.writeable = False
    elif layout == "lists":
        q, k, v, vm = q.tolist(), k.tolist(), v.tolist(), vm.tolist()
    elif layout == "int_mask":
        vm = vm.astype(np.int64) * 7
    out, w = luong.attention(q, v, k, value_mask=vm, return_attention_scores=True)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(w, want_w)


def test_inputs_are_never_mutated() -> None:
    q, k, v, vm = Q.copy(), K.copy(), V.copy(), VM.copy()
    layer = luong.Attention(use_scale=True, score_mode="concat", dropout=0.3, seed=1)
    layer([q, v, k], mask=[None, vm], training=True, use_causal_mask=True)
    _, backward = layer.vjp([q, v, k], mask=[None, vm], training=True)
    backward(np.ones((3, 6, 5), np.float32))
    for a, b in ((q, Q), (k, K), (v, V), (vm, VM)):
        np.testing.assert_array_equal(a, b)


def test_nan_stays_in_its_rows_and_inf_does_not_crash() -> None:
    q = Q.copy()
    q[1, 2, 0] = np.nan
    out = luong.attention(q, V, K)
    nan_rows = np.isnan(out).any(axis=-1)
    assert nan_rows[1, 2] and nan_rows.sum() == 1
    assert np.isnan(out[1, 2]).all()
    k = K.copy()
    k[0, 3, 1] = np.inf
    out = luong.attention(Q, V, k)  # inf scores: NaN weights where inf - inf, as NumPy
    assert out.shape == (3, 6, 5)
    assert np.isfinite(out[1:]).all()


@pytest.mark.parametrize(
    ("shape_q", "shape_v", "out_shape"),
    [
        ((2, 0, 4), (2, 5, 4), (2, 0, 4)),
        ((0, 3, 4), (0, 5, 4), (0, 3, 4)),
        ((2, 3, 0), (2, 5, 0), (2, 3, 0)),
    ],
)
def test_zero_sized_dims(
    shape_q: tuple[int, ...], shape_v: tuple[int, ...], out_shape: tuple[int, ...]
) -> None:
    out, w = luong.attention(
        np.ones(shape_q, np.float32), np.ones(shape_v, np.float32), return_attention_scores=True
    )
    assert out.shape == out_shape
    assert w.shape == out_shape[:-1] + (shape_v[-2],)


def test_empty_keys_give_zero_output() -> None:
    # Tv = 0: the weighted sum over no keys is 0 (Keras raises instead; documented difference).
    out = luong.attention(np.ones((2, 3, 4), np.float32), np.ones((2, 0, 4), np.float32))
    np.testing.assert_array_equal(out, np.zeros((2, 3, 4), np.float32))


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(query=np.ones(4, np.float32)), ValueError, ["`query`", "(4,)"]),
        (dict(value=np.ones((3, 8, 5), np.float32)), ValueError, ["`key`", "(3, 8, 5)", "(Tv)"]),
        (dict(key=np.ones((3, 8, 4), np.float32)), ValueError, ["`key`", "(3, 8, 4)", "(3, 7, 5)"]),
        (dict(query=np.ones((2, 6, 4), np.float32)), ValueError, ["broadcast", "(2, 6, 4)"]),
        (dict(value_mask=np.ones((3, 6), bool)), ValueError, ["`value_mask`", "(3, 6)"]),
        (dict(query_mask=np.ones((3, 7), bool)), ValueError, ["`query_mask`", "(3, 7)"]),
        (dict(query=np.full((3, 6, 4), "a")), TypeError, ["`query`", "<U1"]),
        (dict(query=np.ones((3, 6, 4), complex)), TypeError, ["`query`", "complex"]),
        (dict(value=np.array([[object()]])), TypeError, ["`value`", "object"]),
        (dict(value_mask=np.full((3, 7), "x")), TypeError, ["`value_mask`"]),
    ],
)
def test_bad_inputs_name_the_argument(kwargs: dict, error: type, words: list[str]) -> None:
    args = dict(query=Q, value=V, key=K)
    masks = {}
    for name in ("value_mask", "query_mask"):
        if name in kwargs:
            masks[name] = kwargs.pop(name)
    args.update(kwargs)
    with pytest.raises(error) as info:
        luong.attention(args["query"], args["value"], args["key"], **masks)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_tuple_inputs_follow_keras_rule() -> None:
    with pytest.raises(ValueError, match="must be called on a list of inputs"):
        luong.Attention()((Q, V))  # type: ignore[arg-type]


def test_huge_shapes_are_memory_or_value_errors_not_aborts() -> None:
    # Zero-stride views: a huge logical shape from one element, no memory.
    one = np.ones((1, 1, 1), np.float32)
    q = np.broadcast_to(one, (1 << 20, 1 << 22, 1))
    with pytest.raises((MemoryError, ValueError)):
        luong.attention(q, q, return_attention_scores=True)


def test_rss_flat_over_many_calls() -> None:
    q = np.ones((1, 8, 16), np.float32)
    layer = luong.Attention(dropout=0.2, seed=0)

    def burst(n: int) -> None:
        for i in range(n):
            layer([q, q], training=bool(i % 2), return_attention_scores=bool(i % 3))

    burst(20_000)  # warm up allocators and pools
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    burst(100_000)
    growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert growth_kb < 8 * 1024, f"peak RSS grew by {growth_kb} KiB over 100,000 calls"


def test_concat_with_scores_peak_memory_is_near_its_results() -> None:
    """Issue goal: extra peak memory of concat with returned scores at (8, 512, 512, 64) stays
    under 2x the bytes of output + scores (Keras builds a (B, Tq, Tv, D) tensor there: 537 MB).
    Measured in a fresh process: the peak resident size (reset just before the call) minus the
    resident size before it."""
    import subprocess
    import sys

    code = """
import numpy as np, luong
def status(field):  # kB in /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((8, 512, 64), dtype=np.float32) for _ in range(3))
luong.attention(q[:1, :8], v[:1, :8], k[:1, :8], score_mode="concat")  # load, start the pool
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident size
before = status("VmRSS")
out, w = luong.attention(q, v, k, score_mode="concat", scale=0.5, return_attention_scores=True)
print(status("VmHWM") - before, out.nbytes + w.nbytes)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown, results = map(int, done.stdout.split())
    assert results == 8 * 512 * (64 + 512) * 4
    assert grown < 2 * results, f"peak RSS grew by {grown} bytes for {results} bytes of results"
    # The results themselves must show up in the growth (else the measurement saw nothing).
    assert grown > results // 2, f"peak RSS grew by only {grown} bytes: not measured"


def test_shape_rules_on_shapes_alone_give_the_batch_shape() -> None:
    """`_core.check_shapes` (what the JAX bridge checks while tracing) is luong's own rule."""
    check = luong._core.check_shapes
    assert check((2, 1, 3, 4), (1, 5, 7, 4), None, None, (5, 7)) == [2, 5]
    assert check((3, 4), (7, 6), (7, 4), (3,), (3, 7)) == []
    with pytest.raises(ValueError, match=r"`key` shape \(2, 7, 5\) does not match `query`"):
        check((2, 3, 4), (2, 7, 6), (2, 7, 5), None, None)
    with pytest.raises(ValueError, match="value_mask"):
        check((2, 3, 4), (2, 7, 4), None, None, (3, 7))

"""luong.dask: lazy, chunk-by-chunk attention on Dask arrays equals one luong call, to the bit.

Each chunk is one luong call on complete (Tq, Tv) problems, and luong's rows don't depend on
their neighbours in the batch, so any batch chunking must reproduce the single-process result
exactly: masks (chunked unlike the inputs), broadcast batch dims, returned scores. Dropout draws
masks per chunk keyed by the block index: deterministic under any scheduler, and a single chunk
is exactly `luong.attention` with the same seed. One test runs on a two-process LocalCluster.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest

import luong
import luong.dask as ld

B1, B2, TQ, TV, D, DV = 6, 4, 5, 7, 3, 2


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """query (B1, B2, Tq, D), value broadcast on the first batch axis (1, B2, Tv, Dv), key with
    one batch dim fewer (B2, Tv, D), a query mask (B2, Tq) of numbers and a full score mask."""
    rng = np.random.default_rng(seed)
    return {
        "query": rng.standard_normal((B1, B2, TQ, D)),
        "value": rng.standard_normal((1, B2, TV, DV)),
        "key": rng.standard_normal((B2, TV, D)),
        "query_mask": (rng.random((B2, TQ)) > 0.2).astype(np.int64),
        "value_mask": rng.random((B1, B2, TQ, TV)) > 0.3,
        "per_key_mask": rng.random((B1, 1, TV)) > 0.3,
    }


# (query chunks, value chunks, key chunks, mask chunks) per batch axis; -1: one chunk
CHUNKINGS = [
    ((-1, -1), (-1, -1), (-1,), (-1, -1)),
    ((2, 3), (1, 1), (2,), (3, 1)),  # masks and value chunked unlike the query
    ((1, 1), (1, 4), (4,), (-1, 2)),
    ((4, 2), (1, 3), (1,), (5, 3)),  # ragged chunks; Tq / Tv / D chunked too (rechunked away)
]


def _single(out: ld.Output) -> Any:
    """The output array of a call that returns no scores (narrows the return type)."""
    assert not isinstance(out, tuple)
    return out


def _chunked(x: np.ndarray, batch_chunks: tuple[int, ...], inner: int = 2) -> Any:
    """`x` as a Dask array with `batch_chunks` on its leading axes and chunks of `inner` on the
    rest (which luong.dask must merge)."""
    rest = x.ndim - len(batch_chunks)
    return da.from_array(x, chunks=(*batch_chunks, *(inner,) * rest))


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=lambda c: "-".join(map(str, c[0])))
@pytest.mark.parametrize("mode", ["dot", "concat"])
@pytest.mark.parametrize("mask_kind", ["full", "per_key"])
def test_equals_luong_bit_for_bit(chunking: tuple[Any, ...], mode: str, mask_kind: str) -> None:
    x = _inputs()
    q_chunks, v_chunks, k_chunks, m_chunks = chunking
    value_mask = x["value_mask"] if mask_kind == "full" else x["per_key_mask"]
    m_batch = m_chunks if mask_kind == "full" else (m_chunks[0], -1)
    kwargs: dict[str, Any] = dict(
        score_mode=mode, scale=0.37, concat_score_weight=1.7, use_causal_mask=True,
        dtype="float64",
    )
    out, scores = ld.attention(
        _chunked(x["query"], q_chunks),
        _chunked(x["value"], v_chunks),
        _chunked(x["key"], k_chunks),
        query_mask=_chunked(x["query_mask"], (k_chunks[0],)),
        value_mask=_chunked(value_mask, m_batch),
        return_attention_scores=True,
        **kwargs,
    )
    # lazy, with the query's batch chunks and whole (Tq, Dv) / (Tq, Tv) blocks
    batch_chunks = _chunked(x["query"], q_chunks).chunks[:2]
    assert out.chunks == (*batch_chunks, (TQ,), (DV,))
    assert scores.chunks == (*batch_chunks, (TQ,), (TV,))
    got_out, got_scores = dask.compute(out, scores, scheduler="sync")
    ref_out, ref_scores = luong.attention(
        x["query"], x["value"], x["key"], query_mask=x["query_mask"], value_mask=value_mask,
        return_attention_scores=True, **kwargs,
    )
    np.testing.assert_array_equal(got_out, ref_out, strict=True)
    np.testing.assert_array_equal(got_scores, ref_scores, strict=True)


def test_numpy_inputs_without_batch_dims_and_float32_default() -> None:
    x = _inputs()
    q, v, k = x["query"][0, 0], x["value"][0, 0], x["key"][0]
    out = _single(ld.attention(q, v, k, value_mask=x["value_mask"][0, 0]))
    assert out.dtype == np.float32 and out.chunks == ((TQ,), (DV,))
    np.testing.assert_array_equal(
        out.compute(), luong.attention(q, v, k, value_mask=x["value_mask"][0, 0]), strict=True
    )


def test_batch_chunks_follow_the_first_split_input() -> None:
    x = _inputs()
    value = np.broadcast_to(x["value"], (B1, B2, TV, DV))
    chunked = da.from_array(value, chunks=(3, 1, TV, DV))
    out = _single(ld.attention(x["query"], chunked, x["key"]))  # NumPy query and key
    assert out.chunks == ((3, 3), (1, 1, 1, 1), (TQ,), (DV,))
    np.testing.assert_array_equal(
        out.compute(scheduler="sync"), luong.attention(x["query"], value, x["key"]), strict=True
    )


def test_one_kernel_call_per_chunk_for_output_and_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    run = luong._run.run

    def counting_run(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0].shape)
        return run(*args, **kwargs)

    x = _inputs()
    q = da.from_array(x["query"], chunks=(2, 2, -1, -1))  # 3 x 2 batch blocks
    out, scores = ld.attention(q, x["value"], x["key"], return_attention_scores=True)
    monkeypatch.setattr(luong._run, "run", counting_run)
    dask.compute(out, scores, scheduler="sync")
    assert sorted(calls) == [(2, 2, TQ, D)] * 6, calls


# ---------------------------------------------------------------------------------------------
# dropout

RATE, SEED = 0.4, 99


def test_dropout_single_chunk_is_luongs_dropout() -> None:
    x = _inputs()
    kwargs: dict[str, Any] = dict(dropout=RATE, seed=SEED, training=True, dtype="float64")
    got = _single(ld.attention(x["query"], x["value"], x["key"], **kwargs)).compute()
    want = luong.attention(x["query"], x["value"], x["key"], **kwargs)
    np.testing.assert_array_equal(got, want, strict=True)
    assert not np.array_equal(got, luong.attention(x["query"], x["value"], x["key"],
                                                   dtype="float64"))


def test_dropout_chunk_n_draws_call_n_and_does_not_depend_on_the_scheduler() -> None:
    # Chunk n (C order over the batch blocks) uses luong's masks for call n, i.e. those of the
    # n-th training call of a fresh luong.Attention with the same seed.
    rng = np.random.default_rng(3)
    same = rng.standard_normal((1, TQ, D))
    q = np.concatenate([same] * 6)  # identical rows: only the masks can tell chunks apart
    v = rng.standard_normal((6, TV, DV))
    k = rng.standard_normal((6, TV, D))
    v[:] = v[0]
    k[:] = k[0]
    out, scores = ld.attention(
        da.from_array(q, chunks=(2, -1, -1)), v, k, dropout=RATE, seed=SEED, training=True,
        dtype="float64", return_attention_scores=True,
    )
    by_sync = dask.compute(out, scores, scheduler="sync")
    by_threads = dask.compute(out, scores, scheduler="threads", num_workers=2)
    for a, b in zip(by_sync, by_threads):
        np.testing.assert_array_equal(a, b, strict=True)
    layer = luong.Attention(dropout=RATE, seed=SEED, dtype="float64")
    for n in range(3):
        rows = slice(2 * n, 2 * n + 2)
        want_out, want_scores = layer(
            [q[rows], v[rows], k[rows]], training=True, return_attention_scores=True
        )
        np.testing.assert_array_equal(by_sync[0][rows], want_out, strict=True)
        np.testing.assert_array_equal(by_sync[1][rows], want_scores, strict=True)
    dropped = by_sync[1] == 0
    assert 0.25 < dropped.mean() < 0.55, dropped.mean()
    assert not np.array_equal(dropped[0], dropped[2]), "two chunks drew the same masks"


# ---------------------------------------------------------------------------------------------
# errors (raised when the graph is built, not at compute time)


def test_shape_errors_are_raised_eagerly_with_the_real_shapes() -> None:
    x = _inputs()
    q = da.from_array(x["query"], chunks=2)
    with pytest.raises(ValueError, match=r"last dims \(D\).*query \(6, 4, 5, 3\).*key \(4, 7, 2\)"):
        ld.attention(q, x["value"], x["key"][..., :2])
    bad_batch = r"batch\) dims of `value` shape \(3, 4, 7, 2\) do not broadcast"
    with pytest.raises(ValueError, match=bad_batch):
        ld.attention(q, np.concatenate([x["value"]] * 3), x["key"])
    with pytest.raises(ValueError, match=r"`value_mask` shape \(5, 1, 7\) do not broadcast"):
        ld.attention(q, x["value"], x["key"], value_mask=np.ones((5, 1, TV), bool))
    with pytest.raises(TypeError, match="`query` must hold real numbers"):
        ld.attention(q.astype(str), x["value"], x["key"])


def test_unknown_chunk_sizes_are_a_value_error() -> None:
    x = _inputs()
    q = da.from_array(x["query"], chunks=2)
    q = q[q[:, 0, 0, 0] > -10]  # boolean indexing: NaN chunk sizes along the batch
    with pytest.raises(ValueError, match=r"unknown chunk sizes.*compute_chunk_sizes"):
        ld.attention(q, x["value"], x["key"])


# ---------------------------------------------------------------------------------------------
# a real (two-process) cluster


def test_local_cluster_with_two_worker_processes() -> None:
    import distributed
    x = _inputs(seed=7)
    q = da.from_array(x["query"], chunks=(2, 2, -1, -1))
    kwargs: dict[str, Any] = dict(
        value_mask=x["value_mask"], dropout=RATE, seed=SEED, training=True, dtype="float64"
    )
    out = ld.attention(q, x["value"], x["key"], **kwargs)
    plain = ld.attention(q, x["value"], x["key"], **{**kwargs, "training": False})
    local = dask.compute(out, plain, scheduler="sync")
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        remote = client.compute([out, plain], sync=True)
        workers = client.run(lambda: __import__("os").getpid())
    assert len(set(workers.values())) == 2, workers
    for a, b in zip(remote, local):
        np.testing.assert_array_equal(a, b, strict=True)
    np.testing.assert_array_equal(
        remote[1],
        luong.attention(x["query"], x["value"], x["key"], value_mask=x["value_mask"],
                        dtype="float64"),
        strict=True,
    )

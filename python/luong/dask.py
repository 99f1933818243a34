"""Dask bridge: `luong.attention` on Dask arrays chunked along the leading (batch) dims, lazily,
one luong call per chunk.

    import dask.array as da, luong.dask
    q = da.random.random((10_000, 64, 32), chunks=(1_000, -1, -1))
    out = luong.dask.attention(q, v, k, value_mask=m)      # a lazy (10_000, 64, Dv) Dask array
    out.compute()                                          # or .persist(), .to_zarr(...), ...

Chunking rules. Attention mixes whole sequences, so each chunk must hold complete (Tq, D),
(Tv, Dv), (Tv, D) matrices: the last two axes of query, value and key (and the Tq / Tv axes of
the masks) are rechunked to single chunks. Each batch axis keeps the chunks of the first of
query, value, key that is split along it (so a NumPy query with a chunked Dask value follows the
value); every other array, masks included, is rechunked to those, so chunk n of the output is
one luong call on chunk n of each input.
Size-1 (broadcast) batch axes stay one chunk and are broadcast by luong inside each call. The
result's chunks are the query's batch chunks by (Tq,) by (Dv,) (scores: (Tq,) by (Tv,)).

Dropout (`training=True`, `dropout > 0`): each chunk draws its own masks from luong's
counter-based RNG keyed by (seed, call, position), with `call` set to the chunk's flat block
index (C order over the grid of batch blocks). So the result depends on the seed and the chunking
only, never on the scheduler, the number of workers or the order chunks run in; a single chunk
reproduces `luong.attention(..., seed=seed, training=True)` exactly. `seed=None` draws one seed
when the graph is built, so recomputing the same graph gives the same masks.

Importing this module imports dask.array; `import luong` alone does not.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import numpy as np

try:
    import dask.array as da
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "luong.dask needs Dask: `pip install 'dask[array]'` (or `pip install luong[dask]`)"
    ) from e

from . import _core, _run

# dask.array's functions carry no annotations; typed aliases keep mypy --strict checking the
# calls below without a `type: ignore` on each.
_asarray: Callable[..., da.Array] = da.asarray
_blockwise: Callable[..., da.Array] = da.blockwise
_map_blocks: Callable[..., da.Array] = da.map_blocks
_rechunk: Callable[..., da.Array] = da.rechunk
_from_array: Callable[..., da.Array] = da.from_array

__all__ = ["attention"]

Output = Union[da.Array, tuple[da.Array, da.Array]]
Chunks = tuple[tuple[int, ...], ...]
_TQ, _TV, _D, _DV = "tq", "tv", "d", "dv"  # blockwise labels of the non-batch axes


def attention(
    query: Any,
    value: Any,
    key: Any = None,
    *,
    query_mask: Any = None,
    value_mask: Any = None,
    score_mode: str = "dot",
    scale: float | None = None,
    concat_score_weight: float = 1.0,
    dropout: float = 0.0,
    seed: int | None = None,
    training: bool = False,
    return_attention_scores: bool = False,
    use_causal_mask: bool = False,
    dtype: Any = None,
) -> Output:
    """`luong.attention` on Dask (or NumPy) arrays, as a lazy Dask array.

    Arguments, shapes, masks and errors are those of `luong.attention`; NumPy inputs become
    single-chunk Dask arrays. Shapes and dtypes are checked now (by luong's own rules), so a
    mistake raises here, not at compute time. See the module docstring for the chunking rules and
    how dropout masks are drawn per chunk.

    Returns:
        output `(..., Tq, Dv)`, or `(output, scores)` with scores `(..., Tq, Tv)`, as Dask arrays
        of the compute dtype (float32 by default, as Keras; `dtype="float64"` for float64).
        Computing both with one `dask.compute(output, scores)` runs each chunk once.

    Raises:
        ValueError: shapes that don't fit, unknown (NaN) chunk sizes, invalid settings.
        TypeError: non-numeric inputs.
    """
    compute = _run.compute_dtype(dtype)
    options = _run.Options.of(
        score_mode=score_mode, scale=scale, concat_score_weight=concat_score_weight,
        dropout=dropout, seed=seed, training=training, use_causal_mask=use_causal_mask,
        return_attention_scores=return_attention_scores,
    )
    q, v = _asarray(query), _asarray(value)
    k = None if key is None else _asarray(key)
    qm = None if query_mask is None else _asarray(query_mask)
    vm = None if value_mask is None else _asarray(value_mask)
    arrays = {"query": q, "value": v, "key": k, "query_mask": qm, "value_mask": vm}
    for name, x in arrays.items():
        if x is not None and any(np.isnan(sum(c)) for c in x.chunks):
            raise ValueError(
                f"`{name}` has unknown chunk sizes {x.chunks}; call `{name}.compute_chunk_sizes()` "
                "first"
            )

    inputs = [x for x in (q, v, k) if x is not None]
    batch = _check(q, v, k, qm, vm, compute)
    nb = len(batch)  # batch rank of the result
    full_mask = vm is not None and vm.ndim == nb + 2  # luong's rule: a (..., Tq, Tv) score mask
    chunks = _batch_chunks(inputs, batch)

    # (array, its labels): batch labels right-aligned, then the labels of its own last axes.
    labels = tuple(f"b{i}" for i in range(nb))
    pairs: list[tuple[da.Array, tuple[str, ...]] | None] = [
        _aligned(q, labels, (_TQ, _D), chunks),
        _aligned(v, labels, (_TV, _DV), chunks),
        None if k is None else _aligned(k, labels, (_TV, _D), chunks),
        None if qm is None else _aligned(qm, labels, (_TQ,), chunks),
        None if vm is None else _aligned(vm, labels, (_TQ, _TV) if full_mask else (_TV,), chunks),
    ]
    dropping = options.dropout > 0
    # Under dropout: per batch axis, a tiny int array holding each element's block index along
    # that axis (the same chunks as the batch axis), so a chunk knows which block it is.
    ids = [_block_ids(c) for c in chunks] if dropping else []
    grid = tuple(len(c) for c in chunks)

    args: list[Any] = []
    for pair in pairs:
        args.extend(pair if pair is not None else (None, None))
    for i, ids_axis in enumerate(ids):
        args.extend((ids_axis, (labels[i],)))
    out_labels = (*labels, _TQ, _DV)
    tq, dv = q.shape[-2], v.shape[-1]
    meta = np.empty((0,) * (nb + 2), dtype=compute)
    kwargs = {"options": options, "compute": compute, "grid": grid}
    if not return_attention_scores:
        return _blockwise(
            _chunk_output, out_labels, *args, concatenate=True, dtype=compute, meta=meta,
            **kwargs,
        )
    # One task per chunk returns (output, scores); two light getitem layers split it, so
    # computing both runs the kernel once per chunk.
    both = _blockwise(
        _chunk_both, out_labels, *args, concatenate=True, dtype=compute, meta=meta, **kwargs
    )
    tv = v.shape[-2]
    output = _map_blocks(
        operator.getitem, both, 0, chunks=(*chunks, (tq,), (dv,)), dtype=compute, meta=meta
    )
    scores = _map_blocks(
        operator.getitem, both, 1, chunks=(*chunks, (tq,), (tv,)), dtype=compute, meta=meta
    )
    return output, scores


def _check(
    q: da.Array,
    v: da.Array,
    k: da.Array | None,
    qm: da.Array | None,
    vm: da.Array | None,
    compute: np.dtype,
) -> tuple[int, ...]:
    """luong's own checks, run now: the dtypes by the conversion every call makes (on empty
    stand-ins), the shapes by the kernel's rules (`_core.check_shapes`, on shapes alone, as the
    JAX bridge does). Returns the batch shape."""
    arrays = {"query": q, "value": v, "key": k, "query_mask": qm, "value_mask": vm}

    def empty(x: da.Array | None) -> np.ndarray | None:
        return None if x is None else np.empty(0, x.dtype)

    def shape(x: da.Array | None) -> tuple[int, ...] | None:
        return None if x is None else tuple(int(n) for n in x.shape)

    q0, v0 = np.empty(0, q.dtype), np.empty(0, v.dtype)
    _run.convert(q0, v0, empty(k), empty(qm), empty(vm), compute)
    try:
        batch = _core.check_shapes(tuple(q.shape), tuple(v.shape), shape(k), shape(qm), shape(vm))
        return tuple(batch)
    except ValueError as e:
        given = ", ".join(f"{n} {x.shape}" for n, x in arrays.items() if x is not None)
        raise ValueError(f"{e} (the arrays: {given})") from e


def _batch_chunks(inputs: Sequence[da.Array], batch: tuple[int, ...]) -> Chunks:
    """The result's chunks on each batch axis: those of the first of query, value, key that is
    split along the axis (and spans it rather than broadcasting); one chunk if none is split."""
    nb = len(batch)
    chunks: list[tuple[int, ...]] = []
    for axis, size in enumerate(batch):
        chosen: tuple[int, ...] = (size,)
        for x in inputs:
            local = axis - (nb - (x.ndim - 2))
            if local >= 0 and x.shape[local] == size and len(x.chunks[local]) > 1:
                chosen = x.chunks[local]
                break
        chunks.append(chosen)
    return tuple(chunks)


def _aligned(
    x: da.Array, labels: tuple[str, ...], own: tuple[str, ...], chunks: Chunks
) -> tuple[da.Array, tuple[str, ...]]:
    """`x` rechunked to the batch chunks (broadcast size-1 axes stay whole) with its own last
    axes in single chunks, and its blockwise labels."""
    rank = x.ndim - len(own)  # x's batch rank; its batch axes line up with the last ones
    target = []
    for local in range(rank):
        axis_chunks = chunks[len(labels) - rank + local]
        target.append(axis_chunks if x.shape[local] == sum(axis_chunks) else (x.shape[local],))
    target.extend((n,) for n in x.shape[rank:])
    return _rechunk(x, tuple(target)), (*labels[len(labels) - rank :], *own)


def _block_ids(axis_chunks: tuple[int, ...]) -> da.Array:
    """A 1-D int array with `axis_chunks`, each element holding the index of its block."""
    ids = np.repeat(np.arange(len(axis_chunks), dtype=np.int64), axis_chunks)
    return _from_array(ids, chunks=(axis_chunks,))


ChunkArgs = tuple[Optional[np.ndarray], ...]


def _run_chunk(
    args: ChunkArgs, options: _run.Options, compute: np.dtype, grid: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray | None]:
    """One luong call on one chunk: `args` are query, value, key, query_mask, value_mask and,
    under dropout, one block-id array per batch axis."""
    query, value, key, query_mask, value_mask, *ids = args
    assert query is not None and value is not None  # always passed
    if ids:  # dropout: this chunk's masks are luong's masks for call = flat block index
        block = tuple(int(i[0]) if i is not None and i.size else 0 for i in ids)
        options = options.replace(call=int(np.ravel_multi_index(block, grid)))
    return _run.run(query, value, key, query_mask, value_mask, dtype=compute, options=options)


def _chunk_output(
    *args: np.ndarray | None, options: _run.Options, compute: np.dtype, grid: tuple[int, ...]
) -> np.ndarray:
    """The output of one chunk."""
    return _run_chunk(args, options, compute, grid)[0]


def _chunk_both(
    *args: np.ndarray | None, options: _run.Options, compute: np.dtype, grid: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """`(output, scores)` of one chunk."""
    output, scores = _run_chunk(args, options, compute, grid)
    assert scores is not None  # options.return_scores is set
    return output, scores

"""Attention over a Dask array on a LocalCluster: one luong call per batch chunk, in parallel
worker processes, equal to a single in-process luong call to the bit.

To use a real cluster instead, connect a Client to its scheduler, e.g.
`Client("tcp://scheduler-host:8786")`; the workers need luong installed (`pip install luong`).

    python examples/dask_attention.py
"""

from __future__ import annotations

import dask.array as da  # dask is unannotated, hence the type: ignores below
import numpy as np
from dask.distributed import Client, LocalCluster

import luong
import luong.dask

BATCH, TQ, TV, DIM, CHUNK = 64, 128, 128, 32, 16


def main() -> None:
    rng = np.random.default_rng(0)
    query = rng.standard_normal((BATCH, TQ, DIM), dtype=np.float32)
    value = rng.standard_normal((BATCH, TV, DIM), dtype=np.float32)
    value_mask = rng.random((BATCH, TV)) > 0.1

    # batch chunks of 16 examples; luong.dask keeps them and makes (Tq, D) / (Tv, D) whole
    q = da.from_array(query, chunks=(CHUNK, TQ, DIM))  # type: ignore[no-untyped-call]
    out = luong.dask.attention(
        q, value, value_mask=value_mask, scale=1.0 / np.sqrt(DIM), use_causal_mask=True
    )
    assert isinstance(out, da.Array)  # one array: no scores asked for
    print(f"lazy output {out.shape}, {out.numblocks[0]} chunks of {CHUNK}, dtype {out.dtype}")

    with LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, Client(cluster) as client:  # type: ignore[no-untyped-call]
        print(f"cluster: {len(client.scheduler_info()['workers'])} worker processes")
        result = out.compute()  # type: ignore[no-untyped-call]

    expected = luong.attention(
        query, value, value_mask=value_mask, scale=1.0 / np.sqrt(DIM), use_causal_mask=True
    )
    print(f"result {result.shape}; equal to one in-process luong call: "
          f"{np.array_equal(result, expected)}")
    assert np.array_equal(result, expected)


if __name__ == "__main__":  # worker processes import this file; only the parent runs main()
    main()

"""Hashes of luong's results, bit for bit, to show that a change moved no bit.

    python scripts/bits.py --out before.json      # on the old build
    python scripts/bits.py --out after.json       # on the new build
    python scripts/bits.py --compare before.json after.json

For every kernel family this CPU has (`LUONG_ISA` = amx, avx512, avx2, scalar; a family the CPU
lacks is skipped, since luong would run another one under its name), 1 and 2 threads, and
float32, float64, float16 and bfloat16, it runs a set of shapes and options (dot and concat,
masks, causal, dropout, returned weights, N-D batch dims, decoding, long keys, a non-finite key)
and hashes the outputs, the returned weights and the gradients (`attention_vjp`). Each family
and thread count runs in a process of its own, since `LUONG_ISA` is read once. The tests compare
within tolerances; this compares bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from typing import Any

FAMILIES = ("amx", "avx512", "avx2", "scalar")
DTYPES = ("float32", "float64", "float16", "bfloat16")

# (name, query shape, Tv, Dv, options); the query shape's last dim is D.
CASES: list[tuple[str, tuple[int, ...], int, int, dict[str, Any]]] = [
    ("tiny", (1, 1, 1), 1, 1, {}),
    ("small", (2, 3, 4), 5, 4, {"scale": 0.5}),
    ("odd", (2, 17, 8), 33, 12, {"scale": 0.3, "value_mask": True, "use_causal_mask": True}),
    ("dot", (4, 192, 64), 192, 64, {"scale": 0.125}),
    ("weights", (4, 192, 64), 192, 64, {"scale": 0.125, "return_attention_scores": True}),
    ("masked", (2, 64, 32), 96, 32, {"value_mask": True, "query_mask": True}),
    ("full mask", (2, 40, 24), 70, 16, {"full_mask": True, "use_causal_mask": True}),
    ("dropout", (2, 64, 32), 64, 32, {"dropout": 0.25, "training": True, "seed": 7,
                                      "return_attention_scores": True}),
    ("concat", (2, 24, 16), 40, 16, {"score_mode": "concat", "scale": 0.7,
                                      "value_mask": True, "return_attention_scores": True}),
    ("4-D", (2, 3, 16, 8), 20, 8, {"scale": 0.4, "use_causal_mask": True}),
    ("decode", (8, 1, 64), 4096, 64, {"scale": 0.125}),
    ("long keys", (1, 64, 64), 2048, 64, {"scale": 0.125}),
    ("inf key", (2, 64, 64), 128, 64, {"scale": 0.125, "inf_key": True}),
]


def digest(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        import numpy as np

        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def child() -> dict[str, str]:
    import numpy as np

    import luong
    from luong._run import compute_dtype

    out: dict[str, str] = {}
    for name, qshape, tv, dv, opts in CASES:
        opts = dict(opts)
        rng = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
        batch, tq, d = qshape[:-2], qshape[-2], qshape[-1]
        q = rng.standard_normal(qshape)
        k = rng.standard_normal((*batch, tv, d))
        v = rng.standard_normal((*batch, tv, dv))
        if opts.pop("inf_key", False):
            k[0, 3, 5] = np.inf
        masks: dict[str, Any] = {}
        if opts.pop("value_mask", False):
            masks["value_mask"] = rng.random((*batch, tv)) > 0.3
        if opts.pop("full_mask", False):
            masks["value_mask"] = rng.random((*batch, tq, tv)) > 0.3
        if opts.pop("query_mask", False):
            masks["query_mask"] = rng.random((*batch, tq)) > 0.2
        d_out = rng.standard_normal((*batch, tq, dv))
        for dtype in DTYPES:
            dt = compute_dtype(dtype)
            args = [x.astype(dt) for x in (q, v, k)]
            res = luong.attention(*args, **masks, **opts, dtype=dtype)
            out_, weights = res if isinstance(res, tuple) else (res, None)
            out[f"{name} {dtype} forward"] = digest(out_, weights)
            if opts.get("return_attention_scores") or name == "inf key":
                continue  # the backward takes no returned weights; non-finite gradients vary
            _, backward = luong.attention_vjp(*args, **masks, **opts, dtype=dtype)
            grads = backward(d_out.astype(dt))
            out[f"{name} {dtype} gradients"] = digest(*(grads[g] for g in sorted(grads)))
    return out


def families() -> list[str]:
    """The families this CPU has: `LUONG_ISA=x` runs x only where `kernel_isa()` then says x."""
    have = []
    for isa in FAMILIES:
        env = {**os.environ, "LUONG_ISA": isa}
        said = subprocess.run(
            [sys.executable, "-c", "import luong; print(luong.kernel_isa())"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()
        if said == isa:
            have.append(isa)
    return have


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", help="write the hashes to this JSON file")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two JSON files")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        json.dump(child(), sys.stdout)
        return 0
    if args.compare:
        a, b = (json.load(open(p, encoding="utf-8")) for p in args.compare)
        differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
        only = sorted(a.keys() ^ b.keys())
        for k in differ:
            print(f"differs: {k}")
        for k in only:
            print(f"in one file only: {k}")
        print(f"{len(a.keys() & b.keys())} results in both, {len(differ)} differ, "
              f"{len(only)} in one only")
        return 1 if differ or only else 0
    hashes: dict[str, str] = {}
    for isa in families():
        for threads in (1, 2):
            env = {**os.environ, "LUONG_ISA": isa, "LUONG_NUM_THREADS": str(threads)}
            done = subprocess.run(
                [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
            )
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                return done.returncode
            for k, h in json.loads(done.stdout).items():
                hashes[f"{isa} {threads}t {k}"] = h
            total = hashlib.sha256(
                "".join(h for k, h in sorted(hashes.items()) if k.startswith(f"{isa} {threads}t"))
                .encode()
            ).hexdigest()[:16]
            print(f"{isa:>7} {threads} thread(s): {total}")
    print(f"{len(hashes)} results")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(hashes, f, indent=0, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

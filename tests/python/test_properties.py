"""Property tests (hypothesis): luong against the float64 NumPy reference over random shapes and
options, and the invariants attention must keep whatever the inputs."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import luong
from luong.reference import reference_attention

EPS32 = float(np.finfo(np.float32).eps)


@st.composite
def problems(draw: st.DrawFn) -> dict:
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    tq, tv, d, dv = (draw(st.integers(1, 24)) for _ in range(4))
    with_key = draw(st.booleans())
    dv = dv if with_key else d
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mag = draw(st.sampled_from([0.1, 1.0, 3.0]))
    p = {
        "query": (rng.standard_normal(lead + (tq, d)) * mag).astype(np.float32),
        "value": rng.standard_normal(lead + (tv, dv)).astype(np.float32),
        "key": (rng.standard_normal(lead + (tv, d)) * mag).astype(np.float32) if with_key else None,
        "score_mode": draw(st.sampled_from(["dot", "concat"])),
        "scale": draw(st.sampled_from([None, 0.5, 1.7])),
        "use_causal_mask": draw(st.booleans()),
        "value_mask": (rng.random(lead + (tv,)) < 0.7) if draw(st.booleans()) else None,
        "query_mask": (rng.random(lead + (tq,)) < 0.8) if draw(st.booleans()) else None,
    }
    return p


def _kwargs(p: dict) -> dict:
    return {k: p[k] for k in ("score_mode", "scale", "use_causal_mask", "value_mask", "query_mask")}


@settings(max_examples=150, deadline=None)
@given(problems())
def test_matches_float64_reference(p: dict) -> None:
    q, v, k = p["query"], p["value"], p["key"]
    out, w = luong.attention(q, v, k, return_attention_scores=True, **_kwargs(p))
    ref_out, ref_w = reference_attention(
        p["query"], p["value"], p["key"], dtype=np.float64, **_kwargs(p)
    )
    # Fully masked rows follow Keras's float32 rounding of s - 1e9, which float64 does not share.
    # A bound on the scores' magnitude (their float32 rounding is about eps times it).
    d = q.shape[-1]
    kk = k if k is not None else v
    if p["score_mode"] == "dot":
        s_bound = np.abs(q).max() * np.abs(kk).max() * d * (p["scale"] or 1.0)
    else:
        s_bound = float(d)  # |Σ tanh| <= D, concat weight 1
    rows_ok = np.ones(w.shape[:-1], bool)
    if p["value_mask"] is not None or p["use_causal_mask"]:
        full = np.broadcast_to(
            p["value_mask"][..., None, :] if p["value_mask"] is not None else True, w.shape
        )
        if p["use_causal_mask"]:
            full = full & np.tril(np.ones(w.shape[-2:], bool))
        rows_ok = full.any(-1)
    tol = 16 * EPS32 * (1 + s_bound)
    np.testing.assert_allclose(w[rows_ok], ref_w[rows_ok], atol=tol, rtol=tol)
    vmax = float(np.abs(p["value"]).max())
    np.testing.assert_allclose(out[rows_ok], ref_out[rows_ok], atol=tol * vmax, rtol=tol)


@settings(max_examples=100, deadline=None)
@given(problems())
def test_invariants(p: dict) -> None:
    q, v, k = p["query"], p["value"], p["key"]
    kw = _kwargs(p)
    out, w = luong.attention(q, v, k, return_attention_scores=True, **kw)
    # Rows of the weights sum to 1 without dropout.
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    # Masked keys get weight 0 unless the whole row is masked.
    if p["value_mask"] is not None:
        visible = np.broadcast_to(p["value_mask"][..., None, :], w.shape)
        if p["use_causal_mask"]:
            visible = visible & np.tril(np.ones(w.shape[-2:], bool))
        partly = visible.any(-1, keepdims=True) & ~visible
        assert np.all(w[np.broadcast_to(partly, w.shape)] == 0)
    # Each output row lies in the convex hull of the value rows: per feature, between min and max.
    keep = np.ones(out.shape[:-1], bool) if p["query_mask"] is None else np.broadcast_to(
        p["query_mask"], out.shape[:-1]
    )
    vb = np.broadcast_to(v, out.shape[:-2] + v.shape[-2:])
    lo, hi = vb.min(-2, keepdims=True), vb.max(-2, keepdims=True)
    span = 1e-5 * (1 + np.abs(vb).max())
    inside = (out >= lo - span) & (out <= hi + span)
    assert inside[keep].all()
    assert (out[~keep] == 0).all()


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 2**32 - 1))
def test_permuting_keys_and_values_together_keeps_the_output(p: dict, seed: int) -> None:
    if p["use_causal_mask"]:
        p["use_causal_mask"] = False  # causal ties keys to positions
    q, v, k = p["query"], p["value"], p["key"]
    perm = np.random.default_rng(seed).permutation(v.shape[-2])
    k2 = None if k is None else k[..., perm, :]
    vm = p["value_mask"]
    kw = {**_kwargs(p), "value_mask": None if vm is None else vm[..., perm]}
    out = luong.attention(q, v, k, **_kwargs(p))
    out2 = luong.attention(q, v[..., perm, :], k2, **kw)
    np.testing.assert_allclose(out2, out, atol=1e-5 * (1 + np.abs(v).max()), rtol=1e-5)

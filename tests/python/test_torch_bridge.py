"""luong.torch: the autograd Function, the functional form and the nn.Module.

- gradcheck (float64) for every differentiable input, both score modes, masks, causal,
  broadcast batch dims and dropout with a fixed seed;
- forward and gradients equal `luong.attention` / `luong.attention_vjp` to the bit (the same
  kernel on the same memory), also for strided and expanded (stride-0) tensors;
- equal to `torch.nn.functional.scaled_dot_product_attention` in float64 where that applies (dot
  scores, boolean masks, no fully masked rows), within the parity tests' tolerance rule;
- the Module's Parameters get gradients and an optimiser step moves them; dropout follows
  `train()` / `eval()` and draws luong.Attention's masks;
- float16 and bfloat16 tensors give luong's half-precision results and gradients, bit for bit;
- clear errors for non-CPU tensors, unsupported dtypes and mixed dtypes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# PyTorch is optional (a large download CI leaves out): without it these tests skip.
torch = pytest.importorskip("torch")

from attention_cases import assert_close, tolerance_for  # noqa: E402
from vjp_cases import gradient_atol, gradient_sizes  # noqa: E402

import luong  # noqa: E402
import luong.torch as lt  # noqa: E402

F64 = torch.float64


def _tensors(
    shapes: dict[str, tuple[int, ...]], dtype: Any = F64, seed: int = 0
) -> dict[str, Any]:
    """Random leaf tensors that require grad, one per name."""
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for n, s in shapes.items()
    }


def _value_mask(shape: tuple[int, ...], seed: int = 1) -> Any:
    """A random bool mask whose first key is always kept, so no row is fully masked (causal rows
    see key 0): finite differences are meaningless across Keras's `- 1e9` bias."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) > 0.4
    mask[..., 0] = True
    return mask


GRADCHECK_CASES = [
    # (id, score_mode, with key, causal, query/value batch shapes, masks)
    ("dot-key-causal-masks", "dot", True, True, ((2,), (2,)), True),
    ("dot-nokey-broadcast", "dot", False, False, ((3, 1), (2,)), False),
    ("concat-key-masks", "concat", True, False, ((2,), (1,)), True),
    ("concat-nokey-causal", "concat", False, True, ((), ()), False),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_float64(case: tuple[Any, ...], dropout: float) -> None:
    _, mode, with_key, causal, (qb, vb), masked = case
    t = _tensors(
        {"query": (*qb, 3, 4), "value": (*vb, 5, 4 if not with_key else 2), "key": (*vb, 5, 4)}
    )
    scale = torch.tensor(0.7, dtype=F64, requires_grad=True)
    weight = torch.tensor(1.3, dtype=F64, requires_grad=True)
    query_mask = torch.tensor([True, False, True]) if masked else None
    value_mask = _value_mask((*vb, 5)) if masked else None

    def f(q: Any, v: Any, k: Any, s: Any, w: Any) -> Any:
        return lt.attention(
            q, v, k if with_key else None, query_mask=query_mask, value_mask=value_mask,
            score_mode=mode, scale=s, concat_score_weight=w, use_causal_mask=causal,
            dropout=dropout, seed=7, training=True,
        )

    inputs = (t["query"], t["value"], t["key"], scale, weight)
    assert torch.autograd.gradcheck(f, inputs)
    # gradcheck would pass for a function that ignores an input; each one must matter here
    grads = torch.autograd.grad(f(*inputs).sum(), inputs, allow_unused=True)
    expected_used = [True, True, with_key, True, mode == "concat"]
    assert [g is not None and bool(g.abs().sum() > 0) for g in grads] == expected_used


def _numpy(t: Any) -> np.ndarray:
    return np.asarray(t.detach().numpy())


def _single(out: lt.Output) -> Any:
    """The output tensor of a call that returns no scores (narrows the return type)."""
    assert not isinstance(out, tuple)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["dot", "concat"])
def test_forward_and_gradients_equal_luong_bit_for_bit(dtype: Any, mode: str) -> None:
    t = _tensors({"query": (2, 3, 6, 4), "value": (3, 7, 5), "key": (2, 1, 7, 4)}, dtype)
    value_mask = _value_mask((3, 7))
    query_mask = np.array([1, 0, 1, 1, 1, 0])  # numbers: non-zero keeps
    kwargs: dict[str, Any] = dict(
        query_mask=query_mask, value_mask=value_mask, score_mode=mode, use_causal_mask=True
    )
    scale, weight = 0.37, 1.7
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    w = torch.tensor(weight, dtype=dtype, requires_grad=True)
    out, scores = lt.attention(
        t["query"], t["value"], t["key"], scale=s, concat_score_weight=w,
        return_attention_scores=True, **kwargs,
    )
    arrays = [_numpy(t[n]) for n in ("query", "value", "key")]
    np_kwargs = {**kwargs, "value_mask": value_mask.numpy(), "scale": scale,
                 "concat_score_weight": weight, "dtype": arrays[0].dtype}
    ref_out, ref_scores = luong.attention(*arrays, return_attention_scores=True, **np_kwargs)
    np.testing.assert_array_equal(_numpy(out), ref_out, strict=True)
    np.testing.assert_array_equal(_numpy(scores), ref_scores, strict=True)
    assert not scores.requires_grad, "the returned scores are not differentiable"

    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    leaves = [t["query"], t["value"], t["key"], s, w]
    grads = torch.autograd.grad(out, leaves, grad_outputs=d_out, allow_unused=True)
    _, backward = luong.attention_vjp(*arrays, **np_kwargs)
    expected = backward(d_out.numpy())
    names = ["query", "value", "key", "scale", "concat_score_weight"]
    assert set(expected) == {n for n in names if n != "concat_score_weight" or mode == "concat"}
    for name, g in zip(names, grads):
        if name not in expected:
            assert g is None, f"{name}: a gradient in dot mode"
            continue
        assert g.dtype == dtype and g.shape == leaves[names.index(name)].shape, name
        np.testing.assert_array_equal(_numpy(g), expected[name], strict=True, err_msg=name)


def test_strided_and_expanded_tensors_give_the_same_bits() -> None:
    # Views reach the kernel without copies; their strides must not change the result.
    base = _tensors({"query": (4, 2, 6), "value": (2, 5, 3), "key": (1, 5, 3)})
    q = base["query"].transpose(0, 1)[..., ::2]  # (2, 4, 3), non-contiguous
    v = base["value"]
    k = base["key"].expand(2, 5, 3)  # stride 0 on the batch axis
    assert not q.is_contiguous() and k.stride(0) == 0
    out = _single(lt.attention(q, v, k, scale=0.5))
    contiguous = [x.detach().contiguous() for x in (q, v, k)]
    ref = lt.attention(*contiguous, scale=0.5)
    np.testing.assert_array_equal(_numpy(out), _numpy(ref), strict=True)
    # out.sum() sends an expanded (stride-0) gradient into the backward
    grads = torch.autograd.grad(out.sum(), [base["query"], base["key"]])
    _, backward = luong.attention_vjp(*(x.numpy() for x in contiguous), scale=0.5, dtype="float64")
    expected = backward(np.ones(out.shape))
    d_query = torch.zeros(4, 2, 6, dtype=F64)
    d_query.transpose(0, 1)[..., ::2] = torch.from_numpy(expected["query"])
    np.testing.assert_array_equal(_numpy(grads[0]), d_query.numpy(), strict=True)
    np.testing.assert_array_equal(
        _numpy(grads[1]), expected["key"].sum(0, keepdims=True), strict=True
    )


# ---------------------------------------------------------------------------------------------
# against PyTorch's own attention


def _sdpa_masks(b: int, tq: int, tv: int, causal: bool, masked: bool) -> tuple[Any, Any]:
    """(luong's value mask or None, SDPA's boolean attn_mask or None) for the same rule."""
    value_mask = _value_mask((b, tv), seed=5) if masked else None
    if value_mask is None:
        return None, None
    attn = value_mask[:, None, :].expand(b, tq, tv)
    if causal:
        attn = attn & torch.ones(tq, tv, dtype=torch.bool).tril()
    return value_mask, attn


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 5, 8, 6), (2, 7, 11, 16, 3), (2, 9, 4, 4, 5)])
def test_matches_torch_scaled_dot_product_attention_in_float64(
    shape: tuple[int, ...], masked: bool, causal: bool
) -> None:
    b, tq, tv, d, dv = shape
    t = _tensors({"query": (b, tq, d), "value": (b, tv, dv), "key": (b, tv, d)}, seed=11)
    scale = 1.0 / d**0.5
    value_mask, attn_mask = _sdpa_masks(b, tq, tv, causal, masked)
    out = _single(lt.attention(
        t["query"], t["value"], t["key"], value_mask=value_mask, scale=scale,
        use_causal_mask=causal,
    ))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        t["query"], t["key"], t["value"], attn_mask=attn_mask,
        is_causal=causal and attn_mask is None, scale=scale,
    )
    q, v, k = (_numpy(t[n]) for n in ("query", "value", "key"))
    _, output_atol = tolerance_for(q, v, k, "dot", scale, dtype="float64")
    assert_close(f"{shape} output vs SDPA", _numpy(out), _numpy(sdpa), output_atol)

    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    leaves = [t["query"], t["value"], t["key"]]
    ours = torch.autograd.grad(out, leaves, grad_outputs=d_out)
    theirs = torch.autograd.grad(sdpa, leaves, grad_outputs=d_out)
    p = {"query": q, "value": v, "key": k, "scale": np.asarray(scale)}
    sizes = gradient_sizes(
        p, d_out.numpy(), value_mask=None if value_mask is None else value_mask.numpy(),
        use_causal_mask=causal,
    )
    for name, g_ours, g_theirs in zip(("query", "value", "key"), ours, theirs):
        atol = gradient_atol(sizes[name], np.float64)
        assert_close(f"{shape} d{name} vs SDPA", _numpy(g_ours), _numpy(g_theirs), atol)


# ---------------------------------------------------------------------------------------------
# the nn.Module


def test_module_parameters_get_gradients_and_an_optimiser_step_moves_them() -> None:
    torch.manual_seed(0)
    layer = lt.Attention(use_scale=True, score_mode="concat", dtype=F64)
    assert dict(layer.named_parameters()).keys() == {"scale", "concat_score_weight"}
    assert [p.item() for p in layer.parameters()] == [1.0, 1.0]
    proj = torch.nn.Linear(4, 4, dtype=F64)
    optimiser = torch.optim.SGD([*layer.parameters(), *proj.parameters()], lr=0.1)
    t = _tensors({"query": (2, 3, 4), "value": (2, 5, 4)})
    target = torch.randn(2, 3, 4, dtype=F64)
    before = [p.item() for p in layer.parameters()]
    losses = []
    for _ in range(5):
        optimiser.zero_grad()
        loss = ((layer(proj(t["query"]), t["value"]) - target) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.shape == () and p.grad.item() != 0.0, name
        optimiser.step()
    for (name, p), old in zip(layer.named_parameters(), before):
        assert p.item() != old, f"{name} did not move"
    assert losses[-1] < losses[0], losses


def test_module_equals_luong_attention_with_the_same_weights() -> None:
    layer = lt.Attention(use_scale=True, score_mode="dot", dtype=torch.float32)
    assert layer.scale is not None
    with torch.no_grad():
        layer.scale.fill_(0.37)
    reference = luong.Attention(use_scale=True)
    reference.set_weights([np.float32(0.37)])
    t = _tensors({"query": (2, 3, 4), "value": (2, 5, 6), "key": (2, 5, 4)}, torch.float32)
    value_mask = _value_mask((2, 5))
    out, scores = layer(
        t["query"], t["value"], t["key"], value_mask=value_mask, return_attention_scores=True,
        use_causal_mask=True,
    )
    ref_out, ref_scores = reference(
        [_numpy(t[n]) for n in ("query", "value", "key")], mask=[None, value_mask.numpy()],
        return_attention_scores=True, use_causal_mask=True,
    )
    np.testing.assert_array_equal(_numpy(out), ref_out, strict=True)
    np.testing.assert_array_equal(_numpy(scores), ref_scores, strict=True)


def test_module_dropout_follows_train_and_eval_and_luongs_masks() -> None:
    t = _tensors({"query": (3, 6, 4), "value": (3, 9, 4)})
    q, v = t["query"], t["value"]
    layer = lt.Attention(dropout=0.3, seed=1234, dtype=F64)
    assert layer.training, "a fresh nn.Module is in training mode"
    first = layer(q, v)
    second = layer(q, v)
    assert not torch.equal(first, second), "each training call draws new masks"
    reference = luong.Attention(dropout=0.3, seed=1234, dtype="float64")
    arrays = [_numpy(q), _numpy(v)]
    np.testing.assert_array_equal(_numpy(first), reference(arrays, training=True), strict=True)
    np.testing.assert_array_equal(_numpy(second), reference(arrays, training=True), strict=True)
    layer.eval()
    np.testing.assert_array_equal(
        _numpy(layer(q, v)), luong.attention(*arrays, dtype="float64"), strict=True
    )
    # seed=None draws the seed from torch's generator: torch.manual_seed repeats a run
    torch.manual_seed(5)
    a = lt.Attention(dropout=0.5)(q, v)
    torch.manual_seed(5)
    b = lt.Attention(dropout=0.5)(q, v)
    torch.manual_seed(6)
    c = lt.Attention(dropout=0.5)(q, v)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_masks_take_no_gradient_and_there_is_no_double_backward() -> None:
    t = _tensors({"query": (2, 3, 4), "value": (2, 5, 4)})
    value_mask = torch.ones(2, 5, dtype=F64, requires_grad=True)  # numbers: non-zero keeps
    out = _single(lt.attention(t["query"], t["value"], value_mask=value_mask))
    out.sum().backward()
    assert value_mask.grad is None
    assert t["query"].grad is not None and t["value"].grad is not None
    out = _single(lt.attention(t["query"], t["value"]))
    d_out = torch.ones(out.shape, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(out, [t["query"]], grad_outputs=d_out, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


# ---------------------------------------------------------------------------------------------
# errors


def test_non_cpu_tensors_are_a_type_error() -> None:
    # the meta device stands in for CUDA (no GPU needed): anything but the CPU is refused
    q = torch.empty(2, 3, 4, device="meta")
    v = torch.empty(2, 5, 4)
    with pytest.raises(TypeError, match=r"`query` is on meta.*\.cpu\(\)"):
        lt.attention(q, v)
    with pytest.raises(TypeError, match="`value_mask` is on meta"):
        lt.attention(v[:, :3], v, value_mask=torch.ones(2, 5, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("bad", [torch.float8_e4m3fn, torch.int32, torch.complex64])
def test_unsupported_dtypes_are_a_type_error(bad: Any) -> None:
    q = torch.ones(2, 3, 4, dtype=bad)
    v = torch.ones(2, 5, 4)
    with pytest.raises(TypeError, match=rf"`query` must be float32, float64, float16 or.*{bad}"):
        lt.attention(q, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["dot", "concat"])
def test_half_precision_equals_luong_on_the_same_half_arrays(dtype: Any, mode: str) -> None:
    """float16 and bfloat16 tensors: the output, the returned scores and every gradient are
    `luong.attention` / `luong.attention_vjp` on the same half-precision arrays, bit for bit, in
    the tensors' dtype; a strided (transposed) query gives the same bits."""
    import ml_dtypes  # of the test extra: bfloat16's NumPy dtype
    t = _tensors({"query": (2, 6, 4), "value": (2, 7, 5), "key": (2, 7, 4)}, torch.float32)
    t = {n: x.detach().to(dtype).requires_grad_() for n, x in t.items()}
    np_dtype = np.dtype(np.float16) if dtype == torch.float16 else np.dtype(ml_dtypes.bfloat16)

    def as_np(x: Any) -> np.ndarray:
        return x.detach().float().numpy().astype(np_dtype)  # exact: widening then narrowing

    value_mask = _value_mask((2, 7))
    kwargs: dict[str, Any] = dict(value_mask=value_mask, score_mode=mode, use_causal_mask=True)
    out, scores = lt.attention(
        t["query"], t["value"], t["key"], scale=0.5, return_attention_scores=True, **kwargs
    )
    assert out.dtype == dtype and scores.dtype == dtype
    arrays = [as_np(t[n]) for n in ("query", "value", "key")]
    np_kwargs = {**kwargs, "value_mask": value_mask.numpy(), "scale": 0.5, "dtype": np_dtype}
    ref_out, ref_scores = luong.attention(*arrays, return_attention_scores=True, **np_kwargs)
    np.testing.assert_array_equal(as_np(out), ref_out, strict=True)
    np.testing.assert_array_equal(as_np(scores), ref_scores, strict=True)

    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    leaves = [t["query"], t["value"], t["key"]]
    grads = torch.autograd.grad(out, leaves, grad_outputs=d_out)
    _, backward = luong.attention_vjp(*arrays, **np_kwargs)
    expected = backward(as_np(d_out))
    for name, g in zip(["query", "value", "key"], grads):
        assert g.dtype == dtype and g.shape == t[name].shape, name
        np.testing.assert_array_equal(as_np(g), expected[name], strict=True, err_msg=name)
    assert any(np.any(as_np(g) != 0) for g in grads), "the gradients are not all zero"

    strided = t["query"].detach().transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    again = lt.attention(strided, t["value"], t["key"], scale=0.5, **kwargs)
    np.testing.assert_array_equal(as_np(again), ref_out, strict=True)


def test_mixed_dtypes_and_non_tensors_are_a_type_error() -> None:
    q = torch.ones(2, 3, 4, dtype=torch.float32)
    with pytest.raises(TypeError, match="same dtype; `value` is torch.float64"):
        lt.attention(q, torch.ones(2, 5, 4, dtype=F64))
    with pytest.raises(TypeError, match="`value` must be a torch.Tensor; got ndarray"):
        lt.attention(q, np.ones((2, 5, 4), np.float32))  # type: ignore[arg-type]  # under test


def test_shape_errors_are_luongs_value_errors() -> None:
    q, v, k = torch.ones(2, 3, 4), torch.ones(2, 5, 6), torch.ones(2, 5, 3)
    with pytest.raises(ValueError, match=r"`key` shape \(2, 5, 3\).*`query` shape \(2, 3, 4\)"):
        lt.attention(q, v, k)
    with pytest.raises(ValueError, match="one element"):
        lt.attention(q, v, torch.ones(2, 5, 4), scale=torch.ones(2))
    with pytest.raises(ValueError, match="score_mode"):
        lt.Attention(score_mode="additive")


def test_import_luong_imports_no_framework() -> None:
    package_root = str(Path(luong.__file__).resolve().parents[1])
    paths = (package_root, os.environ.get("PYTHONPATH"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    code = (
        "import sys, luong; "
        "print(sorted(m for m in ('torch', 'dask', 'matplotlib', 'jax') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def _torch_runs_openmp() -> bool:
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _attention_and_gradients() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A call big enough to run in parallel (4, 256, 256, 64), causal, with its gradients."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((4, 256, 64), dtype=np.float32) for _ in range(3))
    out, backward = luong.attention_vjp(q, v, k, use_causal_mask=True)
    return out, backward(rng.standard_normal(out.shape, dtype=np.float32))


def test_calls_join_torchs_openmp_team_and_give_the_bits_of_one_thread() -> None:
    # PyTorch's pip wheels compute on OpenMP (libgomp on Linux) and load it globally; a call made
    # after a torch op then runs on torch's team, whose workers are still spinning.
    assert luong.parallel_backend() == ("openmp" if _torch_runs_openmp() else "luong")
    threads = luong.get_num_threads()
    a = torch.randn(512, 512)
    try:
        luong.set_num_threads(1)
        out1, grads1 = _attention_and_gradients()
        luong.set_num_threads(2)
        (a @ a).sum()
        out2, grads2 = _attention_and_gradients()
    finally:
        luong.set_num_threads(threads)
    assert np.array_equal(out1, out2)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        assert np.array_equal(grads1[name], grads2[name]), name


def test_torch_held_to_one_thread_keeps_luong_on_its_own_pool() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert luong.parallel_backend() == "luong"
    finally:
        torch.set_num_threads(before)
    assert luong.parallel_backend() == ("openmp" if _torch_runs_openmp() else "luong")


def test_a_process_forked_after_torch_ran_computes_on_luongs_pool_instead_of_hanging() -> None:
    # GNU OpenMP's team does not survive fork: in the child, torch's own next parallel op waits
    # forever for the parent's workers. luong, imported before the fork, keeps to its pool there.
    package_root = str(Path(luong.__file__).resolve().parents[1])
    paths = (package_root, str(Path(__file__).parent), os.environ.get("PYTHONPATH"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    code = """
import os, sys, numpy as np, torch, luong
from test_torch_bridge import _attention_and_gradients
luong.set_num_threads(2)
a = torch.randn(512, 512)
for _ in range(5):
    (a @ a).sum()
out, grads = _attention_and_gradients()
pid = os.fork()
if pid == 0:
    ok = luong.parallel_backend() == "luong"
    out_child, grads_child = _attention_and_gradients()
    ok = ok and np.array_equal(out, out_child)
    ok = ok and all(np.array_equal(grads[n], grads_child[n]) for n in grads)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "0", result.stdout + result.stderr

"""`luong.jax.attention`: luong's kernel as a JAX function, under `jit`, `grad` and `vmap`.

The forward and the backward are luong's own Rust kernels, reached through `jax.pure_callback`
(the arrays go to the host, no copy on CPU) and tied together with `jax.custom_vjp`, so
`jax.grad` gets exactly `luong.attention_vjp`'s gradients:

    import jax, jax.numpy as jnp, luong.jax

    def loss(query, value, scale):
        return jnp.sum(luong.jax.attention(query, value, scale=scale) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(query, value, 0.5)

Differentiable: query, value, key, `scale` and `concat_score_weight` (Python floats or JAX
scalars). Not differentiable: the masks (bool, or numbers where non-zero keeps) and the returned
attention scores (they come out through `stop_gradient`; luong's backward takes the output's
cotangent only).

`vmap`: the forward takes the mapped axis as one more leading batch dim (luong broadcasts leading
dims NumPy-style), in one kernel call; it loops per example only when the mapped `scale`,
`concat_score_weight` or `call` differ between examples, or under dropout. The backward loops
per example (`vmap_method="sequential"`), so each example gets its own gradients, also of `scale`.

dtypes: the inputs' common float dtype, when luong computes in it (float32; float16 and bfloat16,
computed in float32 and rounded once, their backward rerunning the forward; float64 needs JAX's
x64 mode set globally, `jax.config.update("jax_enable_x64", True)`: the thread-local
`jax.enable_x64()` context does not reach the thread XLA may run callbacks on, and JAX then
rejects the float64 results).

This module imports JAX; `import luong` alone does not.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import _core, _run

__all__ = ["attention"]

Shape = tuple[int, ...]
# (query, value, key, scale, concat_score_weight): the differentiable operands.
Primals = tuple[jax.Array, jax.Array, Optional[jax.Array], Optional[jax.Array], Optional[jax.Array]]
# (query_mask, value_mask, call): the operands without gradients.
Extras = tuple[Optional[jax.Array], Optional[jax.Array], jax.Array]
Host = Optional[np.ndarray]


@dataclass(frozen=True)
class _Plan:
    """What is fixed when a call is traced: luong's options (minus the operands `scale`,
    `concat_score_weight` and `call`), the compute dtype and the unbatched shapes.

    The shapes let the host side tell `vmap`'s added leading dims from the user's own.
    """

    options: _run.Options  # with scale, concat_score_weight and call at their defaults
    dtype: str
    query: Shape
    value: Shape
    key: Shape | None
    query_mask: Shape | None
    value_mask: Shape | None
    output: Shape
    scores: Shape
    stats: Shape  # forward_saved's row statistics, (..., Tq, 2)

    @property
    def dropout(self) -> float:
        return self.options.dropout

    def results(self, saved: bool) -> tuple[Shape, ...]:
        """The forward's result shapes: `(output, stats)` when saving for the backward, else
        `(output,)` or `(output, scores)`."""
        if saved:
            return (self.output, self.stats)
        return (self.output, self.scores) if self.options.return_scores else (self.output,)

    def kernel_options(self, scale: Host, weight: Host, call: Host) -> dict[str, Any]:
        """luong's options for one kernel call, with the scalars read from the host."""
        return self.options.replace(
            scale=None if scale is None else float(scale.reshape(-1)[0]),
            concat_score_weight=1.0 if weight is None else float(weight.reshape(-1)[0]),
            call=0 if call is None else int(call.reshape(-1)[0]) % (1 << 64),
        ).to_core()


def _host(x: Any) -> Host:
    return None if x is None else np.asarray(x)


def _lead(a: np.ndarray, n: int) -> Shape:
    return tuple(a.shape[:n])


def _uniform(a: Host) -> bool:
    """Whether a (mapped) scalar operand holds one value for every example."""
    return a is None or a.size <= 1 or bool(np.all(a == a.reshape(-1)[0]))


def _forward_host(
    plan: _Plan,
    saved: bool,
    q: Any,
    v: Any,
    k: Any,
    qm: Any,
    vm: Any,
    scale: Any,
    weight: Any,
    call: Any,
) -> tuple[np.ndarray, ...]:
    """The forward on the host: `plan.results(saved)`.

    Under `vmap` (expand_dims) each operand has `n` extra leading dims, of size 1 where it is
    not mapped; they become leading batch dims of one kernel call, or, when an example's scalars
    or dropout masks must be its own, one call per example.
    """
    arrays = [_host(x) for x in (q, v, k, qm, vm, scale, weight, call)]
    qa = arrays[0]
    assert qa is not None
    n = qa.ndim - len(plan.query)
    if n == 0:
        return _forward_once(plan, saved, *arrays)
    lead = np.broadcast_shapes(*(_lead(a, n) for a in arrays if a is not None))
    if plan.dropout > 0 or not all(_uniform(a) for a in arrays[5:]):
        # Per example, as `vmap_method="sequential"` would call: the backward (which loops per
        # example) then draws the very same dropout masks.
        per_example = [
            _forward_once(
                plan, saved, *(None if a is None else _example(a, n, lead, i) for a in arrays)
            )
            for i in np.ndindex(*lead)
        ]
        return tuple(
            np.stack(parts).reshape(*lead, *shape)
            for parts, shape in zip(zip(*per_example), plan.results(saved))
        )
    # One call: the mapped dims lead, then the user's batch dims, padded to one rank (so that
    # broadcasting aligns them as in an unbatched call); the query carries the full mapped shape
    # so that masks mapped alone still broadcast into the batch.
    batch_rank = max(len(plan.query), len(plan.value), len(plan.key or ())) - 2
    full_mask = plan.value_mask is not None and len(plan.value_mask) == batch_rank + 2
    ranks = [batch_rank + 2] * 3 + [batch_rank + 1, batch_rank + (2 if full_mask else 1)]
    padded = [
        None if a is None else a.reshape(*_lead(a, n), *(1,) * (r - (a.ndim - n)), *a.shape[n:])
        for a, r in zip(arrays[:5], ranks)
    ]
    pq = padded[0]
    assert pq is not None
    padded[0] = np.broadcast_to(pq, (*lead, *pq.shape[n:]))
    results = _forward_once(plan, saved, *padded, *arrays[5:])
    return tuple(r.reshape(*lead, *shape) for r, shape in zip(results, plan.results(saved)))


def _example(a: np.ndarray, n: int, lead: Shape, index: tuple[int, ...]) -> np.ndarray:
    """Example `index` of an operand with `n` mapped leading dims (size 1 where not mapped)."""
    sliced: np.ndarray = np.broadcast_to(a, (*lead, *a.shape[n:]))[index]
    return sliced


def _forward_once(
    plan: _Plan,
    saved: bool,
    q: Host,
    v: Host,
    k: Host,
    qm: Host,
    vm: Host,
    scale: Host,
    weight: Host,
    call: Host,
) -> tuple[np.ndarray, ...]:
    assert q is not None and v is not None
    options = plan.kernel_options(scale, weight, call)
    if saved:
        # the row statistics let the backward skip rerunning the forward
        return _core.forward_saved(q, v, k, qm, vm, {**options, "return_scores": False})
    output, scores = _core.attention(q, v, k, qm, vm, options)
    return (output,) if scores is None else (output, scores)


def _backward_host(
    plan: _Plan,
    q: Any,
    v: Any,
    k: Any,
    qm: Any,
    vm: Any,
    scale: Any,
    weight: Any,
    call: Any,
    saved: tuple[Any, Any] | None,
    d_out: Any,
) -> tuple[np.ndarray | None, ...]:
    """`(d query, d value, d key, d scale, d concat_score_weight)`, None where not an operand.

    `saved`: the forward's `(output, stats)` (None when it returned scores instead: then the
    kernel reruns the forward). Never sees mapped dims: the backward is `vmap`-ed sequentially.
    """
    qa, va, ka, qma, vma, sa, wa, ca, da = (
        _host(x) for x in (q, v, k, qm, vm, scale, weight, call, d_out)
    )
    assert qa is not None and va is not None and da is not None
    options = {**plan.kernel_options(sa, wa, ca), "return_scores": False}
    kept = None if saved is None else (np.asarray(saved[0]), np.asarray(saved[1]))
    dq, dk, dv, d_scale, d_weight = _core.backward(qa, va, ka, qma, vma, da, options, saved=kept)
    dtype = np.dtype(plan.dtype)
    return (
        dq,
        dv,
        None if ka is None else dk,
        None if sa is None else np.asarray(d_scale, dtype=dtype),
        None if wa is None else np.asarray(0.0 if d_weight is None else d_weight, dtype=dtype),
    )


def _spec(shape: Shape | None, dtype: str) -> jax.ShapeDtypeStruct | None:
    if shape is None:
        return None
    # jax.ShapeDtypeStruct.__init__ has no annotations in jax's inline types
    return jax.ShapeDtypeStruct(shape, np.dtype(dtype))  # type: ignore[no-untyped-call]


def _run_forward(
    plan: _Plan, primals: Primals, extras: Extras, saved: bool = False
) -> tuple[jax.Array, ...]:
    q, v, k, scale, weight = primals
    qm, vm, call = extras
    result: tuple[jax.Array, ...] = jax.pure_callback(
        functools.partial(_forward_host, plan, saved),
        tuple(_spec(shape, plan.dtype) for shape in plan.results(saved)),
        q,
        v,
        k,
        qm,
        vm,
        scale,
        weight,
        call,
        vmap_method="expand_dims",
    )
    return result


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: _Plan, primals: Primals, extras: Extras) -> tuple[jax.Array, ...]:
    return _run_forward(plan, primals, extras)


Saved = Optional[tuple[jax.Array, jax.Array]]
Residuals = tuple[Primals, Extras, Saved]


def _attention_fwd(
    plan: _Plan, primals: Primals, extras: Extras
) -> tuple[tuple[jax.Array, ...], Residuals]:
    # forward_saved returns no scores, and half precision keeps no statistics (its backward
    # reruns the forward in float32, as luong.attention_vjp's does).
    if plan.options.return_scores or plan.dtype in _run.HALF:
        return _run_forward(plan, primals, extras), (primals, extras, None)
    output, stats = _run_forward(plan, primals, extras, saved=True)
    return (output,), (primals, extras, (output, stats))


def _attention_bwd(
    plan: _Plan, residuals: Residuals, cotangents: tuple[jax.Array, ...]
) -> tuple[tuple[jax.Array | None, ...], tuple[None, None, None]]:
    (q, v, k, scale, weight), (qm, vm, call), saved = residuals
    # cotangents[1], of the returned scores, is zero: `attention` stops their gradient.
    d_out = cotangents[0]
    shapes = (
        plan.query,
        plan.value,
        plan.key,
        () if scale is not None else None,
        () if weight is not None else None,
    )
    grads: tuple[jax.Array | None, ...] = jax.pure_callback(
        functools.partial(_backward_host, plan),
        tuple(_spec(s, plan.dtype) for s in shapes),
        q,
        v,
        k,
        qm,
        vm,
        scale,
        weight,
        call,
        saved,
        d_out,
        vmap_method="sequential",
    )
    return grads, (None, None, None)  # masks and the call index have no gradient


_attention.defvjp(_attention_fwd, _attention_bwd)


def _compute_dtype(*arrays: Any) -> str:
    """The inputs' common float dtype (float32 for integer and bool inputs, as Keras), if luong
    computes in it; luong's ValueError otherwise, TypeError for non-real inputs (raised while
    tracing)."""
    dtype = jnp.result_type(*(a for a in arrays if a is not None))
    if jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_:
        dtype = jnp.dtype(jnp.float32)
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"query, value and key must hold real numbers; their common dtype is {dtype}"
        )
    return _run.compute_dtype(np.dtype(dtype).name).name


def _check_shapes(
    query: Shape,
    value: Shape,
    key: Shape | None,
    query_mask: Shape | None,
    value_mask: Shape | None,
) -> Shape:
    """The batch shape, after luong's shape rules (src/shape.rs, through `_core.check_shapes`),
    checked while tracing: a mistake raises ValueError here, not a runtime error from inside the
    callback."""
    return tuple(_core.check_shapes(query, value, key, query_mask, value_mask))


def _as_mask(mask: Any) -> jax.Array | None:
    if mask is None:
        return None
    m = jnp.asarray(mask)
    return m if m.dtype == jnp.bool_ else m != 0


def _scalar(x: Any, arg: str, dtype: str) -> jax.Array:
    a = jnp.asarray(x, dtype=dtype)
    if a.shape != ():
        raise ValueError(f"`{arg}` must be a scalar; got shape {a.shape}")
    return a


def attention(
    query: Any,
    value: Any,
    key: Any = None,
    *,
    query_mask: Any = None,
    value_mask: Any = None,
    score_mode: str = "dot",
    scale: Any = None,
    concat_score_weight: Any = 1.0,
    dropout: float = 0.0,
    seed: int | None = None,
    call: Any = 0,
    training: bool = False,
    use_causal_mask: bool = False,
    return_attention_scores: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`luong.attention` on JAX arrays, differentiable and traceable (`jit`, `grad`, `vmap`).

    Same shapes, masks, semantics and numbers as `luong.attention` (the same kernels run):
    query `(..., Tq, D)`, value `(..., Tv, Dv)`, key `(..., Tv, D)` (default: the value),
    query_mask `(..., Tq)`, value_mask `(..., Tv)` or `(..., Tq, Tv)`; output `(..., Tq, Dv)`
    and, with `return_attention_scores`, the weights `(..., Tq, Tv)`.

    Args:
        query, value, key: arrays; computed in their common float dtype (float32 for integer
            inputs) when luong supports it, else ValueError.
        query_mask, value_mask: bool or numeric (non-zero keeps); not differentiable.
        score_mode: "dot" or "concat" (static).
        scale: None (no scaling, Keras's `use_scale=False`) or a scalar, differentiable.
        concat_score_weight: a scalar, differentiable (used in concat mode only).
        dropout: rate in [0, 1), applied when `training` (static).
        seed: a Python int, required when dropout applies (static): JAX programs need explicit
            randomness, so no seed is drawn for you.
        call: the dropout call index, an int or an integer JAX scalar (may be traced). Masks are
            a pure function of (seed, call, position), so the same `seed` and `call` give the
            same masks and the backward recomputes exactly the forward's; advance `call` (for
            example with the training step) for fresh masks. Under `vmap` every example draws
            its masks as an unmapped call with its `call` would.
        training: apply dropout (static).
        use_causal_mask: query row i attends to keys j <= i (static).
        return_attention_scores: also return the weights; they are not differentiable.

    Raises:
        ValueError: while tracing, for luong's and Keras's rules: score_mode, dropout, a
            missing seed, a dtype luong does not compute in, shapes that do not fit (naming
            both), a non-scalar `scale` or `concat_score_weight`, a non-integer `call`.
        TypeError: non-real (e.g. complex) inputs.
    """
    options = _run.Options.of(
        score_mode=score_mode,
        dropout=dropout,
        seed=0 if seed is None else seed,
        training=training,
        use_causal_mask=use_causal_mask,
        return_attention_scores=return_attention_scores,
    )
    if options.dropout > 0 and seed is None:
        raise ValueError(
            "luong.jax.attention needs an integer `seed` when dropout applies (training=True "
            "and dropout > 0); JAX functions draw no hidden randomness."
        )
    dtype = _compute_dtype(query, value, key)
    q = jnp.asarray(query, dtype=dtype)
    v = jnp.asarray(value, dtype=dtype)
    k = None if key is None else jnp.asarray(key, dtype=dtype)
    s = None if scale is None else _scalar(scale, "scale", dtype)
    w = (
        _scalar(concat_score_weight, "concat_score_weight", dtype)
        if score_mode == "concat"
        else None
    )
    qm, vm = _as_mask(query_mask), _as_mask(value_mask)
    c = jnp.asarray(call)
    if c.shape != () or not jnp.issubdtype(c.dtype, jnp.integer):
        raise ValueError(f"`call` must be an integer scalar; got {c.dtype}{list(c.shape)}")
    batch = _check_shapes(
        q.shape,
        v.shape,
        None if k is None else k.shape,
        None if qm is None else qm.shape,
        None if vm is None else vm.shape,
    )
    plan = _Plan(
        options=options,
        dtype=dtype,
        query=tuple(q.shape),
        value=tuple(v.shape),
        key=None if k is None else tuple(k.shape),
        query_mask=None if qm is None else tuple(qm.shape),
        value_mask=None if vm is None else tuple(vm.shape),
        output=(*batch, q.shape[-2], v.shape[-1]),
        scores=(*batch, q.shape[-2], v.shape[-2]),
        stats=(*batch, q.shape[-2], 2),
    )
    result = _attention(plan, (q, v, k, s, w), (qm, vm, c))
    if return_attention_scores:
        return result[0], jax.lax.stop_gradient(result[1])
    return result[0]

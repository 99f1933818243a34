"""PyTorch bridge: luong's forward and backward as a `torch.autograd.Function`, on CPU tensors.

    import torch, luong.torch
    layer = luong.torch.Attention(use_scale=True)          # an nn.Module; `scale` is a Parameter
    out = layer(query, value, key, value_mask=mask)        # (..., Tq, D), (..., Tv, Dv) tensors
    out.sum().backward()                                   # grads for query, key, value, scale

Shapes, masks and numbers are those of `luong.attention` (Keras's `Attention`): query
`(..., Tq, D)`, value `(..., Tv, Dv)`, key `(..., Tv, D)` (value when None); query_mask
`(..., Tq)`, value_mask `(..., Tv)` or `(..., Tq, Tv)`; output `(..., Tq, Dv)`.

No copies at the boundary: a CPU tensor of float32, float64, float16 or bfloat16 is handed to the
Rust kernel as a NumPy view of its memory (`tensor.detach().numpy()`, any strides; bfloat16 as
`ml_dtypes.bfloat16`, which needs the `ml_dtypes` package), and the kernel's output arrays come
back with `torch.from_numpy`, sharing memory. The dtype is the inputs' dtype (they must agree, as
`torch.matmul` requires); half precision computes in float32 and rounds each result once, as
`luong.attention` does, and its backward reruns the forward. Gradients flow to query, value, key,
`scale` and `concat_score_weight`; masks are not differentiable, nor are the returned attention
scores (the kernel's backward takes only the output's gradient), and there is no double backward.

Importing this module imports torch; `import luong` alone does not.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "luong.torch needs PyTorch: `pip install torch` (or `pip install luong[torch]`)"
    ) from e
from torch.autograd.function import once_differentiable

from . import _core, _run

__all__ = ["Attention", "attention", "AttentionFunction"]

Tensor = torch.Tensor
Output = Union[Tensor, tuple[Tensor, Tensor]]

# The dtypes the kernel takes (bfloat16's NumPy dtype comes from ml_dtypes, looked up when used).
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)


def _check_cpu(t: Tensor, arg: str) -> None:
    """TypeError unless `t` is a dense CPU tensor (the kernel reads host memory directly)."""
    if t.device.type != "cpu":
        raise TypeError(
            f"luong.torch computes on the CPU, but `{arg}` is on {t.device}; move it with "
            f"`.cpu()` (and the result back with `.to({str(t.device)!r})`)"
        )
    if t.layout != torch.strided:
        raise TypeError(f"`{arg}` must be a dense (strided) tensor; got layout {t.layout}")


def _view(t: Tensor, arg: str) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory, without a copy (any strides, also 0); bfloat16,
    which NumPy lacks, through its bits as `ml_dtypes.bfloat16`."""
    _check_cpu(t, arg)
    # resolve_conj / resolve_neg are no-ops (no copy) unless a lazy conj/neg bit is set.
    t = t.detach().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        bits: np.ndarray = t.view(torch.int16).numpy()
        return bits.view(_run._np_dtype("bfloat16"))
    return t.numpy()


def _tensor(a: np.ndarray) -> Tensor:
    """A kernel result as a tensor sharing its memory (bfloat16 through its bits)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _input(t: Any, arg: str, dtype: torch.dtype | None) -> Tensor:
    """Checks a query/value/key tensor: CPU, float32, float64, float16 or bfloat16, the same
    dtype as the others."""
    if not isinstance(t, Tensor):
        raise TypeError(f"`{arg}` must be a torch.Tensor; got {type(t).__name__}")
    _check_cpu(t, arg)
    if t.dtype not in _DTYPES:
        raise TypeError(
            f"`{arg}` must be float32, float64, float16 or bfloat16 for luong; got {t.dtype} of "
            f"shape {tuple(t.shape)} (convert it with `.float()` or `.double()`)"
        )
    if dtype is not None and t.dtype != dtype:
        raise TypeError(
            f"query, value and key must have the same dtype; `{arg}` is {t.dtype}, "
            f"query is {dtype}"
        )
    return t


def _mask(m: Any, arg: str) -> Tensor | None:
    """A mask as a CPU tensor (bool or numbers, non-zero keeps); NumPy input is shared, not
    copied. Masks take no gradient."""
    if m is None:
        return None
    t = m if isinstance(m, Tensor) else torch.as_tensor(np.asarray(m))
    _check_cpu(t, arg)
    return t.detach()


def _scalar(x: Any, arg: str, dtype: torch.dtype) -> Tensor:
    """A scalar weight as a one-element tensor (a float becomes a constant 0-d tensor)."""
    t = x if isinstance(x, Tensor) else torch.tensor(float(x), dtype=dtype)
    if t.numel() != 1:
        raise ValueError(f"`{arg}` must be a scalar (one element); got shape {tuple(t.shape)}")
    _check_cpu(t, arg)
    return t


def _torch_seed() -> int:
    """A dropout seed drawn from torch's global generator, so `torch.manual_seed` makes runs
    repeatable (luong.Attention would draw one from the OS instead)."""
    draw = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
    return int(draw.item()) % (1 << 64)


class AttentionFunction(torch.autograd.Function):
    """luong's kernel as an autograd Function: `apply(query, value, key, scale,
    concat_score_weight, query_mask, value_mask, options)`, returning `(output, scores)`
    (scores is an empty tensor unless `options["return_scores"]`).

    `key` and `scale` may be None; `concat_score_weight` is a one-element tensor; the masks are
    bool tensors or None; `options` is the kernel's options dict (see luong/_run.py), whose
    "scale" and "concat_score_weight" entries are filled from the tensors on every call. The
    backward uses the forward's options, so under dropout it uses the forward's masks.
    """

    @staticmethod
    def forward(
        ctx: Any,  # a FunctionCtx; its stubs reject None in save_for_backward, which torch allows
        query: Tensor,
        value: Tensor,
        key: Tensor | None,
        scale: Tensor | None,
        concat_score_weight: Tensor,
        query_mask: Tensor | None,
        value_mask: Tensor | None,
        options: dict[str, Any],
    ) -> tuple[Tensor, Tensor]:
        opts = {
            **options,
            "scale": None if scale is None else float(scale.detach().item()),
            "concat_score_weight": float(concat_score_weight.detach().item()),
        }
        arrays = _arrays(query, value, key, query_mask, value_mask)
        # When a gradient may be asked for, the forward keeps each row's softmax statistics so
        # the backward need not rerun it (with returned scores it reruns: rarely trained on; and
        # half precision reruns it in float32, as `luong.attention_vjp` does).
        keep = (
            any(ctx.needs_input_grad[:5])
            and not opts["return_scores"]
            and query.dtype not in _HALF
        )
        stats_t: Tensor | None = None
        if keep:
            output, stats = _core.forward_saved(*arrays, opts)
            scores, stats_t = None, torch.from_numpy(stats)
        else:
            output, scores = _core.attention(*arrays, opts)
        output_t = _tensor(output)
        # The output is saved as a tensor so torch notices if it is modified in place.
        ctx.save_for_backward(
            query, value, key, scale, concat_score_weight, query_mask, value_mask,
            output_t if keep else None, stats_t,
        )
        ctx.options = {**opts, "return_scores": False}
        scores_t = _tensor(scores) if scores is not None else query.new_empty(0)
        ctx.mark_non_differentiable(scores_t)
        return output_t, scores_t

    @staticmethod
    @once_differentiable  # a clear error on double backward (the kernel's isn't differentiable)
    def backward(ctx: Any, d_output: Tensor, _d_scores: Tensor) -> tuple[Tensor | None, ...]:
        query, value, key, scale, weight, query_mask, value_mask, out, stats = ctx.saved_tensors
        arrays = _arrays(query, value, key, query_mask, value_mask)
        d = _run.as_input(_view(d_output, "d_output"), "d_output", arrays[0].dtype)
        saved = None if stats is None else (_view(out, "output"), _view(stats, "stats"))
        dq, dk, dv, d_scale, d_weight = _core.backward(*arrays, d, ctx.options, saved=saved)
        need = ctx.needs_input_grad

        def scalar_grad(g: float | None, like: Tensor | None, needed: bool) -> Tensor | None:
            if g is None or like is None or not needed:
                return None
            return torch.tensor(g, dtype=like.dtype).reshape(like.shape)

        return (
            _tensor(dq) if need[0] else None,
            _tensor(dv) if need[1] else None,
            _tensor(dk) if need[2] and dk is not None else None,
            scalar_grad(d_scale, scale, need[3]),
            scalar_grad(d_weight, weight, need[4]),
            None,  # query_mask
            None,  # value_mask
            None,  # options
        )


def _arrays(
    query: Tensor,
    value: Tensor,
    key: Tensor | None,
    query_mask: Tensor | None,
    value_mask: Tensor | None,
) -> _run.Arrays:
    """The kernel's arguments as NumPy views of the tensors (masks as bool, non-zero keeps)."""
    return (
        _view(query, "query"),
        _view(value, "value"),
        None if key is None else _view(key, "key"),
        None if query_mask is None else _run.as_mask(_view(query_mask, "query_mask"), "query_mask"),
        None if value_mask is None else _run.as_mask(_view(value_mask, "value_mask"), "value_mask"),
    )


def _apply(
    query: Any,
    value: Any,
    key: Any,
    scale: Any,
    concat_score_weight: Any,
    query_mask: Any,
    value_mask: Any,
    options: _run.Options,
) -> Output:
    """Checks the tensors and runs the Function; returns output or (output, scores)."""
    q = _input(query, "query", None)
    v = _input(value, "value", q.dtype)
    k = None if key is None else _input(key, "key", q.dtype)
    s = None if scale is None else _scalar(scale, "scale", q.dtype)
    w = _scalar(concat_score_weight, "concat_score_weight", q.dtype)
    qm, vm = _mask(query_mask, "query_mask"), _mask(value_mask, "value_mask")
    output, scores = AttentionFunction.apply(q, v, k, s, w, qm, vm, options.to_core())
    if options.return_scores:
        return output, scores
    return output  # type: ignore[no-any-return]  # Function.apply is typed Any


def attention(
    query: Tensor,
    value: Tensor,
    key: Tensor | None = None,
    *,
    query_mask: Any = None,
    value_mask: Any = None,
    score_mode: str = "dot",
    scale: Tensor | float | None = None,
    concat_score_weight: Tensor | float = 1.0,
    dropout: float = 0.0,
    seed: int | None = None,
    training: bool = False,
    return_attention_scores: bool = False,
    use_causal_mask: bool = False,
) -> Output:
    """`luong.attention` on CPU tensors, differentiable with torch.autograd.

    Args:
        query, value, key: float32, float64, float16 or bfloat16 CPU tensors of one dtype (half
            precision computes in float32, each result rounded once);
            `(..., Tq, D)`, `(..., Tv, Dv)`, `(..., Tv, D)` (key defaults to value).
        query_mask, value_mask: tensors or arrays, bool or numbers (non-zero keeps); not
            differentiable.
        scale: None (no scaling, Keras's `use_scale=False`), a float, or a one-element tensor
            (which receives a gradient when it requires one).
        concat_score_weight: a float or one-element tensor (concat mode; differentiable).
        dropout, seed, training: dropout on the weights when `training`; `seed=None` draws one
            from torch's generator (so `torch.manual_seed` fixes it).
        return_attention_scores: also return the weights `(..., Tq, Tv)` (not differentiable).
        use_causal_mask: query row i attends to keys j <= i only.

    Returns:
        output `(..., Tq, Dv)` tensor, or `(output, scores)`.

    Raises:
        TypeError: a tensor not on the CPU, or of another dtype, or of mixed dtypes.
        ValueError: shapes or settings luong rejects (the messages of `luong.attention`).
    """
    if training and dropout and seed is None:
        seed = _torch_seed()
    options = _run.Options.of(
        score_mode=score_mode, dropout=dropout, seed=seed, training=training,
        use_causal_mask=use_causal_mask, return_attention_scores=return_attention_scores,
    )
    return _apply(query, value, key, scale, concat_score_weight, query_mask, value_mask, options)


class Attention(torch.nn.Module):
    """`keras.layers.Attention` as an `nn.Module`, computed by luong (CPU; float32, float64,
    float16 or bfloat16).

    Args:
        use_scale: create the Parameter `scale` (initialised to 1) that scales the scores.
        score_mode: "dot" or "concat" (creates the Parameter `concat_score_weight`, init 1).
        dropout: fraction of attention weights dropped in `train()` mode, in [0, 1).
        seed: dropout seed; None draws one from torch's generator. As Keras's SeedGenerator,
            each training call draws new masks (a per-module call counter).
        dtype: the Parameters' dtype (default: torch's default dtype). The computation runs in
            the inputs' dtype either way.

    Note that a fresh nn.Module is in training mode: dropout applies until `.eval()`.
    """

    scale: torch.nn.Parameter | None
    concat_score_weight: torch.nn.Parameter | None

    def __init__(
        self,
        use_scale: bool = False,
        score_mode: str = "dot",
        dropout: float = 0.0,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _run.Options(score_mode=score_mode).validate()
        self.use_scale = bool(use_scale)
        self.score_mode = score_mode
        self.dropout = _run.check_dropout(dropout)
        self.seed = seed
        self._seed_key = _run.check_seed(seed) if seed is not None else _torch_seed()
        self._calls = 0

        def one() -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.ones((), dtype=dtype))

        self.register_parameter("scale", one() if self.use_scale else None)
        self.register_parameter(
            "concat_score_weight", one() if score_mode == "concat" else None
        )

    def forward(
        self,
        query: Tensor,
        value: Tensor,
        key: Tensor | None = None,
        *,
        query_mask: Any = None,
        value_mask: Any = None,
        return_attention_scores: bool = False,
        use_causal_mask: bool = False,
    ) -> Output:
        """Attention of `query` over `key`/`value`; arguments and returns as `attention`.
        Dropout applies in training mode (`self.training`)."""
        rate = self.dropout if self.training else 0.0
        call = self._calls
        if rate > 0:
            self._calls += 1  # each training call draws new masks, as Keras's SeedGenerator
        options = _run.Options(
            score_mode=self.score_mode,
            dropout=rate,
            seed=self._seed_key,
            call=call,
            causal=bool(use_causal_mask),
            return_scores=bool(return_attention_scores),
        )
        weight = self.concat_score_weight if self.concat_score_weight is not None else 1.0
        return _apply(query, value, key, self.scale, weight, query_mask, value_mask, options)

    def extra_repr(self) -> str:
        return (
            f"use_scale={self.use_scale}, score_mode={self.score_mode!r}, "
            f"dropout={self.dropout}"
        )

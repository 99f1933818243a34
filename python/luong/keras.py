"""`luong.keras.Attention`: `keras.layers.Attention` (Keras 3) computed by luong.

A subclass of `keras.layers.Attention` that replaces only `call`, so everything else is Keras's
own: the constructor and `get_config`, the weights (`scale`, `concat_score_weight`: scalars made
by `build` with `add_weight`, initialised to ones), `compute_mask`, `compute_output_shape`,
`compute_output_spec` and masking support. A model using it saves to and loads from `.keras`
(the class is registered as `"luong>Attention"`; import `luong.keras` before loading).

What computes:
- numpy backend: luong's kernel on the NumPy arrays (`luong.attention`'s path);
- jax backend: `luong.jax.attention`, so `jit`, `model.fit` and gradients (into `scale`,
  `concat_score_weight` and the layers upstream) run luong's forward and backward kernels;
- torch backend: `luong.torch`'s autograd Function, so `model.fit` and `loss.backward()` run
  luong's kernels too (CPU tensors);
- other backends (tensorflow), or a compute dtype luong does not take (`_luong_dtype`): Keras's
  own `keras.layers.Attention.call`.

Numbers are Keras's up to float32 rounding (see the README's parity notes). Deviations from
Keras, all luong's documented behaviour: value masks with other than one batch dim and full score
masks together with `use_causal_mask` are applied as documented (Keras misaligns them); under
dropout the masks come from luong's counter-based generator, keyed by the layer's `seed` (drawn
once when None) and by the call index the layer's `SeedGenerator` counts, so they differ from
Keras's masks (which differ across Keras's own backends too), while the rate and the inverted
scaling are the same.

`import luong.keras` imports Keras (with the backend `KERAS_BACKEND` names); `import luong` does
not.
"""

from __future__ import annotations

from typing import Any

import keras  # type: ignore[import-untyped]  # Keras ships no type information
import numpy as np

from . import _run

__all__ = ["Attention"]

# The backends on which luong computes; on the others the layer is Keras's own.
LUONG_BACKENDS = ("numpy", "jax", "torch")


def _luong_dtype(name: str) -> np.dtype[Any] | None:
    """luong's compute dtype for a Keras compute dtype name, or None when luong has none."""
    try:
        return _run.compute_dtype(name)
    except ValueError:
        return None


@keras.saving.register_keras_serializable(package="luong")
class Attention(keras.layers.Attention):  # type: ignore[misc]  # Keras's classes are untyped
    """Dot-product attention layer, a.k.a. Luong-style attention: `keras.layers.Attention`
    computed by luong on the numpy, jax and torch backends.

    Args (Keras's):
        use_scale: create a scalar weight `scale` (initialised to 1) that scales the scores.
        score_mode: `"dot"` or `"concat"` (creates the weight `concat_score_weight`).
        dropout: fraction of attention weights dropped when training, in [0, 1).
        seed: integer seed for dropout; None draws one.
        **kwargs: Keras's layer arguments (name, dtype, trainable, ...).

    Call arguments as `keras.layers.Attention`: `inputs=[query, value]` or
    `[query, value, key]`, `mask=[query_mask, value_mask]` (implicit masks, e.g. from
    `Embedding(mask_zero=True)`, arrive here), `training`, `return_attention_scores`,
    `use_causal_mask`.
    """

    def __init__(
        self,
        use_scale: bool = False,
        score_mode: str = "dot",
        dropout: float = 0.0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            use_scale=use_scale, score_mode=score_mode, dropout=dropout, seed=seed, **kwargs
        )
        # luong's dropout key: the seed, or one drawn now (as Keras's SeedGenerator does).
        self._luong_seed = _run.check_seed(seed)

    def call(
        self,
        inputs: list[Any],
        mask: list[Any] | None = None,
        training: bool | None = False,
        return_attention_scores: bool = False,
        use_causal_mask: bool = False,
    ) -> Any:
        """`keras.layers.Attention.call`, computed by luong on the numpy, jax and torch
        backends."""
        backend = keras.backend.backend()
        dtype = _luong_dtype(self.compute_dtype)
        if backend not in LUONG_BACKENDS or dtype is None:
            return super().call(
                inputs,
                mask=mask,
                training=training,
                return_attention_scores=return_attention_scores,
                use_causal_mask=use_causal_mask,
            )
        self._validate_inputs(inputs=inputs, mask=mask)
        query, value = inputs[0], inputs[1]
        key = inputs[2] if len(inputs) > 2 else None
        query_mask = mask[0] if mask else None
        value_mask = mask[1] if mask else None
        rate = self.dropout if training else 0.0
        # The SeedGenerator's state is [seed, calls]; its counter is luong's call index, and
        # next() advances it as Keras's dropout does (a traced variable under jit).
        call = self.seed_generator.next()[1] if rate > 0 else 0
        scale = None if self.scale is None else self.scale.value
        weight = 1.0 if self.concat_score_weight is None else self.concat_score_weight.value

        def cast(x: Any) -> Any:
            """A backend tensor in luong's compute dtype (the jax and torch paths)."""
            return None if x is None else keras.ops.cast(x, dtype.name)

        if backend == "jax":
            from . import jax as luong_jax

            return luong_jax.attention(
                cast(query),
                cast(value),
                cast(key),
                query_mask=query_mask,
                value_mask=value_mask,
                score_mode=self.score_mode,
                scale=scale,
                concat_score_weight=weight,
                dropout=rate,
                seed=self._luong_seed,
                call=call,
                training=rate > 0,
                use_causal_mask=use_causal_mask,
                return_attention_scores=return_attention_scores,
            )
        options = _run.Options.of(
            score_mode=self.score_mode,
            scale=None if scale is None else float(scale),
            concat_score_weight=float(weight),
            dropout=rate,
            seed=self._luong_seed,
            training=rate > 0,
            call=int(call),
            use_causal_mask=use_causal_mask,
            return_attention_scores=return_attention_scores,
        )
        if backend == "torch":
            from . import torch as luong_torch

            # The weights go in as the Variables' tensors, so autograd reaches them; the
            # Function takes their values from the tensors, not from `options`.
            return luong_torch._apply(
                cast(query),
                cast(value),
                cast(key),
                scale,
                weight,
                query_mask,
                value_mask,
                options,
            )
        output, scores = _run.run(
            query, value, key, query_mask, value_mask, dtype=dtype, options=options
        )
        return (output, scores) if return_attention_scores else output

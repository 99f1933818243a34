"""`luong.Attention`: a drop-in for `keras.layers.Attention` (Keras >= 3.15) on NumPy arrays."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

from . import _run

_names = itertools.count()

Array = np.ndarray
Output = Union[Array, tuple[Array, Array]]


class Attention:
    """Dot-product attention layer, a.k.a. Luong-style attention, computed in Rust.

    Takes the same arguments and returns the same numbers as `keras.layers.Attention`:

    1. scores `(..., Tq, Tv)`: `query · keyᵀ` (`× scale` when `use_scale`), or for
       `score_mode="concat"`: `concat_score_weight · Σ tanh(scale · (query + key))`;
    2. masked scores get `1e9` subtracted (value mask, full score mask, causal mask);
    3. softmax over Tv, then dropout when training;
    4. output `(..., Tq, Dv)` = weights · value; rows where the query mask is false are 0.

    Args:
        use_scale: create a scalar weight `scale` (initialised to 1) that scales the scores.
        score_mode: `"dot"` or `"concat"` (creates the weight `concat_score_weight`).
        dropout: fraction of attention weights dropped when `training=True`, in [0, 1).
        seed: integer seed for dropout; None draws one.
        dtype: Keras's dtype policy: `"float32"` (default), `"float64"` (computes in float64
            for real, where Keras silently uses float32), `"float16"` / `"bfloat16"` (inputs
            and results in half precision, computed in float32), `"mixed_float16"` /
            `"mixed_bfloat16"` (the same, with float32 weights).
        name: the layer's name.
        trainable: kept for Keras compatibility (reported by `get_config`).
    """

    supports_masking = True

    def __init__(
        self,
        use_scale: bool = False,
        score_mode: str = "dot",
        dropout: float = 0.0,
        seed: int | None = None,
        dtype: Any = None,
        name: str | None = None,
        trainable: bool = True,
    ) -> None:
        if score_mode not in ["dot", "concat"]:
            raise ValueError(
                "Invalid value for argument score_mode. "
                "Expected one of {'dot', 'concat'}. "
                f"Received: score_mode={score_mode}"
            )
        self.use_scale = bool(use_scale)
        self.score_mode = score_mode
        self.dropout = _run.check_dropout(dropout)
        self.seed = seed
        self._seed_key = _run.check_seed(seed)
        self._calls = 0
        self._policy = _run.policy_name(dtype)
        self._dtype = _run.compute_dtype(dtype)
        self._variable_dtype = _run.variable_dtype(dtype)
        n = next(_names)
        self.name = name if name is not None else ("attention" if n == 0 else f"attention_{n}")
        self.trainable = bool(trainable)
        self.built = True
        one = np.array(1.0, dtype=self._variable_dtype)
        self.scale: Array | None = one.copy() if self.use_scale else None
        self.concat_score_weight: Array | None = (
            one.copy() if score_mode == "concat" else None
        )

    # ----------------------------------------------------------------- weights
    @property
    def dtype(self) -> str:
        """The weights' dtype name (float32 under the mixed policies, else the compute dtype)."""
        return self._variable_dtype.name

    @property
    def dtype_policy(self) -> str:
        """The dtype policy's name, e.g. "float32" or "mixed_float16"."""
        return self._policy

    @property
    def compute_dtype(self) -> str:
        """The dtype calls compute and return in (Keras's name for it)."""
        return self._dtype.name

    @property
    def weights(self) -> list[Array]:
        """The weights in Keras's order: `scale` (when use_scale), `concat_score_weight`."""
        return [w for w in (self.scale, self.concat_score_weight) if w is not None]

    @property
    def trainable_weights(self) -> list[Array]:
        """The weights when the layer is trainable, else an empty list."""
        return self.weights if self.trainable else []

    def get_weights(self) -> list[Array]:
        """Copies of the weights as 0-d arrays, in Keras's order (scale first)."""
        return [w.copy() for w in self.weights]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Sets the weights from a list in Keras's order, e.g. `keras_layer.get_weights()`."""
        names = [n for n in ("scale", "concat_score_weight") if getattr(self, n) is not None]
        if len(weights) != len(names):
            raise ValueError(
                f"You called `set_weights(weights)` on layer '{self.name}' "
                f"with a weight list of length {len(weights)}, but the layer "
                f"was expecting {len(names)} weights."
            )
        for n, w in zip(names, weights):
            a = np.asarray(w)
            if a.shape != ():
                raise ValueError(
                    f"Layer {self.name} weight shape () is not compatible with provided "
                    f"weight shape {a.shape}."
                )
            setattr(self, n, np.array(a, dtype=self._variable_dtype))

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        """Keras's config keys: name, trainable, dtype, use_scale, score_mode, dropout, seed."""
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": self._policy,
            "use_scale": self.use_scale,
            "score_mode": self.score_mode,
            "dropout": self.dropout,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Attention:
        """A layer from `get_config()` output, ours or a Keras layer's."""
        return cls(**config)

    @classmethod
    def from_keras(cls, layer: Any, *, dtype: Any = None) -> Attention:
        """A layer with the config and weights of a `keras.layers.Attention` (or
        `luong.keras.Attention`) instance, on any Keras backend.

        Copies name, trainable, use_scale, score_mode, dropout and seed, and the weights when the
        Keras layer is built (an unbuilt one has none yet: ours keep the initial 1.0, as Keras's
        will). The dtype is the Keras layer's compute dtype unless `dtype` is given (e.g.
        `"float64"` to compute in float64 for real); ValueError when luong does not compute in
        it.
        """
        import keras  # type: ignore[import-untyped]  # already imported: the layer is Keras's

        config = layer.get_config()
        keys = ("name", "trainable", "use_scale", "score_mode", "dropout", "seed")
        ours = cls(
            **{k: config[k] for k in keys if k in config},
            dtype=layer.compute_dtype if dtype is None else dtype,
        )
        if layer.built:
            # Not `layer.get_weights()`: on the numpy backend it trips a NumPy 2
            # DeprecationWarning inside Keras 3.15 (Variable.__array__ without `copy`).
            ours.set_weights([keras.ops.convert_to_numpy(w.value) for w in layer.weights])
        return ours

    # ------------------------------------------------------------------- call
    def __call__(
        self,
        inputs: list[Any],
        mask: list[Any] | None = None,
        training: bool | None = False,
        return_attention_scores: bool = False,
        use_causal_mask: bool = False,
    ) -> Output:
        """Runs attention on `[query, value]` or `[query, value, key]`.

        Args:
            inputs: query `(..., Tq, D)`, value `(..., Tv, Dv)`, optional key `(..., Tv, D)`.
            mask: `[query_mask, value_mask]`; either may be None. query_mask `(..., Tq)`;
                value_mask `(..., Tv)` or a full score mask `(..., Tq, Tv)`. Bool, or numbers
                where non-zero keeps.
            training: apply dropout (when `dropout > 0`).
            return_attention_scores: also return the weights `(..., Tq, Tv)` (after dropout).
            use_causal_mask: query row i attends to keys j <= i only.

        Returns:
            output `(..., Tq, Dv)`, or `(output, scores)`.

        Raises:
            ValueError: Keras's list and mask rules; shapes that don't fit (naming them).
            TypeError: non-numeric inputs.
        """
        self._validate_inputs(inputs, mask)
        key = inputs[2] if len(inputs) > 2 else None
        q_mask = mask[0] if mask else None
        v_mask = mask[1] if mask else None
        options = self._options(training, use_causal_mask, return_attention_scores)
        out, scores = _run.run(
            inputs[0], inputs[1], key, q_mask, v_mask, dtype=self._dtype, options=options
        )
        if return_attention_scores:
            assert scores is not None  # the kernel returns scores when asked
            return out, scores
        return out

    def vjp(
        self,
        inputs: list[Any],
        mask: list[Any] | None = None,
        training: bool | None = False,
        use_causal_mask: bool = False,
    ) -> tuple[Array, _run.Backward]:
        """The output and its vector-Jacobian product, for training.

        Returns `(output, backward)`; `backward(d_output)` gives a dict of gradients of
        `sum(d_output * output)`: "query", "value", "key" (only when a key was passed; otherwise
        the key path is added into "value"), "scale" (when `use_scale`) and
        "concat_score_weight" (when `score_mode="concat"`). With `training=True` and dropout,
        the backward uses exactly the forward's dropout masks.
        """
        self._validate_inputs(inputs, mask)
        key = inputs[2] if len(inputs) > 2 else None
        q_mask = mask[0] if mask else None
        v_mask = mask[1] if mask else None
        arrays = _run.convert(inputs[0], inputs[1], key, q_mask, v_mask, self._dtype)
        options = self._options(training, use_causal_mask, False)
        return _run.vjp(arrays, dtype=self._dtype, options=options)

    def _options(
        self, training: bool | None, use_causal_mask: bool, return_scores: bool
    ) -> _run.Options:
        """The kernel's settings for one call; advances the dropout counter when it applies."""
        dropout = self.dropout if training else 0.0
        call = self._calls
        if dropout > 0:
            self._calls += 1  # each training call draws new masks, as Keras's SeedGenerator
        return _run.Options(
            score_mode=self.score_mode,
            scale=None if self.scale is None else float(self.scale),
            concat_score_weight=(
                1.0 if self.concat_score_weight is None else float(self.concat_score_weight)
            ),
            dropout=dropout,
            seed=self._seed_key,
            call=call,
            causal=bool(use_causal_mask),
            return_scores=bool(return_scores),
        )

    def compute_output_shape(
        self, input_shape: Sequence[Sequence[int | None]]
    ) -> tuple[int | None, ...]:
        """`(*query_shape[:-1], value_shape[-1])`."""
        query_shape, value_shape = input_shape[0], input_shape[1]
        return (*query_shape[:-1], value_shape[-1])

    def compute_mask(self, inputs: list[Any], mask: list[Any] | None = None) -> Array | None:
        """The output mask: the query mask (Keras's rule), or None."""
        self._validate_inputs(inputs, mask)
        if mask is None or mask[0] is None:
            return None
        return np.asarray(mask[0])

    def _validate_inputs(self, inputs: Any, mask: Any = None) -> None:
        """Keras's list rules, with Keras's texts."""
        class_name = self.__class__.__name__
        if not isinstance(inputs, list):
            raise ValueError(
                f"{class_name} layer must be called on a list of inputs, "
                "namely [query, value] or [query, value, key]. "
                f"Received: inputs={inputs}."
            )
        if len(inputs) < 2 or len(inputs) > 3:
            raise ValueError(
                f"{class_name} layer accepts inputs list of length 2 or 3, "
                "namely [query, value] or [query, value, key]. "
                f"Received length: {len(inputs)}."
            )
        if mask is not None:
            if not isinstance(mask, list):
                raise ValueError(
                    f"{class_name} layer mask must be a list, "
                    f"namely [query_mask, value_mask]. Received: mask={mask}."
                )
            if len(mask) < 2 or len(mask) > 3:
                raise ValueError(
                    f"{class_name} layer accepts mask list of length 2 or 3. "
                    f"Received: inputs={inputs}, mask={mask}."
                )

    def __repr__(self) -> str:
        return (
            f"<luong.Attention name={self.name!r} score_mode={self.score_mode!r} "
            f"use_scale={self.use_scale} dropout={self.dropout} dtype={self.dtype!r}>"
        )


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
    """The layer's computation without a layer object.

    `scale=None` means no scaling (Keras's `use_scale=False`); otherwise the scores are
    multiplied by `scale` (dot) or the sum is over `tanh(scale · (q + k))` (concat). Dropout
    applies when `training` and `dropout > 0`, with masks drawn from `seed` (None: a fresh one).
    Shapes, masks, returns and errors as `Attention.__call__`.
    """
    options = _run.Options.of(
        score_mode=score_mode, scale=scale, concat_score_weight=concat_score_weight,
        dropout=dropout, seed=seed, training=training, use_causal_mask=use_causal_mask,
        return_attention_scores=return_attention_scores,
    )
    out, scores = _run.run(
        query, value, key, query_mask, value_mask,
        dtype=_run.compute_dtype(dtype), options=options,
    )
    if return_attention_scores:
        assert scores is not None  # the kernel returns scores when asked
        return out, scores
    return out


def attention_vjp(
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
    use_causal_mask: bool = False,
    dtype: Any = None,
) -> tuple[Array, _run.Backward]:
    """`attention` and its vector-Jacobian product: `(output, backward)`, as `Attention.vjp`.

    Gradient keys: "query", "value", "key" (when a key is passed), "scale" (when `scale` is
    not None), "concat_score_weight" (concat mode).
    """
    options = _run.Options.of(
        score_mode=score_mode, scale=scale, concat_score_weight=concat_score_weight,
        dropout=dropout, seed=seed, training=training, use_causal_mask=use_causal_mask,
    )
    compute = _run.compute_dtype(dtype)
    arrays = _run.convert(query, value, key, query_mask, value_mask, compute)
    return _run.vjp(arrays, dtype=compute, options=options)

"""A Keras model with `luong.keras.Attention`: padded token sequences, `Embedding(mask_zero=True)`,
self-attention, a per-sequence prediction.

The task: predict the mean of each sequence's token ids (padding, id 0, excluded), which needs
the padding mask to reach the attention layer. On the JAX backend the model trains for a few
epochs (luong's forward and backward kernels run under `jit`, and `scale` trains with the rest);
on the numpy backend, which cannot train, it only predicts. Runs in a few seconds:

    python examples/keras_model.py             # JAX backend when JAX is installed
    KERAS_BACKEND=numpy python examples/keras_model.py
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault(
    "KERAS_BACKEND", "jax" if importlib.util.find_spec("jax") is not None else "numpy"
)

import keras  # type: ignore[import-untyped]  # noqa: E402  (backend fixed at first import)
import numpy as np  # noqa: E402

import luong.keras  # noqa: E402

VOCAB, LENGTH, DIM = 20, 12, 16


def make_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids `(n, LENGTH)` with trailing padding (0), and each row's mean id, scaled."""
    tokens = rng.integers(1, VOCAB, (n, LENGTH))
    for row, length in zip(tokens, rng.integers(2, LENGTH + 1, n)):
        row[length:] = 0
    means = np.array([row[row > 0].mean() for row in tokens]) / VOCAB
    return tokens, means[:, None].astype(np.float32)


def build_model() -> keras.Model:
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, DIM, mask_zero=True)(tokens)  # mask: tokens != 0
    x = luong.keras.Attention(use_scale=True, name="attention")([x, x])  # the mask flows in
    x = keras.layers.GlobalAveragePooling1D()(x)  # masked average
    return keras.Model(tokens, keras.layers.Dense(1)(x))


def main() -> None:
    rng = np.random.default_rng(0)
    x, y = make_data(rng, 512)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    print(f"Keras backend: {keras.backend.backend()}")
    if keras.backend.backend() == "jax":
        history = model.fit(x, y, epochs=8, batch_size=64, verbose=0)
        losses = history.history["loss"]
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} epochs")
    scale = float(keras.ops.convert_to_numpy(model.get_layer("attention").scale.value))
    print(f"attention scale: {scale:.4f}")
    print("predictions:", np.round(model.predict(x[:4], verbose=0).ravel(), 3))
    print("targets:    ", np.round(y[:4].ravel(), 3))


if __name__ == "__main__":
    main()

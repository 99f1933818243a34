"""Config and weights copy straight from a Keras layer, and luong's config round-trips."""

from __future__ import annotations

import numpy as np


def test_from_keras_config_and_weights(keras) -> None:
    import luong

    k = keras.layers.Attention(use_scale=True, score_mode="concat", dropout=0.1, seed=3)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 3)).astype(np.float32)
    v = rng.standard_normal((2, 5, 3)).astype(np.float32)
    k.build([q.shape, v.shape])
    k.set_weights([np.float32(0.6), np.float32(1.4)])
    layer = luong.Attention.from_config(k.get_config())
    # What get_weights() returns; called directly it trips a NumPy 2 DeprecationWarning inside
    # Keras 3.15 (Variable.__array__ without a copy keyword), an error under filterwarnings.
    layer.set_weights([np.asarray(w.value) for w in k.weights])
    assert layer.get_config() == {
        "name": "attention" if k.name == "attention" else k.name,
        "trainable": True,
        "dtype": "float32",
        "use_scale": True,
        "score_mode": "concat",
        "dropout": 0.1,
        "seed": 3,
    }
    np.testing.assert_allclose(layer([q, v]), np.asarray(k([q, v])), rtol=1e-5, atol=1e-6)
    again = luong.Attention.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()

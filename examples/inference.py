"""NumPy inference with `luong.Attention`, checked against the plain NumPy reference.

A batch of decoder states attends over encoder outputs (Luong's setting): the query is the
decoder states (B, Tq, D), key and value the encoder outputs (B, Tv, D), with padding masked by a
value mask and a scaled dot score. The same numbers come from `luong.reference`, the readable
NumPy path the Rust kernel is held to.

    python examples/inference.py
"""

from __future__ import annotations

import numpy as np

import luong
from luong.reference import reference_attention

BATCH, DECODER_STEPS, ENCODER_STEPS, DIM = 4, 12, 20, 32


def main() -> None:
    rng = np.random.default_rng(0)
    decoder = rng.standard_normal((BATCH, DECODER_STEPS, DIM), dtype=np.float32)
    encoder = rng.standard_normal((BATCH, ENCODER_STEPS, DIM), dtype=np.float32)
    lengths = np.array([20, 17, 9, 14])  # real source lengths; the rest is padding
    value_mask = np.arange(ENCODER_STEPS) < lengths[:, None]  # (B, Tv)

    layer = luong.Attention(use_scale=True)
    scale = np.float32(1.0 / np.sqrt(DIM))
    layer.set_weights([scale])  # e.g. `keras_layer.get_weights()` from a trained Keras layer
    context, weights = layer(
        [decoder, encoder], mask=[None, value_mask], return_attention_scores=True
    )
    print(f"luong {luong.__version__} on {luong.get_num_threads()} threads")
    print(f"query {decoder.shape} x value {encoder.shape} -> context {context.shape}, "
          f"weights {weights.shape}")
    padding = ~np.broadcast_to(value_mask[:, None, :], weights.shape)
    print(f"largest weight on padding: {float(weights[padding].max()):.1e}")
    print(f"rows sum to 1: max |sum - 1| = {float(np.abs(weights.sum(-1) - 1).max()):.1e}")

    ref_context, ref_weights = reference_attention(
        decoder, encoder, value_mask=value_mask, scale=float(scale), dtype=np.float32
    )
    error = max(float(np.abs(context - ref_context).max()),
                float(np.abs(weights - ref_weights).max()))
    # float32 rounding of a score is about eps * sum |q_d k_d| * scale; 16x leaves room for the
    # different summation orders (the rule `python -m luong` checks with)
    eps = float(np.finfo(np.float32).eps)
    terms = DIM * float(np.abs(decoder).max() * np.abs(encoder).max() * scale)
    tolerance = 16 * eps * (1 + terms) * float(np.abs(encoder).max())
    print(f"max difference from luong.reference: {error:.1e} (tolerance {tolerance:.1e})")
    assert error <= tolerance, (error, tolerance)


if __name__ == "__main__":
    main()

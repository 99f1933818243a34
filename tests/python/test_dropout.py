"""Dropout from Python: statistics within binomial bounds, the mean output preserved, masks the
same for any thread count, and each training call of a layer drawing new masks."""

from __future__ import annotations

import numpy as np

import luong


def _uniform_weights_call(layer: luong.Attention, b: int = 4, tq: int = 64, tv: int = 256):
    # Query zeros: every score is 0, every weight 1/Tv before dropout.
    q = np.zeros((b, tq, 8), np.float32)
    v = np.random.default_rng(3).standard_normal((b, tv, 8)).astype(np.float32)
    return layer([q, v], training=True, return_attention_scores=True), v


def test_kept_fraction_within_binomial_bounds_and_kept_weights_scaled() -> None:
    for rate in (0.1, 0.5, 0.8):
        layer = luong.Attention(dropout=rate, seed=11)
        (_, w), _ = _uniform_weights_call(layer)
        n = w.size
        kept = np.count_nonzero(w) / n
        sd = np.sqrt(rate * (1 - rate) / n)
        assert abs(kept - (1 - rate)) < 5 * sd, (rate, kept)
        # Kept weights are (1/Tv) / keep_prob, computed in float32 as Keras does.
        expect = np.float32(1 / 256) / np.float32(1 - rate)
        np.testing.assert_array_equal(w[w != 0], np.full(np.count_nonzero(w), expect))


def test_mean_output_preserved() -> None:
    layer = luong.Attention(dropout=0.5, seed=5)
    (_, _), v = _uniform_weights_call(layer)
    base = luong.Attention()([np.zeros((4, 64, 8), np.float32), v])
    means = [float(_uniform_weights_call(layer)[0][0].mean()) for _ in range(60)]
    # The spread of one call's mean, estimated from the calls themselves; 5 standard errors.
    se = np.std(means) / np.sqrt(len(means))
    assert abs(np.mean(means) - base.mean()) < 5 * se + 1e-7, (np.mean(means), base.mean(), se)


def test_same_seed_same_masks_and_calls_advance() -> None:
    a, b = luong.Attention(dropout=0.3, seed=9), luong.Attention(dropout=0.3, seed=9)
    (_, wa1), _ = _uniform_weights_call(a)
    (_, wb1), _ = _uniform_weights_call(b)
    (_, wa2), _ = _uniform_weights_call(a)
    np.testing.assert_array_equal(wa1, wb1)
    assert np.count_nonzero((wa1 == 0) != (wa2 == 0)) > 0.3 * wa1.size
    # Inference calls neither drop nor advance the counter.
    c = luong.Attention(dropout=0.3, seed=9)
    q = np.zeros((4, 64, 8), np.float32)
    _, w_inf = c([q, q], return_attention_scores=True)
    assert np.all(w_inf > 0)
    (_, wc1), _ = _uniform_weights_call(c)
    np.testing.assert_array_equal(wc1, wa1)


def test_masks_identical_across_thread_counts() -> None:
    before = luong.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            luong.set_num_threads(threads)
            layer = luong.Attention(dropout=0.4, seed=21)
            (out, w), _ = _uniform_weights_call(layer, b=8, tq=128, tv=300)
            results.append((out, w))
    finally:
        luong.set_num_threads(before)
    for out, w in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(w, results[0][1])

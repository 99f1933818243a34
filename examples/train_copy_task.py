"""Train a tiny retrieval model with luong's gradients and Adam written in NumPy.

The task: each example holds T (key token, value vector) pairs, the key tokens distinct and drawn
from a vocabulary of V symbols, the value vectors random. The queries are the same key tokens in
a shuffled order; for each query the model must output the value stored under that token. It can
only do so by attending to the matching key, so the loss falls only if attention learns to match.

The model: a token embedding E (V, D) shared by queries and keys, a query projection W_q (D, D),
and the layer's `scale`:

    query = E[query_tokens] @ W_q     key = E[key_tokens]     value = the stored vectors
    output = luong.Attention(use_scale=True)([query, value, key])
    loss = mean((output - target)²)

`layer.vjp` gives the gradients with respect to query, key and scale; the chain rule into E and
W_q is a few lines of NumPy (below), and Adam is written out too. Untrained, attention is nearly
uniform and the output is close to the mean of the values (loss ≈ 1 - 1/T); trained, it picks
the matching key. Runs in a second or two on a CPU:

    python examples/train_copy_task.py [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np

import luong

VOCAB = 64  # V: key token symbols
PAIRS = 8  # T: (key, value) pairs per example, also the number of queries
DIM = 8  # D: embedding width (smaller than V: the embeddings cannot all be orthogonal)
VALUE_DIM = 8  # Dv: width of the stored value vectors
BATCH = 32
LEARNING_RATE = 0.01


def make_batch(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(query_tokens (B, T), key_tokens (B, T), values (B, T, Dv), targets (B, T, Dv))`."""
    key_tokens = np.argsort(rng.random((BATCH, VOCAB)), axis=1)[:, :PAIRS]  # distinct per row
    values = rng.standard_normal((BATCH, PAIRS, VALUE_DIM)).astype(np.float32)
    order = np.argsort(rng.random((BATCH, PAIRS)), axis=1)  # which pair each query asks for
    query_tokens = np.take_along_axis(key_tokens, order, axis=1)
    targets = np.take_along_axis(values, order[..., None], axis=1)
    return query_tokens, key_tokens, values, targets


class Adam:
    """Adam (Kingma & Ba) over a dict of parameters, in NumPy."""

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float,
        b1: float = 0.9,
        b2: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m = {k: np.zeros_like(v, dtype=np.float64) for k, v in params.items()}
        self.v = {k: np.zeros_like(v, dtype=np.float64) for k, v in params.items()}
        self.t = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            m_hat = self.m[k] / (1 - self.b1**self.t)
            v_hat = self.v[k] / (1 - self.b2**self.t)
            update = self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
            params[k] = (params[k] - update).astype(params[k].dtype)


def train(steps: int = 300, seed: int = 0, log_every: int = 50) -> list[float]:
    """Trains for `steps` Adam steps on fresh random batches; returns the loss of every step.

    Prints the loss every `log_every` steps (0: never).
    """
    rng = np.random.default_rng(seed)
    params = {
        "embedding": (0.3 * rng.standard_normal((VOCAB, DIM))).astype(np.float32),
        "w_query": (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32),
        "scale": np.array(1.0, np.float32),
    }
    layer = luong.Attention(use_scale=True)
    adam = Adam(params, LEARNING_RATE)
    losses = []
    for step in range(steps):
        query_tokens, key_tokens, values, targets = make_batch(rng)
        layer.set_weights([params["scale"]])

        # forward
        emb = params["embedding"]
        query_emb = emb[query_tokens]  # (B, T, D)
        query = query_emb @ params["w_query"]
        key = emb[key_tokens]
        output, backward = layer.vjp([query, values, key])
        error = output - targets
        losses.append(float(np.mean(error**2)))

        # backward: d loss / d output, then luong's vjp, then the chain rule into E and W_q
        grads = backward(2.0 * error / error.size)
        d_query, d_key = grads["query"], grads["key"]
        d_embedding = np.zeros_like(emb)
        np.add.at(d_embedding, query_tokens, d_query @ params["w_query"].T)
        np.add.at(d_embedding, key_tokens, d_key)
        d_w_query = np.einsum("btd,bte->de", query_emb, d_query)
        adam.step(
            params,
            {"embedding": d_embedding, "w_query": d_w_query, "scale": grads["scale"]},
        )

        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}  scale {float(params['scale']):.3f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train(args.steps, args.seed)

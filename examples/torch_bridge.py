"""A tiny PyTorch model with `luong.torch.Attention`, trained a few hundred Adam steps on CPU.

The task (as examples/train_copy_task.py, there in NumPy): each example stores T (key token,
value vector) pairs; the queries are the same key tokens, shuffled; the model must return the
vector stored under each query's token, which it can only do by attending to the matching key.

    query = Linear(Embedding(query_tokens))    key = Embedding(key_tokens)    value = vectors
    output = luong.torch.Attention(use_scale=True)(query, value, key)

luong computes the attention forward and backward in Rust on the tensors' memory (no copies);
autograd carries the gradients into the embedding, the projection and the layer's `scale`.

    python examples/torch_bridge.py [--steps 300]
"""

from __future__ import annotations

import argparse

import torch

import luong.torch

VOCAB, PAIRS, DIM, BATCH = 64, 8, 16, 32


class Retriever(torch.nn.Module):
    """Embedding shared by queries and keys, a query projection, luong's attention."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.project = torch.nn.Linear(DIM, DIM, bias=False)
        self.attention = luong.torch.Attention(use_scale=True)

    def forward(
        self, query_tokens: torch.Tensor, key_tokens: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        query = self.project(self.embed(query_tokens))
        out = self.attention(query, values, self.embed(key_tokens))
        assert isinstance(out, torch.Tensor)  # no scores asked for
        return out


def batch(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(query tokens, key tokens, values, targets) for BATCH examples."""
    keys = torch.stack([torch.randperm(VOCAB, generator=gen)[:PAIRS] for _ in range(BATCH)])
    values = torch.randn(BATCH, PAIRS, DIM, generator=gen)
    order = torch.stack([torch.randperm(PAIRS, generator=gen) for _ in range(BATCH)])
    queries = torch.gather(keys, 1, order)
    targets = torch.gather(values, 1, order[..., None].expand(-1, -1, DIM))
    return queries, keys, values, targets


def train(steps: int = 300, seed: int = 0) -> list[float]:
    """Trains a fresh model; returns the loss of every step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Retriever()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(steps):
        queries, keys, values, targets = batch(gen)
        loss = torch.nn.functional.mse_loss(model(queries, keys, values), targets)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch's stubs
        optimiser.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    losses = train(args.steps)
    for step in (0, len(losses) // 2, len(losses) - 1):
        print(f"step {step:4d}  loss {losses[step]:.4f}")
    print(f"loss fell {losses[0] / losses[-1]:.0f}x: attention learned to find the matching key")


if __name__ == "__main__":
    main()

"""A small GPT-style decoder (pre-norm blocks, causal self-attention, GELU MLP), sized by a frozen spec.

Every weight is initialised inside its module's constructor, so building the model under
infinity.zero.Init draws the same random numbers in the same order as building it plainly."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GptSpec:
    vocab: int = 512
    context: int = 64
    hidden: int = 128
    layers: int = 2
    heads: int = 4

    @property
    def parameters(self) -> int:
        """Parameter count (embeddings, blocks, final norm, untied head)."""
        h = self.hidden
        block = 4 * h * h + 4 * h + 8 * h * h + 5 * h + 4 * h
        return self.vocab * h + self.context * h + self.layers * block + 2 * h + h * self.vocab


def _linear(i: int, o: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(i, o, bias=bias)
    nn.init.normal_(layer.weight, std=0.02)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class Block(nn.Module):
    def __init__(self, spec: GptSpec):
        super().__init__()
        self.heads = spec.heads
        self.ln1, self.ln2 = nn.LayerNorm(spec.hidden), nn.LayerNorm(spec.hidden)
        self.qkv = _linear(spec.hidden, 3 * spec.hidden)
        self.proj = _linear(spec.hidden, spec.hidden)
        self.up = _linear(spec.hidden, 4 * spec.hidden)
        self.down = _linear(4 * spec.hidden, spec.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=-1)
        q, k, v = (y.view(b, t, self.heads, h // self.heads).transpose(1, 2) for y in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, h))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Gpt(nn.Module):
    def __init__(self, spec: GptSpec = GptSpec()):
        super().__init__()
        self.spec = spec
        self.tokens = nn.Embedding(spec.vocab, spec.hidden)
        self.positions = nn.Embedding(spec.context, spec.hidden)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.layers))
        self.ln = nn.LayerNorm(spec.hidden)
        self.head = _linear(spec.hidden, spec.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or the mean cross-entropy when targets are given."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tokens(tokens) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def synthetic_batches(spec: GptSpec, batch: int, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token sequences with learnable structure (each token mostly follows from the previous), no download."""
    g = torch.Generator().manual_seed(seed)
    rule = torch.randint(0, spec.vocab, (spec.vocab,), generator=g)
    out = []
    for _ in range(steps):
        seq = torch.empty(batch, spec.context + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, spec.vocab, (batch,), generator=g)
        noise = torch.rand(batch, spec.context, generator=g) < 0.1
        random = torch.randint(0, spec.vocab, (batch, spec.context), generator=g)
        for t in range(spec.context):
            seq[:, t + 1] = torch.where(noise[:, t], random[:, t], rule[seq[:, t]])
        out.append((seq[:, :-1], seq[:, 1:]))
    return out

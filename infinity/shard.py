"""Which part of each parameter a rank holds (ZeRO stage 3 across torch.distributed ranks).

[Note: the split]  A parameter of n elements, flattened, is cut into world pieces of
L = ceil(n / world) elements; rank r holds elements [r*L, (r+1)*L), zero-padded past n, so every
rank's piece has the same length and an all-gather of the pieces in rank order, cut to n, is the
parameter.  Small parameters the persistence policy keeps resident are replicated: every rank holds
all n elements and averages their gradients with an all-reduce instead.  One process is world 1:
start 0, length n.

[Note: a leaf]  zero partitions parameters by it and the checkpoint format records it (checkpoint/format.py);
checkpoint sits below zero, so the rule lives below both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """Rank `rank`'s piece of parameter `name` (shape: the whole parameter's)."""

    name: str
    shape: torch.Size
    numel: int  # the whole parameter's elements
    world: int
    rank: int
    start: int  # first element of the flattened parameter this rank holds
    length: int  # elements this rank holds, padding included (the same on every rank)
    replicated: bool  # every rank holds the whole parameter

    @property
    def real(self) -> int:
        """Elements of the piece that are the parameter's (the rest is padding)."""
        return max(0, min(self.length, self.numel - self.start))


def shard_of(name: str, shape: torch.Size, world: int, rank: int, replicated: bool = False) -> Shard:
    numel = int(torch.Size(shape).numel())
    if replicated or world == 1:
        return Shard(name, torch.Size(shape), numel, world, rank, 0, numel, replicated or world > 1)
    length = -(-numel // world)
    return Shard(name, torch.Size(shape), numel, world, rank, rank * length, length, False)

"""The gradients of one optimizer step: each reduced over the ranks as autograd makes it, normed in
float64 chunks and sent to the optimizer; then one norm and one overflow verdict for every rank, and
the coefficient that unscales (fp16) and clips them."""
from __future__ import annotations

import math
from typing import Any

import torch

from infinity.zero.ranks import Ranks
from infinity.shard import Shard
from infinity.zero.step_report import StepClock, Wait

NORM_CHUNK = 1 << 20  # elements


def grad_norm(t: torch.Tensor) -> float:
    """The 2-norm of t, accumulated in float64 chunk by chunk.

    [Note: why in chunks]  torch.linalg.vector_norm(t, dtype=torch.float64) first makes a float64 copy
    of all of t: twice an fp32 gradient's bytes (302 MB for a 4h x h weight at hidden 3072), on top of
    the gradient itself, for every parameter's backward.  A chunk's copy is 8 MB."""
    chunks = t.detach().reshape(-1).split(NORM_CHUNK)
    return math.sqrt(sum(float(torch.linalg.vector_norm(c, dtype=torch.float64)) ** 2 for c in chunks))


class Gradients:
    def __init__(self, shards: list[Shard], ranks: Ranks, optimizer: Any, slices: dict[int, Any], clock: StepClock,
                 device: torch.device):
        self.shards, self.ranks, self.optimizer, self.slices = shards, ranks, optimizer, slices
        self.clock, self.device = clock, device
        self.reset()

    def reset(self) -> None:
        self.sumsq = 0.0  # of this rank's pieces (or, after agree(), of the whole gradient)
        self.replicated_sumsq = 0.0  # of replicated parameters: the same on every rank, counted once
        self.overflow = False

    def take(self, i: int, p: torch.Tensor) -> None:
        """Parameter i's final gradient (p.grad, in the compute dtype) leaves the compute tier."""
        grad = p.grad.detach().float()
        p.grad = None  # the compute-dtype gradient goes before the norm and the write, not after
        if self.ranks.several:
            grad = self._reduce(i, grad)
        norm = grad_norm(grad)
        if not math.isfinite(norm):
            self.overflow = True
        if self.shards[i].replicated:
            self.replicated_sumsq += norm * norm
        else:
            self.sumsq += norm * norm
        with self.clock.waiting(Wait.WRITE):
            self.optimizer.put_grad(self.slices[i], grad)

    def _reduce(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a gradient: this rank's piece of it (reduce-scatter), or all of it for a
        replicated parameter (all-reduce).  In fp32, whatever the compute dtype."""
        shard = self.shards[i]
        what = f"the gradient of {shard.name!r}"
        if shard.replicated:
            self.ranks.all_reduce_mean(grad, what)
            return grad
        whole = grad.reshape(-1)
        padding = shard.length * self.ranks.world - whole.numel()
        if padding:
            whole = torch.nn.functional.pad(whole, (0, padding))
        piece = torch.empty(shard.length, dtype=torch.float32, device=grad.device)
        self.ranks.reduce_scatter_mean(piece, whole.contiguous(), what)
        return piece

    def agree(self) -> bool:
        """Sums every rank's norm of its pieces (for clipping) into one overflow verdict for all ranks;
        returns it (True: skip the step)."""
        if self.ranks.several:
            both = torch.tensor([self.sumsq, float(self.overflow)], dtype=torch.float64, device=self.device)
            self.ranks.all_reduce_sum(both, "the gradient norm")
            self.sumsq, self.overflow = float(both[0]), bool(both[1] > 0)
        self.sumsq += self.replicated_sumsq
        self.overflow = self.overflow or not math.isfinite(self.sumsq)
        return self.overflow

    def coef(self, scale: float, clip: float) -> float:
        """What the gradients are multiplied by: 1/scale (fp16's loss scale), times the clipping factor."""
        coef = 1.0 / scale
        if clip > 0:
            total = math.sqrt(self.sumsq) / scale
            coef *= min(1.0, clip / (total + 1e-6))
        return coef

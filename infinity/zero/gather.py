"""A parameter home that holds only this rank's shard and all-gathers the whole parameter for a use.

The inner home (NVMe, host memory, or the compute tier itself) stores each parameter's shard as a flat
vector of Shard.length elements; the reads it starts ahead are this rank's shards only, so every
rank's drive and host buffers carry 1/world of the bytes.  fetch turns the shard into the whole
parameter with one all-gather on the compute tier.

[Note: collective order]  Every rank must gather the same parameters in the same order.  The
coordinator gathers in module-hook order, which is the model's own order on every rank; reads ahead,
hits and misses are local decisions that start no collective.  Whether a use gathers at all (or
finds the parameter kept from an earlier use) follows from the trace, the budgets and the staging
buffers' accounting, which change only at the coordinator's own calls, never with I/O timing (a read
being done or not only decides hit against late), so it is the same on every rank.  A model whose
control flow differs between ranks (a module skipped on one rank only) would pair different
parameters' all-gathers: keep the control flow the same on every rank.
"""
from __future__ import annotations

import torch

from infinity.memory.record import Record
from infinity.memory.stream import Part
from infinity.swap.params import AfterWrite, ParamHome
from infinity.zero.ranks import Pending, Ranks
from infinity.shard import Shard


def piece_of(values: torch.Tensor, shard: Shard) -> torch.Tensor:
    """This rank's piece of a whole parameter's values, flat, zero-padded to shard.length."""
    flat = values.reshape(-1)
    piece = flat.new_zeros(shard.length)
    piece[: shard.real].copy_(flat[shard.start: shard.start + shard.real])
    return piece


class ShardedHome(ParamHome):
    def __init__(self, inner: ParamHome, shards: dict[int, Shard], ranks: Ranks, dtype: torch.dtype,
                 device: torch.device):
        self.inner, self.shards, self.ranks = inner, shards, ranks
        self.dtype, self.device = dtype, device
        self._ahead: dict[int, tuple[torch.Tensor, torch.Tensor, Pending]] = {}  # all-gathers started, not yet used

    def put(self, index: int, values: torch.Tensor) -> None:
        """The whole parameter's initial values; the inner home keeps this rank's piece."""
        self.inner.put(index, piece_of(values.detach().to(self.dtype), self.shards[index]))  # type: ignore[attr-defined]

    def part(self, index: int) -> Part:
        """This rank's piece where it rests (the inner home holds exactly the piece)."""
        return self.inner.part(index)

    def record(self, index: int) -> Record:
        """The record of this rank's piece ([Note: the two halves move apart] in infinity/memory/record.py)."""
        return self.inner.record(index)

    def fetch(self, index: int) -> torch.Tensor:
        shard = self.shards[index]
        if index not in self._ahead:
            self._start_gather(index)
        whole, _, pending = self._ahead.pop(index)
        try:
            pending.wait()
        finally:
            self.inner.release(index)  # the piece's staging buffer goes back as soon as the whole is built
        return whole[: shard.numel].view(shard.shape)

    def gather_ahead(self, index: int) -> bool:
        """Completes the read of index's piece and starts its all-gather, to run while the module before
        its use computes; fetch(index) waits for it.  A collective: every rank calls it at the same point
        ([Note: gathering ahead] in coordinator.py).  False: one was started already."""
        if index in self._ahead:
            return False
        self._start_gather(index)
        return True

    def _start_gather(self, index: int) -> None:
        """Reads index's piece (waiting for a read started ahead) and starts the all-gather of every rank's."""
        shard = self.shards[index]
        piece = self.inner.fetch(index).reshape(-1).to(self.dtype).contiguous()
        whole = torch.empty(shard.length * self.ranks.world, dtype=self.dtype, device=self.device)
        pending = self.ranks.all_gather_start(whole, piece, f"parameter {shard.name!r}")
        self._ahead[index] = (whole, piece, pending)  # the piece stays referenced until the gather is done

    def release(self, index: int) -> None:
        """The gathered copy is dropped by the coordinator; the piece was released after the gather."""

    def write(self, index: int, values: torch.Tensor, after: AfterWrite = AfterWrite.DROP) -> set[str]:
        return self.inner.write(index, values, after)

    def advance(self, index: int) -> None:
        if index not in self._ahead:
            self.inner.advance(index)  # local: the piece goes on to the device; no collective

    def read_ahead(self, index: int) -> bool:
        return self.inner.read_ahead(index)

    def ready(self, index: int) -> bool:
        ahead = self._ahead.get(index)
        return ahead[2].done() if ahead is not None else self.inner.ready(index)

    def cancel(self, index: int) -> None:
        ahead = self._ahead.pop(index, None)
        if ahead is None:
            self.inner.cancel(index)
            return
        try:
            ahead[2].wait()  # the other ranks take part in it: it completes, and its result is dropped
        finally:
            self.inner.release(index)

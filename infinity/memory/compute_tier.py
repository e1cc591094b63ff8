"""How a host copy becomes the compute tier's copy: lent as it is (CPU), or copied to the device on a side
stream (CUDA), at use or ahead of it.  The memory manager holds one ComputeTier and calls it; nothing here moves NVMe bytes or changes a
partition's state (the manager does both).

[Note: lending a staging buffer to the compute tier (CPU)]
When the compute tier is host memory, copying a parameter from its staging buffer into a fresh tensor is
work the resident step does not have (about 6 ms a step for the default GPT on 2 cores).  Instead the
buffer itself can be the compute copy until the parameter is released.  Two costs follow, each handled:
- a lent buffer is out of the pool for longer (from the module's start to its release, not just until
  the copy).  A module that misses must still find a buffer: reads ahead can be given up, lent buffers
  cannot.  So at most pool.buffer_count - reserve buffers are lent at once, where reserve is the most
  offloaded partitions one module gathers (Engine sets it); past that to_compute copies as before.
  A partition kept on the compute tier beyond its use gets a copy of its own (`MemoryManager.keep`),
  so that it does not hold a buffer all the while.
- a tensor outside may still view the buffer when it is released (an op that saved the weight itself
  for backward).  The manager then replaces the pool's buffer (BufferPool.replace) instead of lending
  the memory again under that tensor: the old memory lives as long as the view, as a copy would.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from infinity import metrics
from infinity.memory.policy import ComputeCopy, CopyAhead
from infinity.memory.pool import BufferPool

if TYPE_CHECKING:
    from infinity.memory.entry import Entry
    from infinity.memory.report import TierLedger

log = logging.getLogger("infinity.memory")


@dataclass
class Lending:
    """How many buffers of each pool may be lent to the compute tier, and how many are."""

    limits: dict[int, int] = field(default_factory=dict)  # id(pool) -> most lent at once
    lent: dict[int, int] = field(default_factory=dict)

    def allow(self, pool: BufferPool, reserve: int) -> None:
        self.limits[id(pool)] = max(0, pool.buffer_count - reserve)

    def take(self, pool: BufferPool) -> bool:
        """Lends one more buffer of pool if its limit allows."""
        n = self.lent.get(id(pool), 0)
        if n >= self.limits.get(id(pool), 0):
            return False
        self.lent[id(pool)] = n + 1
        return True

    def give_back(self, pool: BufferPool) -> None:
        self.lent[id(pool)] -= 1


@dataclass
class Arriving:
    """A host-to-device copy issued ahead of use on the side stream: the values, and the event after it."""

    values: torch.Tensor
    copied: torch.cuda.Event


class DeviceCopies:
    """Host-to-device copies on one side stream of the manager's own.

    [Note: the side stream, and what waits for what]
    The copy runs on the side stream, so it does not queue behind the compute stream's work, and the
    caller waits for the copy alone (its host buffer goes back to the pool at once), not for every
    kernel queued before it.  The compute stream waits on the copy's event before it reads the values.
    The copy is allocated on the side stream and used on the compute stream: record_stream keeps the
    caching allocator from handing its memory to the next copy while kernels queued on the compute
    stream still read it (tests/gpu/test_manager_cuda.py).  A copy issued ahead (`start`) is the same
    copy issued earlier: `finish` at use makes the compute stream wait for it and waits on the host for
    it only to give the buffer back; by then it has usually long completed."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stream: torch.cuda.Stream | None = None

    @property
    def stream(self) -> torch.cuda.Stream:
        """The side stream the copies run on (made at first use)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def start(self, host: torch.Tensor) -> Arriving:
        """Issues host's copy to the device on the side stream; returns without waiting for it."""
        stream = self.stream
        copied = torch.cuda.Event()
        with torch.cuda.stream(stream):
            values = host.to(self.device, non_blocking=True)
            copied.record(stream)
        return Arriving(values, copied)

    def finish(self, arriving: Arriving) -> torch.Tensor:
        """The values, ready for the current (compute) stream; returns once the copy has read host."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(arriving.copied)
        arriving.values.record_stream(compute)
        arriving.copied.synchronize()
        return arriving.values


class ComputeTier:
    """The compute tier as the memory manager sees it: places a host copy there (lent or copied, at use or
    ahead of it) and forgets it again.  Works on the manager's entries; the manager changes their state
    and gives host buffers back as the results here say."""

    def __init__(self, device: torch.device, ledger: TierLedger):
        self.device, self.ledger = device, ledger
        self.copy_ahead = CopyAhead.SIDE_STREAM if device.type == "cuda" else CopyAhead.NONE
        self._device_copies = DeviceCopies(device) if device.type == "cuda" else None
        self._lending = Lending()

    @property
    def side_stream(self) -> torch.cuda.Stream | None:
        """The stream host-to-device copies run on (CUDA); None where there are none."""
        return self._device_copies.stream if self._device_copies is not None else None

    def allow_lending(self, pool: BufferPool, reserve: int) -> None:
        """On a CPU compute tier, lets `place` lend up to pool.buffer_count - reserve of pool's buffers as
        compute copies instead of copying (see the Note above).  Elsewhere it changes nothing."""
        if self.device.type == "cpu":
            self._lending.allow(pool, reserve)

    def start(self, e: Entry, host: torch.Tensor) -> bool:
        """Issues the copy of e's host copy to the device ahead of use, where the policy says so."""
        if self._device_copies is None or e.arriving is not None:
            return False
        e.arriving = self._device_copies.start(host)
        return True

    @staticmethod
    def forget_arriving(e: Entry) -> None:
        """A copy to the device issued ahead and not used: its host buffer may change once it completes."""
        if e.arriving is not None:
            e.arriving.copied.synchronize()
            e.arriving = None

    def place(self, e: Entry, host: torch.Tensor) -> ComputeCopy:
        """e's compute copy from its host copy host: the copy issued ahead, or on CPU the host buffer itself
        (lent, within the pool's limit), or a copy.  Sets e.compute and e.copy."""
        started = time.perf_counter() if metrics.ACTIVE else 0.0
        e.copy = ComputeCopy.COPY
        if e.arriving is not None:
            arriving, e.arriving = e.arriving, None
            e.compute = self._device_copies.finish(arriving)  # type: ignore[union-attr]
        elif self.device.type == "cpu" and not e.kept and e.slot is not None and e.slot.pool is not None \
                and self._lending.take(e.slot.pool):
            e.compute, e.copy = host, ComputeCopy.LENT
        elif self.device.type == "cpu":
            e.compute = host.clone()
        elif self._device_copies is not None:
            e.compute = self._device_copies.finish(self._device_copies.start(host))
        else:
            e.compute = host.to(self.device, copy=True)
        if started:
            metrics.transfer("host", "compute", e.kind, e.extent.nbytes, time.perf_counter() - started)
        return e.copy

    def own_copy(self, e: Entry) -> bool:
        """A lent compute copy becomes a copy of its own; True if so (its buffer must then go back)."""
        if e.copy is not ComputeCopy.LENT or e.slot is None or e.slot.pool is None:
            return False
        e.compute, e.copy = e.compute.clone(), ComputeCopy.COPY  # type: ignore[union-attr]
        self._return_lent(e)
        return True

    def drop(self, e: Entry) -> bool:
        """Forgets e's compute copy; True if it was a lent buffer (which must then go back)."""
        e.compute = None
        self.ledger.add("compute", -e.extent.nbytes)
        if e.copy is ComputeCopy.LENT and e.slot is not None and e.slot.pool is not None:
            e.copy = ComputeCopy.COPY
            self._return_lent(e)
            return True
        return False

    def _return_lent(self, e: Entry) -> None:
        """Accounts a lent buffer as the pool's again; replaces it there if a tensor outside views it."""
        self._lending.give_back(e.slot.pool)  # type: ignore[union-attr]
        self.ledger.add("host", e.extent.nbytes)
        if e.slot.buffer.views_outside():  # type: ignore[union-attr]
            log.debug("partition %r: a tensor outside still views its lent buffer; the pool gets a new one",
                      e.record.key)
            e.slot.pool.replace(e.slot.index)  # type: ignore[union-attr]

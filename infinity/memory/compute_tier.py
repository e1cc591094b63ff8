"""How a host copy becomes the compute tier's copy: lent as it is (CPU), or copied to the device on a side
stream (CUDA), at use or ahead of it.  Used by the memory manager only; nothing here moves NVMe bytes.

[Note: lending a staging buffer to the compute tier (CPU)]
When the compute tier is host memory, copying a parameter from its staging buffer into a fresh tensor is
work the resident step does not have (about 6 ms a step for the default GPT on 2 cores).  Instead the
buffer itself can be the compute copy until the parameter is released.  Two costs follow, each handled:
- a lent buffer is out of the pool for longer (from the module's start to its release, not just until
  the copy).  A module that misses must still find a buffer: reads ahead can be given up, lent buffers
  cannot.  So at most pool.buffer_count - reserve buffers are lent at once, where reserve is the most
  offloaded partitions one module gathers (Engine sets it); past that to_compute copies as before.
- a tensor outside may still view the buffer when it is released (an op that saved the weight itself
  for backward).  The manager then replaces the pool's buffer (BufferPool.replace) instead of lending
  the memory again under that tensor: the old memory lives as long as the view, as a copy would.
"""
from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from infinity import metrics
from infinity.memory.partition import State
from infinity.memory.pool import BufferPool

if TYPE_CHECKING:
    from infinity.memory.manager import Entry
    from infinity.memory.report import TierLedger

log = logging.getLogger("infinity.memory")


class ComputeCopy(enum.Enum):
    """How to_compute made a partition's compute copy."""

    COPY = "copy"  # a tensor of its own on the compute tier; the host buffer went back at once
    LENT = "lent"  # the host buffer itself (CPU compute tier); it goes back at drop_compute


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

    def start(self, host: torch.Tensor) -> Arriving:
        """Issues host's copy to the device on the side stream; returns without waiting for it."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        copied = torch.cuda.Event()
        with torch.cuda.stream(self._stream):
            values = host.to(self.device, non_blocking=True)
            copied.record(self._stream)
        return Arriving(values, copied)

    def finish(self, arriving: Arriving) -> torch.Tensor:
        """The values, ready for the current (compute) stream; returns once the copy has read host."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(arriving.copied)
        arriving.values.record_stream(compute)
        arriving.copied.synchronize()
        return arriving.values


class ComputeTierMoves:
    """The memory manager's moves between a host copy and the compute tier.  MemoryManager inherits them
    (they are here only to keep manager.py to one screenful per concern); they use its _entry,
    check_healthy, host_view, read_done, _settle and _give_back, and nothing else moves these bytes."""

    device: torch.device
    ledger: TierLedger
    _device_copies: DeviceCopies | None
    _lending: Lending
    _entry: Any
    check_healthy: Any
    host_view: Any
    read_done: Any
    _settle: Any
    _give_back: Any

    def lend_to_compute(self, pool: BufferPool, reserve: int) -> None:
        """On a CPU compute tier, lets to_compute lend up to pool.buffer_count - reserve of pool's buffers
        as compute copies instead of copying (reserve: buffers that must stay for reads; see the Note in
        infinity/memory/compute_tier.py).  Elsewhere it changes nothing."""
        if self.device.type == "cpu":
            self._lending.allow(pool, reserve)

    def start_to_compute(self, key: str) -> bool:
        """On CUDA, issues the copy of a partition whose read has completed to the device now, on the side
        stream, so to_compute later finds it there; False (nothing started) elsewhere, or if the read is
        still in flight."""
        e = self._entry(key)
        if self._device_copies is None or e.arriving is not None or not self.read_done(key):
            return False
        if e.partition.state is State.READING:
            self._settle(e, State.HOST_CLEAN, State.ON_NVME, "read")
        if e.partition.state is not State.HOST_CLEAN:
            return False
        e.arriving = self._device_copies.start(self.host_view(key))
        return True

    def to_compute(self, key: str) -> torch.Tensor:
        """The partition on the compute tier: a copy of its host copy (the host buffer goes back, a kept
        one stays), or on CPU the host buffer itself, lent until drop_compute."""
        self.check_healthy()
        e = self._entry(key)
        host = self.host_view(key)
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
        e.partition.move_to(State.ON_COMPUTE)
        if e.copy is ComputeCopy.LENT:
            self.ledger.add("host", -e.extent.nbytes)  # the buffer's bytes count as the compute tier's now
        elif not e.kept:
            self._give_back(e)
        self.ledger.add("compute", e.extent.nbytes)
        return e.compute

    def lent(self, key: str) -> bool:
        """Whether key's compute copy is its staging buffer, lent (to_compute on CPU)."""
        return self._entry(key).copy is ComputeCopy.LENT

    def unlend(self, key: str) -> torch.Tensor:
        """A partition whose compute copy is a lent buffer gets a copy of its own, and the buffer goes back
        (replaced if a tensor outside still views it): for one kept on the compute tier beyond its use.
        Returns the compute copy (unchanged if it was not lent).  The caller must drop its own views of the
        old one first, so that they are not taken for views outside."""
        e = self._entry(key)
        if e.copy is not ComputeCopy.LENT or e.slot is None or e.slot.pool is None:
            return e.compute  # type: ignore[return-value]
        e.compute, e.copy = e.compute.clone(), ComputeCopy.COPY  # type: ignore[union-attr]
        self._return_lent(e)
        self._give_back(e)
        return e.compute

    def _return_lent(self, e: Entry) -> None:
        """Accounts a lent buffer as the pool's again; replaces it there if a tensor outside views it."""
        self._lending.give_back(e.slot.pool)  # type: ignore[union-attr]
        self.ledger.add("host", e.extent.nbytes)
        if e.slot.buffer.views_outside():  # type: ignore[union-attr]
            log.debug("partition %r: a tensor outside still views its lent buffer; the pool gets a new one",
                      e.partition.key)
            e.slot.pool.replace(e.slot.index)  # type: ignore[union-attr]

    def drop_compute(self, key: str) -> None:
        """Forgets the compute-tier copy; the NVMe extent (and a kept host copy) still hold the values.
        A lent buffer goes back to its pool (or, if tensors outside still view it, is replaced there)."""
        e = self._entry(key)
        e.compute = None
        self.ledger.add("compute", -e.extent.nbytes)
        if e.copy is ComputeCopy.LENT and e.slot is not None and e.slot.pool is not None:
            e.copy = ComputeCopy.COPY
            self._return_lent(e)
            e.partition.move_to(State.ON_NVME)
            self._give_back(e)
            return
        e.partition.move_to(State.HOST_CLEAN if e.slot is not None else State.ON_NVME)


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
from dataclasses import dataclass, field

import torch

from infinity.memory.pool import BufferPool


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

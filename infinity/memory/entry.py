"""What the memory manager keeps for each partition: its record (record.py), its extent, the host buffer
it holds, the transfer in flight, its compute copy and the policies that apply to it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from infinity.io.handle import IoFuture
from infinity.memory.compute_tier import Arriving
from infinity.memory.host_buffer import HostBuffer
from infinity.memory.nvme_store import Extent
from infinity.memory.record import Record
from infinity.memory.policy import CacheBudget, ComputeCopy
from infinity.memory.pool import BufferPool


@dataclass
class Slot:
    """A host buffer of a pool, lent to one partition; pool None: the partition's own kept buffer."""

    pool: BufferPool | None
    index: int
    buffer: HostBuffer


@dataclass
class Entry:
    record: Record
    extent: Extent
    dtype: torch.dtype
    pool: BufferPool
    slot: Slot | None = None
    future: IoFuture | None = None
    compute: torch.Tensor | None = field(default=None, repr=False)
    kept: bool = False  # keeps its host copy between uses (HostCache)
    copy: ComputeCopy = ComputeCopy.COPY  # how its compute copy was made (LENT: it is the host buffer)
    arriving: Arriving | None = field(default=None, repr=False)  # a copy to the device issued ahead
    kind: str = "other"  # for metrics: param, grad or optimizer_state, from its region
    cache: CacheBudget | None = None  # the HostCache it may be kept under, decided at its first fetch
    fetched: bool = False  # a fetch has started its read at least once (the HostCache decision is made)
    written: bool = False  # bytes went into its extent ([Note: an extent never written reads as zeros])
    base: str | None = None  # its bytes are part of this partition's extent ([Note: a partition inside another])
    base_offset: int = 0  # where they start in the base's extent
    follows: str | None = None  # its values are this partition's range, converted ([Note: a follower])
    follows_offset: int = 0  # where that range starts, in bytes of the followed partition
    diverged: bool = False  # it holds values of its own since the followed partition's last were given it

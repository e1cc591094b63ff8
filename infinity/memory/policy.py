"""The memory manager's policies: how a host copy becomes the compute copy, whether the copy to the device
is issued ahead, what becomes of new values once written, and which partitions keep their host copy.
Small enums and frozen types, chosen once where a run is wired; the manager applies them."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class ComputeCopy(enum.Enum):
    """How a partition's compute copy was made (infinity/memory/compute_tier.py)."""

    COPY = "copy"  # a tensor of its own on the compute tier; the host buffer went back at once
    LENT = "lent"  # the host buffer itself (CPU compute tier); it goes back at release


class CopyAhead(enum.Enum):
    """Whether `MemoryManager.advance` issues the copy to the compute tier before its use."""

    NONE = "none"  # host memory is the compute tier: nothing to copy ahead
    SIDE_STREAM = "side_stream"  # CUDA: a read that has completed is copied to the device on a side stream


class AfterWrite(enum.Enum):
    """What becomes of a parameter's new host copy once MemoryManager.write has written it."""

    DROP = "drop"  # the staging buffer goes back when the write completes
    HOLD = "hold"  # the host copy stays, as a completed read would: the next step's first modules find it


class Origin(enum.Enum):
    """Where a partition's new values come from, for one that follows another ([Note: a follower] in views.py)."""

    OWN = "own"  # values of its own (initial values, GatheredParameters, a checkpoint): it stops following
    FOLLOWED = "followed"  # the followed partition's values, converted (the optimizer's step): it follows again


@dataclass(frozen=True)
class HostCache:
    """[Note: max_in_cpu]  Up to max_elements elements of a set of partitions keep a host copy: on its first
    read a partition is kept if its elements fit in what is left of the budget (first come, never
    evicted), and its later fetches copy from host memory instead of reading NVMe.  A write updates a
    kept copy and writes it through, so the swap file always holds the same values (DeepSpeed keeps such
    parameters in host memory only)."""

    max_elements: int = 0


@dataclass
class CacheBudget:
    """What a HostCache has handed out so far (shared by the partitions it covers)."""

    policy: HostCache
    used: int = 0

    def take(self, numel: int) -> bool:
        """Keeps numel more elements if they fit."""
        if self.used + numel > self.policy.max_elements:
            return False
        self.used += numel
        return True

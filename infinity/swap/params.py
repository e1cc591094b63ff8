"""Where a parameter's values live between uses, and how they reach the compute tier.

Three homes, one interface: the compute tier itself (offload_param none, and small persistent
parameters), host memory (cpu) and NVMe (nvme, through the memory manager).  The coordinator calls
`fetch` before a module runs and `release` after, `read_ahead` / `ready` / `cancel` for reads started
ahead of a use, and `keep` for a parameter that stays gathered beyond its use; the optimizer calls
`write` with new values.  The homes choose no verbs by state: the memory manager does.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod

import torch

from infinity.memory.manager import MemoryManager
from infinity.memory.policy import AfterWrite, HostCache, Origin
from infinity.memory.pool import BufferPool
from infinity.memory.record import Record
from infinity.memory.stream import HostPart, Part, SwapPart

__all__ = ["AfterWrite", "ComputeHome", "HostHome", "NvmeHome", "ParamHome", "Tier"]


class Tier(enum.Enum):
    """A place for partitions, named as the config's offload `device` names it."""

    COMPUTE = "none"
    HOST = "cpu"
    NVME = "nvme"


class ParamHome(ABC):
    """Values of the parameters one home holds, by index in the engine's parameter list.

    Homes without reads (the compute tier, host memory) have every value ready: their read_ahead starts
    nothing and their ready is always True."""

    @abstractmethod
    def fetch(self, index: int) -> torch.Tensor:
        """The values on the compute tier, shaped as the parameter."""

    @abstractmethod
    def release(self, index: int) -> None:
        """The compute-tier copy is no longer needed (values unchanged)."""

    @abstractmethod
    def write(self, index: int, values: torch.Tensor, after: AfterWrite = AfterWrite.DROP) -> set[str]:
        """New values (flat, fp32, possibly padded); returns memory-manager keys still being written."""

    @abstractmethod
    def part(self, index: int) -> Part:
        """Where the values rest between uses (for checkpoints): a tensor, or a partition of a swap file."""

    @abstractmethod
    def record(self, index: int) -> Record:
        """The parameter's record (infinity/memory/record.py), whose residency the coordinator moves: the
        memory manager's own for a partition in a swap file, one with no transfer state otherwise."""

    def read_ahead(self, index: int) -> bool:
        """Starts moving the values towards the compute tier, if a staging buffer is free; a later fetch
        finishes it.  False: no buffer is free (nothing started)."""
        return False

    def ready(self, index: int) -> bool:
        """Whether fetch(index) would find the values without waiting for a read."""
        return True

    def cancel(self, index: int) -> None:
        """A read started by read_ahead will not be used: complete it and give its buffer back."""

    def advance(self, index: int) -> None:
        """A read ahead that has completed goes one step further now, where the home's policies say so (on
        CUDA the copy to the device)."""

    def keep(self, index: int, param: torch.nn.Parameter, empty: torch.Tensor) -> None:
        """param stays gathered beyond its use: where its compute copy is a staging buffer, param gets a
        copy of its own so that the buffer goes back for reads ahead (empty: param's placeholder, which it
        holds meanwhile)."""


class ComputeHome(ParamHome):
    """The parameter keeps its own storage on the compute tier."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self._params = params
        self._records = [Record.resident_only(f"parameter {i}") for i in range(len(params))]

    def record(self, index: int) -> Record:
        return self._records[index]

    def fetch(self, index: int) -> torch.Tensor:
        return self._params[index].data

    def release(self, index: int) -> None:
        pass

    def part(self, index: int) -> Part:
        return HostPart(self._params[index].data)

    def write(self, index: int, values: torch.Tensor, after: AfterWrite = AfterWrite.DROP) -> set[str]:
        p = self._params[index]
        p.data.copy_(values[: p.numel()].view_as(p))
        return set()


class HostHome(ParamHome):
    """Host copies in the compute dtype; fetch copies them to the compute tier.  `where` stores them
    elsewhere (with several ranks and offload_param none, each rank's shards stay on the compute tier)."""

    def __init__(self, shapes: dict[int, torch.Size], dtype: torch.dtype, device: torch.device, pin: bool,
                 where: torch.device = torch.device("cpu")):
        self._host = {i: torch.empty(shape, dtype=dtype, pin_memory=pin, device=where) for i, shape in shapes.items()}
        self._records = {i: Record.resident_only(f"parameter {i}") for i in shapes}
        self._device = device

    def record(self, index: int) -> Record:
        return self._records[index]

    def put(self, index: int, values: torch.Tensor) -> None:
        self._host[index].copy_(values.reshape(self._host[index].shape))

    def fetch(self, index: int) -> torch.Tensor:
        return self._host[index].to(self._device, copy=True)

    def release(self, index: int) -> None:
        pass

    def part(self, index: int) -> Part:
        return HostPart(self._host[index])

    def write(self, index: int, values: torch.Tensor, after: AfterWrite = AfterWrite.DROP) -> set[str]:
        host = self._host[index]
        host.copy_(values[: host.numel()].view_as(host))
        return set()


class NvmeHome(ParamHome):
    """Values in swap files, staged through the parameter buffer pool (offload_param.buffer_count); up to
    max_in_cpu elements keep a host copy ([Note: max_in_cpu] in infinity/memory/policy.py)."""

    def __init__(self, manager: MemoryManager, pool: BufferPool, names: dict[int, str],
                 shapes: dict[int, torch.Size], dtype: torch.dtype, adopted: dict[int, str] | None = None,
                 max_in_cpu: int = 0, masters: dict[int, tuple[str, int]] | None = None):
        """adopted: partitions already in manager (written by zero.Init), by index.  masters: where in the
        manager each parameter's fp32 master weights lie (key, byte offset).  In fp32 the partition is that
        range ([Note: a partition inside another] in memory/views.py): new ones are made so here, adopted
        ones by `share_masters`, once the master holds their values.  In half precision the partition keeps
        its own extent and follows the master ([Note: a follower] there)."""
        self.manager, self.pool, self.dtype = manager, pool, dtype
        adopted = adopted or {}
        self._keys = {i: adopted.get(i, f"param/{names[i]}") for i in names}
        self._shapes = shapes
        self._masters = masters or {}
        fp32 = dtype == torch.float32
        self.shared = frozenset(self._masters) if fp32 else frozenset()  # partitions that are master ranges
        self.following = frozenset() if fp32 else frozenset(self._masters)  # partitions that follow them
        for i, k in self._keys.items():
            numel = int(torch.Size(shapes[i]).numel())
            if i in adopted:
                manager.use_pool(k, pool)
            elif i in self.shared:
                manager.share(k, *self._masters[i], numel, dtype, pool)
            else:
                manager.add(k, numel, dtype, region="param", pool=pool)
            if i in self.following:
                manager.follow(k, *self._masters[i])
        self._adopted = set(adopted)
        manager.cache_host_copies(self._keys.values(), HostCache(max_in_cpu))

    def share_masters(self) -> None:
        """Adopted partitions (zero.Init's) move into their master ranges, which now hold the same values."""
        for i in sorted(self._adopted & self.shared):
            self.manager.share(self._keys[i], *self._masters[i], int(torch.Size(self._shapes[i]).numel()),
                               self.dtype, self.pool)

    def updated(self, index: int, values: torch.Tensor, after: AfterWrite = AfterWrite.DROP) -> set[str]:
        """The optimizer wrote new values into this shared parameter's master range: only host copies follow
        (MemoryManager.updated); nothing is left to flush."""
        self.manager.updated(self._keys[index], values, after)
        return set()

    def key(self, index: int) -> str:
        return self._keys[index]

    @property
    def kept(self) -> set[int]:
        """The parameters whose host copy stays between uses (max_in_cpu)."""
        return {i for i, k in self._keys.items() if self.manager.kept(k)}

    def put(self, index: int, values: torch.Tensor) -> None:
        self.manager.write_through(self._keys[index], values.to(self.dtype))

    def part(self, index: int) -> Part:
        return SwapPart(self.manager, self._keys[index])

    def record(self, index: int) -> Record:
        return self.manager.record(self._keys[index])

    def read_ahead(self, index: int) -> bool:
        if self.pool.in_use >= self.pool.buffer_count:
            return False
        self.manager.fetch(self._keys[index])
        return True

    def fetch(self, index: int) -> torch.Tensor:
        return self.manager.fetch(self._keys[index]).wait().view(self._shapes[index])

    def release(self, index: int) -> None:
        self.manager.release(self._keys[index])

    def ready(self, index: int) -> bool:
        return self.manager.ready(self._keys[index])

    def cancel(self, index: int) -> None:
        self.manager.cancel(self._keys[index])

    def advance(self, index: int) -> None:
        self.manager.advance(self._keys[index])

    def keep(self, index: int, param: torch.nn.Parameter, empty: torch.Tensor) -> None:
        """[Note: kept parameters give their staging buffer back]  On CPU a gathered parameter's compute
        copy may be its staging buffer (infinity/memory/compute_tier.py).  Kept until a later use, it
        would hold that buffer all the while and leave fewer for reads ahead (with the default reuse
        distance every parameter is kept from forward to backward), so it gets a copy of its own."""
        k = self._keys[index]
        if self.manager.lent(k):
            param.data = empty  # not a view of the buffer outside
            param.data = self.manager.keep(k).view(self._shapes[index])

    def write(self, index: int, values: torch.Tensor, after: AfterWrite = AfterWrite.DROP,
              origin: Origin = Origin.OWN) -> set[str]:
        """[Note: AfterWrite.HOLD]  The engine holds the new values of the next step's first partitions in
        staging buffers (converted as they are copied, then written through), so those modules find them
        in host memory instead of waiting for reads that can only start after the optimizer step.  origin
        Origin.FOLLOWED: the values are the master's, which a following partition may read instead."""
        k = self._keys[index]
        numel = int(torch.Size(self._shapes[index]).numel())
        part = values if self.dtype == torch.float32 else values[:numel]  # fp32 keeps its padding: whole blocks
        self.manager.write(k, part, after, self.dtype, origin)
        return {k}

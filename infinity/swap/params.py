"""Where a parameter's values live between uses, and how they reach the compute tier.

Three homes, one interface: the compute tier itself (offload_param none, and small persistent
parameters), host memory (cpu) and NVMe (nvme, through the memory manager).  The coordinator calls
`fetch` before a module runs and `release` after; the optimizer calls `write` with new values.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import Iterator

import torch

from infinity.memory.manager import MemoryManager
from infinity.memory.partition import State
from infinity.memory.pool import BufferPool
from infinity.memory.stream import HostPart, Part, SwapPart
from infinity.swap.swap_in import swap_in


class Tier(enum.Enum):
    """A place for partitions, named as the config's offload `device` names it."""

    COMPUTE = "none"
    HOST = "cpu"
    NVME = "nvme"


class AfterWrite(enum.Enum):
    """What becomes of a parameter's new host copy once ParamHome.write has written it."""

    DROP = "drop"  # the staging buffer goes back when the write completes
    HOLD = "hold"  # the host copy stays, as a completed read would: the next step's first modules find it


class ParamHome(ABC):
    """Values of the parameters one home holds, by index in the engine's parameter list."""

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

    def start_fetch(self, index: int) -> None:
        """Begins moving the values towards the compute tier; a later fetch finishes it."""

    def fetch_many(self, indices: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, fetch(index)) for each index, in order; a home that reads NVMe overlaps the reads."""
        for i in indices:
            yield i, self.fetch(i)

    def can_start_fetch(self) -> bool:
        """Whether start_fetch would begin a read now without waiting (homes without reads: never)."""
        return False

    def read_ready(self, index: int) -> bool:
        """Whether fetch(index) would find the values without waiting for a read."""
        return True

    def cancel_fetch(self, index: int) -> None:
        """A read started by start_fetch will not be used: complete it and give its buffer back."""

    def gathers_ahead(self) -> bool:
        """Whether gather_ahead does anything (homes holding a rank's shard: infinity/zero/gather.py)."""
        return False

    def gather_ahead(self, index: int) -> None:
        """Brings the whole parameter ahead of its use, where that takes more than a read (an all-gather)."""

    def lent(self, index: int) -> bool:
        """Whether the parameter's compute copy is a staging buffer lent to the compute tier (CPU)."""
        return False

    def unlend(self, index: int) -> torch.Tensor:
        """A parameter kept on the compute tier beyond its use whose compute copy is a lent staging buffer
        gets a copy of its own (the buffer goes back to the pool for reads ahead); returns it.  The caller
        drops its views of the old values first."""
        raise NotImplementedError(f"{type(self).__name__} lends no buffers")

    def advance(self, index: int) -> None:
        """A fetch started ahead whose read has completed goes one tier further now (on CUDA: the copy to
        the device is issued on the side stream), so fetch finds it there."""


class ComputeHome(ParamHome):
    """The parameter keeps its own storage on the compute tier."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self._params = params

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
        self._device = device

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
    """Values in swap files, staged through the parameter buffer pool (offload_param.buffer_count).

    [Note: max_in_cpu]  Up to max_in_cpu elements of parameters keep a host copy: on its first read a
    parameter is kept if its elements fit in what is left of the budget (first come, never evicted),
    and its later fetches copy from host memory instead of reading NVMe.  `write` updates a kept copy
    and writes it through, so the swap file always holds the same values (DeepSpeed keeps such
    parameters in host memory only)."""

    def __init__(self, manager: MemoryManager, pool: BufferPool, names: dict[int, str],
                 shapes: dict[int, torch.Size], dtype: torch.dtype, adopted: dict[int, str] | None = None,
                 max_in_cpu: int = 0):
        """adopted: partitions already in manager (written by zero.Init), by index."""
        self.manager, self.pool, self.dtype = manager, pool, dtype
        self.max_in_cpu = max_in_cpu
        self.kept: set[int] = set()  # parameters whose host copy stays between uses
        self._seen: set[int] = set()  # parameters read at least once
        self._kept_numel = 0
        adopted = adopted or {}
        self._keys = {i: adopted.get(i, f"param/{names[i]}") for i in names}
        self._shapes = shapes
        self._ahead = manager.device.type == "cuda"  # advance issues copies to the device ahead
        for i, k in self._keys.items():
            if i in adopted:
                manager.lend_pool(k, pool)
            else:
                manager.add(k, int(torch.Size(shapes[i]).numel()), dtype, region="param", pool=pool)

    def key(self, index: int) -> str:
        return self._keys[index]

    def put(self, index: int, values: torch.Tensor) -> None:
        self.manager.write_through(self._keys[index], values.to(self.dtype))

    def part(self, index: int) -> Part:
        return SwapPart(self.manager, self._keys[index])

    def start_fetch(self, index: int) -> None:
        k = self._keys[index]
        if self.manager.state(k) is not State.ON_NVME:
            return  # a kept host copy, or a read already started: nothing to start
        if index not in self._seen:
            self._seen.add(index)
            numel = self._numel(index)
            if self._kept_numel + numel <= self.max_in_cpu:
                self.manager.keep_host_copy(k)
                self.kept.add(index)
                self._kept_numel += numel
        self.manager.start_read(k)

    def fetch(self, index: int) -> torch.Tensor:
        k = self._keys[index]
        if self.manager.state(k) is State.WRITING:
            self.manager.flush({k})  # a kept copy's write-through completes first
        if self.manager.state(k) is State.ON_NVME:
            self.start_fetch(index)
        if self.manager.state(k) is State.READING:
            self.manager.finish_read(k)
        return self.manager.to_compute(k).view(self._shapes[index])

    def fetch_many(self, indices: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """fetch of each index, in order, with up to offload_param.buffer_count reads in flight and each
        copy to the compute tier overlapping the next reads (infinity.swap.swap_in)."""
        index_of = {self._keys[i]: i for i in indices}
        for k, values in swap_in(self.manager, list(index_of), self.pool,
                                 start=lambda k: self.start_fetch(index_of[k])):
            yield index_of[k], values.view(self._shapes[index_of[k]])

    def release(self, index: int) -> None:
        self.manager.drop_compute(self._keys[index])

    def can_start_fetch(self) -> bool:
        return self.pool.in_use < self.pool.buffer_count

    def read_ready(self, index: int) -> bool:
        return self.manager.read_done(self._keys[index])

    def cancel_fetch(self, index: int) -> None:
        k = self._keys[index]
        if self.manager.state(k) is State.READING:
            self.manager.finish_read(k)
        if self.manager.state(k) is State.HOST_CLEAN and index not in self.kept:
            self.manager.drop(k)  # a kept copy stays in host memory, as it would after a use

    def lent(self, index: int) -> bool:
        return self.manager.lent(self._keys[index])

    def unlend(self, index: int) -> torch.Tensor:
        return self.manager.unlend(self._keys[index]).view(self._shapes[index])

    def advance(self, index: int) -> None:
        if self._ahead:
            self.manager.start_to_compute(self._keys[index])

    def write(self, index: int, values: torch.Tensor, after: AfterWrite = AfterWrite.DROP) -> set[str]:
        """[Note: AfterWrite.HOLD]  The engine holds the new values of the next step's first partitions in
        staging buffers (converted as they are copied, then written through), so those modules find them
        in host memory instead of waiting for reads that can only start after the optimizer step."""
        k = self._keys[index]
        numel = self._numel(index)
        part = values if self.dtype == torch.float32 else values[:numel]  # fp32 keeps its padding: whole blocks
        if index in self.kept or (after is AfterWrite.HOLD and self.manager.can_hold(k)):
            self.manager.write_held(k, part)
        else:  # converted to the parameter's dtype as it is copied into a staging buffer: one pass
            self.manager.write_part(k, 0, part, staging=self.pool, dtype=self.dtype)
        return {k}

    def _numel(self, index: int) -> int:
        return int(torch.Size(self._shapes[index]).numel())

"""Opening the memory manager of one nvme_path (shared by the engine and zero.Init), and the check of where
the settings put parameters against the model's sizes.

[Note: one rule, once]  The rules on the config alone (an nvme device needs an nvme_path; the optimizer's
buffer_count covers the ADAM_SWAPPED_STATES tensors of a sub-group) are config/rules.py's, checked when
the config loads with every other problem; what needs the model (the largest parameter against
buffer_size) is checked here, once the model is known."""
from __future__ import annotations

import torch

from infinity.errors import ConfigError, Problem
from infinity.io import DirectPolicy, open_handle
from infinity.memory.manager import MemoryManager
from infinity.memory.host_buffer import PinPolicy
from infinity.memory.nvme_store import NvmeStore
from infinity.memory.pool import BufferPool, BufferSize
from infinity.swap.layout import FP32, Group
from infinity.swap.optimizer import pool_buffers
from infinity.swap.params import Tier
from infinity.zero.settings import EngineSettings
from infinity.shard import Shard


def open_manager(settings: EngineSettings, path: str, device: torch.device,
                 key: str = "zero_optimization.offload_param.nvme_path") -> MemoryManager:
    """An async-IO handle on path (O_DIRECT where it works) and this run's swap store under it."""
    handle = open_handle(settings.aio, nvme_path=path, direct=DirectPolicy.AUTO, key=key)
    return MemoryManager(handle, NvmeStore(path, rank=settings.rank, key=key), device, settings.integrity)


def param_pool(s: EngineSettings, largest: int, dtype: torch.dtype, pin: PinPolicy) -> BufferPool:
    """The parameters' staging pool: offload_param.buffer_count buffers, each holding the largest (partition
    of a) parameter, `largest` elements of dtype, in whole blocks as its swap extent (BufferPool rounds up)."""
    size = torch.empty(0, dtype=dtype).element_size()
    return BufferPool("param", s.param_buffer_count, largest * size, "zero_optimization.offload_param.buffer_count",
                      pin, BufferSize("zero_optimization.offload_param.buffer_size", size))


def optimizer_pool(s: EngineSettings, groups: tuple[Group, ...], pin: PinPolicy) -> BufferPool:
    """The optimizer's pool: a buffer per tensor of each sub-group in flight (swap/optimizer.py's pool_buffers),
    each holding the largest sub-group."""
    return BufferPool("optimizer", pool_buffers(s.optimizer_buffer_count, s.pipeline, len(groups)),
                      max(g.nbytes for g in groups), "zero_optimization.offload_optimizer.buffer_count", pin,
                      BufferSize("zero_optimization.sub_group_size", FP32))


def check_placement(s: EngineSettings, shards: list[Shard], any_params: bool) -> None:
    """The largest parameter (this rank's shard of it) against offload_param.buffer_size."""
    problems = []
    if s.param_tier is Tier.NVME and any_params and shards:
        largest, name = max((shard.length, shard.name) for shard in shards)
        whose = f"rank {shards[0].rank}'s shard of parameter" if shards[0].world > 1 else "parameter"
        if largest > s.param_buffer_size:
            problems.append(Problem("zero_optimization.offload_param.buffer_size",
                                    f"{s.param_buffer_size} elements cannot hold {whose} {name!r} of "
                                    f"{largest} elements", f"set buffer_size to at least {largest}"))
    if problems:
        raise ConfigError(problems)

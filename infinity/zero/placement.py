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
from infinity.memory.nvme_store import NvmeStore
from infinity.swap.params import Tier
from infinity.zero.settings import EngineSettings
from infinity.shard import Shard


def open_manager(settings: EngineSettings, path: str, device: torch.device,
                 key: str = "zero_optimization.offload_param.nvme_path") -> MemoryManager:
    """An async-IO handle on path (O_DIRECT where it works) and this run's swap store under it."""
    handle = open_handle(settings.aio, nvme_path=path, direct=DirectPolicy.AUTO)
    return MemoryManager(handle, NvmeStore(path, rank=settings.rank, key=key), device)


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

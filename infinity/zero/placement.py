"""Opening the memory manager of one nvme_path (shared by the engine and zero.Init), and the checks of where
the settings put parameters and optimizer states."""
from __future__ import annotations

import torch

from infinity.errors import ConfigError, Problem
from infinity.io import DirectPolicy, open_handle
from infinity.memory.manager import MemoryManager
from infinity.memory.nvme_store import NvmeStore
from infinity.swap.optimizer import BUFFERS_PER_GROUP
from infinity.swap.params import Tier
from infinity.zero.settings import EngineSettings
from infinity.shard import Shard


def open_manager(settings: EngineSettings, path: str, device: torch.device,
                 key: str = "zero_optimization.offload_param.nvme_path") -> MemoryManager:
    """An async-IO handle on path (O_DIRECT where it works) and this run's swap store under it."""
    handle = open_handle(settings.aio, nvme_path=path, direct=DirectPolicy.AUTO)
    return MemoryManager(handle, NvmeStore(path, rank=settings.rank, key=key), device)


def check_placement(s: EngineSettings, shards: list[Shard], any_params: bool) -> None:
    """Every problem with where the settings put parameters and optimizer states, raised together."""
    problems = []
    for tier, path, key in ((s.param_tier, s.param_nvme_path, "offload_param"),
                            (s.optimizer_tier, s.optimizer_nvme_path, "offload_optimizer")):
        if tier is Tier.NVME and not path:
            problems.append(Problem(f"zero_optimization.{key}.nvme_path", "device is nvme but no nvme_path is "
                                    "given", "set nvme_path to a folder on the NVMe drive"))
    if s.param_tier is Tier.NVME and any_params and shards:
        largest, name = max((shard.length, shard.name) for shard in shards)
        whose = f"rank {shards[0].rank}'s shard of parameter" if shards[0].world > 1 else "parameter"
        if largest > s.param_buffer_size:
            problems.append(Problem("zero_optimization.offload_param.buffer_size",
                                    f"{s.param_buffer_size} elements cannot hold {whose} {name!r} of "
                                    f"{largest} elements", f"set buffer_size to at least {largest}"))
    if s.optimizer_tier is Tier.NVME and s.optimizer_buffer_count < BUFFERS_PER_GROUP:
        problems.append(Problem("zero_optimization.offload_optimizer.buffer_count",
                                f"{s.optimizer_buffer_count} buffers cannot hold one sub-group's "
                                f"{BUFFERS_PER_GROUP} states", "set it to at least 4"))
    if problems:
        raise ConfigError(problems)

"""Opening the memory manager of one nvme_path: shared by the engine and zero.Init."""
from __future__ import annotations

import torch

from infinity.io import DirectPolicy, open_handle
from infinity.memory.manager import MemoryManager
from infinity.memory.nvme_store import NvmeStore
from infinity.zero.settings import EngineSettings


def open_manager(settings: EngineSettings, path: str, device: torch.device,
                 key: str = "zero_optimization.offload_param.nvme_path") -> MemoryManager:
    """An async-IO handle on path (O_DIRECT where it works) and this run's swap store under it."""
    handle = open_handle(settings.aio, nvme_path=path, direct=DirectPolicy.AUTO)
    return MemoryManager(handle, NvmeStore(path, rank=settings.rank, key=key), device)

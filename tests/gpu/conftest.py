"""The CUDA tests' memory manager (skipped without CUDA: the gpu marker, tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

from infinity.config.aio import AioConfig
from infinity.io import DirectPolicy, open_handle
from infinity.memory.manager import MemoryManager
from infinity.memory.nvme_store import NvmeStore
from infinity.memory.pool import BufferPool

BUFFER_ELEMENTS = 1 << 20  # fp32 elements of the manager fixture's one staging buffer (the tests' N)


@pytest.fixture
def manager(tmp_path):
    """(a memory manager whose compute tier is CUDA, a pool of one buffer: reused at once)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pool = BufferPool("param", 1, BUFFER_ELEMENTS * 4, "offload_param.buffer_count")
    with open_handle(AioConfig(), direct=DirectPolicy.AUTO) as handle:
        m = MemoryManager(handle, NvmeStore(tmp_path), torch.device("cuda"))
        try:
            yield m, pool
        finally:
            m.close()

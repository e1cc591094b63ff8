"""MemoryManager.advance on CUDA (CopyAhead.SIDE_STREAM): a completed read is copied to the device ahead of
use on the side stream; the fetch's wait then uses that copy, the host buffer is reused only after the copy
has read it, and a copy issued ahead and never used still finishes before its buffer goes back (cancel)."""
from __future__ import annotations

import pytest
import torch

from infinity.memory.manager import MemoryManager
from infinity.memory.record import State
from infinity.memory.policy import AfterWrite, HostCache
from infinity.memory.pool import BufferPool

pytestmark = pytest.mark.gpu

N = 1 << 20  # the manager fixture's staging buffer holds N fp32 elements (tests/gpu/conftest.py)


def put(m: MemoryManager, pool: BufferPool, key: str, values: torch.Tensor) -> None:
    m.add(key, values.numel(), values.dtype, region="param", pool=pool)
    m.store.reserve()
    m.write_through(key, values)


def test_a_copy_issued_ahead_is_the_one_to_compute_returns(manager):
    m, pool = manager
    want = torch.randn(N)
    put(m, pool, "w", want)
    handle = m.fetch("w")
    m.finish_read("w")
    assert m.advance("w") is True and m.state("w") is State.HOST_CLEAN
    got = handle.wait()
    assert pool.in_use == 0 and got.device.type == "cuda"
    with pool.borrowed(N * 4) as buffer:  # the buffer is free: overwrite it as the next read would
        buffer.tensor.fill_(7)
    assert torch.equal(got.cpu(), want)
    m.release("w")


def test_advance_waits_for_nothing_while_the_read_is_in_flight(manager):
    m, pool = manager
    put(m, pool, "w", torch.randn(N))
    handle = m.fetch("w")
    while not handle.ready():
        assert m.advance("w") is False
    assert m.advance("w") is True
    m.cancel("w")  # never used: the copy finishes before the buffer goes back
    assert pool.in_use == 0 and m.state("w") is State.ON_NVME


def test_a_new_value_after_a_copy_ahead_is_not_lost(manager):
    m, pool = manager
    put(m, pool, "w", torch.zeros(N))
    m.cache_host_copies(["w"], HostCache(N))  # kept from its first fetch on
    m.fetch("w")
    m.finish_read("w")
    assert m.kept("w") and m.advance("w")
    new = torch.randn(N)
    m.write("w", new, AfterWrite.DROP, torch.float32)  # a kept copy is written through; the copy ahead is forgotten
    m.flush({"w"})
    assert torch.equal(m.fetch("w").wait().cpu(), new)
    m.release("w")

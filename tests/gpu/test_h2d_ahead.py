"""MemoryManager.start_to_compute on CUDA: a completed read is copied to the device ahead of use on the
side stream; to_compute then uses that copy, the host buffer is reused only after the copy has read it,
and a copy issued ahead and never used still finishes before its buffer goes back (drop)."""
from __future__ import annotations

import pytest
import torch

from infinity.memory.manager import MemoryManager
from infinity.memory.partition import State
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
    m.start_read("w")
    m.finish_read("w")
    assert m.start_to_compute("w") is True and m.state("w") is State.HOST_CLEAN
    got = m.to_compute("w")
    assert pool.in_use == 0 and got.device.type == "cuda"
    pool._all[0].tensor.fill_(7)  # the buffer is free: overwrite it as the next read would
    assert torch.equal(got.cpu(), want)
    m.drop_compute("w")


def test_start_to_compute_waits_for_nothing_while_the_read_is_in_flight(manager):
    m, pool = manager
    put(m, pool, "w", torch.randn(N))
    m.start_read("w")
    while not m.read_done("w"):
        assert m.start_to_compute("w") is False
    assert m.start_to_compute("w") is True
    m.drop("w")  # never used: the copy finishes before the buffer goes back
    assert pool.in_use == 0 and m.state("w") is State.ON_NVME


def test_a_new_value_after_a_copy_ahead_is_not_lost(manager):
    m, pool = manager
    put(m, pool, "w", torch.zeros(N))
    m.keep_host_copy("w")
    m.start_read("w")
    m.finish_read("w")
    assert m.start_to_compute("w")
    new = torch.randn(N)
    m.write_held("w", new)  # the copy ahead is of the old values: forgotten
    m.flush({"w"})
    assert torch.equal(m.to_compute("w").cpu(), new)
    m.drop_compute("w")

"""MemoryManager.to_compute on CUDA: the copy has left the host buffer before the buffer is reused, the
compute stream reads the copied values, and the caller does not wait for compute work queued earlier.

Delays are injected with torch.cuda._sleep on the compute stream (a kernel that spins for a number of
clock cycles), so that a missing wait shows up as wrong values, not as a timing."""
from __future__ import annotations

import pytest
import torch

from infinity.memory.manager import MemoryManager
from infinity.memory.record import State

pytestmark = pytest.mark.gpu

N = 1 << 20  # the manager fixture's staging buffer holds N fp32 elements (tests/gpu/conftest.py)
BUSY_CYCLES = 500_000_000  # about a quarter of a second of one spinning kernel at H100 clocks


def fetch(m: MemoryManager, key: str) -> torch.Tensor:
    return m.fetch(key).wait()


def test_buffer_reused_after_to_compute_does_not_change_the_copy(manager):
    """The host buffer goes back to the pool only after the copy has read it, even a copy that runs late."""
    m, pool = manager
    values = torch.arange(N, dtype=torch.float32)
    m.add("w", N, torch.float32, region="param", pool=pool)
    m.write_through("w", values)
    fetch(m, "w")
    m.release("w")
    side = m.compute.side_stream  # the side stream the copies run on
    assert side is not None
    with torch.cuda.stream(side):
        torch.cuda._sleep(BUSY_CYCLES)  # the next copy waits behind this
    torch.cuda._sleep(BUSY_CYCLES)  # and so does whatever reads it on the compute stream
    on_device = fetch(m, "w")
    assert m.state("w") is State.ON_COMPUTE and on_device.device.type == "cuda"
    with pool.borrowed(N * 4) as buffer:  # the pool's only buffer, the one the copy came from
        buffer.tensor.fill_(0xFF)
    assert torch.equal(on_device.cpu(), values)
    m.release("w")


def test_to_compute_does_not_wait_for_queued_compute_work(manager):
    m, pool = manager
    m.add("w", N, torch.float32, region="param", pool=pool)
    m.write_through("w", torch.ones(N))
    handle = m.fetch("w")
    m.finish_read("w")  # the read is done: only the copy to the device is left
    torch.cuda._sleep(BUSY_CYCLES)
    on_device = handle.wait()
    still_busy = not torch.cuda.current_stream().query()
    assert float(on_device.sum()) == N
    assert still_busy, "to_compute waited for the compute stream's earlier work, not for its own copy"
    m.release("w")


def test_freed_copies_are_not_reused_while_the_compute_stream_reads_them(manager):
    """A copy dropped while a queued kernel still reads it must not be overwritten by the next copy."""
    m, pool = manager
    a_values, b_values = torch.arange(N, dtype=torch.float32), -torch.arange(N, dtype=torch.float32) - 1
    for key, values in (("a", a_values), ("b", b_values)):
        m.add(key, N, torch.float32, region="param", pool=pool)
        m.write_through(key, values)
    acc_a, acc_b = torch.zeros(N, device="cuda"), torch.zeros(N, device="cuda")
    rounds = 3
    for _ in range(rounds):
        a = fetch(m, "a")
        torch.cuda._sleep(BUSY_CYCLES // 5)
        acc_a += a  # queued behind the sleep
        del a
        m.release("a")  # a's memory is free now as far as Python knows
        b = fetch(m, "b")
        acc_b += b
        del b
        m.release("b")
    torch.cuda.synchronize()
    assert torch.equal(acc_a.cpu(), rounds * a_values)
    assert torch.equal(acc_b.cpu(), rounds * b_values)

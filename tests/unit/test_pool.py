"""The host buffer pool under pressure: waits for a release, never overcommits."""
from __future__ import annotations

import threading

import pytest

from infinity.errors import CapacityError
from infinity.memory.pool import BufferPool, BufferSize, PoolTimeout


def test_never_more_out_than_the_pool_holds():
    pool = BufferPool("param", buffer_count=3, buffer_bytes=8192, setting="offload_param.buffer_count")
    out_now, peak, lock = [0], [0], threading.Lock()

    def worker():
        for _ in range(50):
            with pool.borrowed(4096):
                with lock:
                    out_now[0] += 1
                    peak[0] = max(peak[0], out_now[0])
                with lock:
                    out_now[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 3 and pool.peak_in_use <= 3 and pool.in_use == 0


def test_acquire_waits_for_a_release():
    pool = BufferPool("param", buffer_count=1, buffer_bytes=4096, setting="offload_param.buffer_count")
    slot, _ = pool.acquire(4096)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(4096, timeout=30)))
    waiter.start()
    waiter.join(timeout=0.2)
    assert not got  # still waiting: the only buffer is out
    pool.release(slot)
    waiter.join()
    assert got and got[0][0] == slot


def test_timeout_names_the_setting():
    pool = BufferPool("optimizer", buffer_count=1, buffer_bytes=4096, setting="offload_optimizer.buffer_count")
    pool.acquire(10)
    with pytest.raises(PoolTimeout, match="offload_optimizer.buffer_count"):
        pool.acquire(10, timeout=0.01)


def test_request_larger_than_a_buffer_is_refused_up_front():
    pool = BufferPool("param", buffer_count=2, buffer_bytes=4096, setting="offload_param.buffer_count")
    with pytest.raises(CapacityError, match="buffers of pool 'param' at least 8192 bytes") as err:
        pool.acquire(4097)
    assert err.value.needed == 4097 and err.value.available == 4096 and pool.in_use == 0


def test_double_release_is_caught():
    pool = BufferPool("param", buffer_count=2, buffer_bytes=4096, setting="offload_param.buffer_count")
    slot, _ = pool.acquire(1)
    pool.release(slot)
    with pytest.raises(ValueError, match="double release"):
        pool.release(slot)


def test_buffers_hold_whole_blocks_as_swap_extents_do():
    pool = BufferPool("param", buffer_count=2, buffer_bytes=256_000, setting="offload_param.buffer_count")
    assert pool.buffer_bytes == 258_048  # 1000 x 128 bf16 elements: their extent's 63 blocks
    _, buf = pool.acquire(258_048)
    assert buf.nbytes == 258_048


def test_a_buffer_too_small_names_the_size_key_and_the_value_in_elements():
    pool = BufferPool("param", buffer_count=2, buffer_bytes=4096, setting="zero_optimization.offload_param.buffer_count",
                      size=BufferSize("zero_optimization.offload_param.buffer_size", 2))
    with pytest.raises(CapacityError) as err:
        pool.acquire(4097)
    assert "set zero_optimization.offload_param.buffer_size to at least 4096 elements" in str(err.value)
    assert err.value.needed == 4097 and err.value.available == 4096

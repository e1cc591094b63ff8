"""swap_in: values equal after NVMe → host → compute, reads overlapped, the pool never overcommitted."""
from __future__ import annotations

import errno
import threading
import time

import pytest
import torch

from infinity.config.aio import AioConfig
from infinity.errors import AioError
from infinity.io import DirectPolicy, open_handle
from infinity.memory.manager import EngineFailed, MemoryManager
from infinity.memory.nvme_store import NvmeStore
from infinity.memory.partition import State
from infinity.memory.pool import BufferPool
from infinity.swap.swap_in import swap_in

SIZES = [1, 199, 4096 * 10 // 2, 3000, 777, 2048, 5, 10_000, 1, 4097]  # elements, odd and aligned
BUFFERS = 3


class CountingHandle:
    """A real handle that counts reads submitted and not yet waited for; optionally slow or failing."""

    def __init__(self, handle, delay: float = 0.0, fail_read: int | None = None):
        self._handle, self.delay, self.fail_read = handle, delay, fail_read
        self.outstanding = self.peak_outstanding = self.reads = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def submit_read(self, buffer, file, offset=0):
        future = self._handle.submit_read(buffer, file, offset)
        with self._lock:
            self.reads += 1
            self.outstanding += 1
            self.peak_outstanding = max(self.peak_outstanding, self.outstanding)
            failing = self.reads == self.fail_read
        return _Future(self, future, time.monotonic() + self.delay, failing, file)


class _Future:
    def __init__(self, owner, future, ready_at, failing, file):
        self.owner, self.future, self.ready_at, self.failing, self.file = owner, future, ready_at, failing, file
        self.waited = False

    def done(self):
        return self.future.done() and time.monotonic() >= self.ready_at

    def wait(self):
        n = self.future.wait()
        time.sleep(max(0.0, self.ready_at - time.monotonic()))
        if not self.waited:
            self.waited = True
            with self.owner._lock:
                self.owner.outstanding -= 1
        if self.failing:
            raise AioError(errno.EIO, "read", str(self.file), 0, n, detail="injected by the test")
        return n


@pytest.fixture
def store(tmp_path):
    """A manager over a counting handle, with SIZES written as bf16 partitions p0..pN through a pool."""
    def make(dtype=torch.bfloat16, **counting):
        handle = CountingHandle(open_handle(AioConfig(), direct=DirectPolicy.REQUIRE), **counting)
        manager = MemoryManager(handle, NvmeStore(tmp_path), torch.device("cpu"))
        size = torch.empty(0, dtype=dtype).element_size()
        pool = BufferPool("param", BUFFERS, max(SIZES) * size, "offload_param.buffer_count")
        torch.manual_seed(0)
        values = {f"p{i}": torch.randn(n).to(dtype) for i, n in enumerate(SIZES)}
        for k, v in values.items():
            manager.add(k, v.numel(), dtype, region="param", pool=pool)
        manager.store.reserve()
        for k, v in values.items():
            manager.write_through(k, v)
        made.append((manager, handle))
        return manager, handle, pool, values

    made: list = []
    yield make
    for manager, handle in made:
        manager.close()
        handle._handle.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("depth", [1, 2, BUFFERS, 8, None])
def test_values_equal_in_order_and_the_pool_is_never_overcommitted(store, dtype, depth):
    manager, handle, pool, values = store(dtype)
    seen = []
    for key, got in swap_in(manager, values, pool, depth):
        assert manager.state(key) is State.ON_COMPUTE
        torch.testing.assert_close(got, values[key], rtol=0, atol=0)
        assert handle.outstanding <= BUFFERS and pool.in_use <= BUFFERS
        manager.drop_compute(key)
        seen.append(key)
    assert seen == list(values)
    window = BUFFERS if depth is None else min(depth, BUFFERS)
    assert handle.peak_outstanding == window  # as many reads in flight as allowed, never more
    assert pool.peak_in_use == window
    assert pool.in_use == 0 and handle.outstanding == 0
    assert all(manager.state(k) is State.ON_NVME for k in values)


def test_values_may_be_kept_on_the_compute_tier(store):
    manager, _, pool, values = store()
    kept = dict(swap_in(manager, values, pool))
    assert pool.in_use == 0  # to_compute gave every buffer back
    for key, v in values.items():
        torch.testing.assert_close(kept[key], v, rtol=0, atol=0)
        manager.drop_compute(key)


def test_a_buffer_held_elsewhere_shrinks_the_window_instead_of_deadlocking(store):
    manager, handle, pool, values = store()
    slot, _ = pool.acquire(1)  # say a prefetched partition holds one buffer for the whole swap-in
    got = []

    def run():
        for key, _t in swap_in(manager, values, pool, depth=BUFFERS):
            manager.drop_compute(key)
            got.append(key)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "swap_in waited on a buffer only it could free"
    assert got == list(values) and handle.peak_outstanding == BUFFERS - 1
    pool.release(slot)
    assert pool.in_use == 0


def test_stopping_early_gives_every_buffer_back(store):
    manager, handle, pool, values = store()
    first = next(iter(values))
    stream = swap_in(manager, values, pool)
    key, _ = next(stream)
    assert key == first and handle.outstanding == BUFFERS - 1
    stream.close()
    assert pool.in_use == 0 and handle.outstanding == 0
    assert manager.state(first) is State.ON_COMPUTE  # the caller has it, and drops it
    assert all(manager.state(k) is State.ON_NVME for k in list(values)[1:])
    manager.drop_compute(first)
    manager.check_healthy()
    assert [k for k, _ in swap_in(manager, values, pool) if manager.drop_compute(k) is None] == list(values)


def test_a_failed_read_gives_every_buffer_back_and_latches_the_failure(store):
    manager, handle, pool, values = store(fail_read=2)  # the second read fails
    got = []
    with pytest.raises(AioError, match="injected"):
        for key, _t in swap_in(manager, values, pool):
            manager.drop_compute(key)
            got.append(key)
    assert got == [next(iter(values))]
    assert pool.in_use == 0 and handle.outstanding == 0
    assert all(manager.state(k) is State.ON_NVME for k in values)
    with pytest.raises(EngineFailed):
        next(swap_in(manager, values, pool))


def test_reads_overlap(store):
    """With each read taking at least `delay`, a window of 3 takes about a third of the serial time."""
    manager, handle, pool, values = store(delay=0.05)

    def seconds(depth):
        start = time.monotonic()
        for key, _t in swap_in(manager, values, pool, depth):
            manager.drop_compute(key)
        return time.monotonic() - start

    serial, windowed = seconds(1), seconds(BUFFERS)
    assert serial >= len(SIZES) * 0.05
    assert windowed < 0.6 * serial, (windowed, serial)


def test_a_prefetched_partition_is_finished_not_read_again_and_start_is_the_callers(store):
    manager, handle, pool, values = store()
    keys = list(values)
    manager.start_read(keys[2])  # a prefetch that began before the swap-in
    started = []

    def start(key):
        started.append(key)
        manager.start_read(key)

    for key, got in swap_in(manager, keys, pool, start=start):
        torch.testing.assert_close(got, values[key], rtol=0, atol=0)
        manager.drop_compute(key)
    assert started == keys[:2] + keys[3:] and handle.reads == len(keys)
    assert pool.in_use == 0 and pool.peak_in_use <= BUFFERS


def test_nvme_home_fetch_many_overlaps_reads_and_keeps_max_in_cpu_copies(tmp_path):
    from infinity.swap.params import NvmeHome

    shapes = {i: torch.Size([n]) for i, n in enumerate(SIZES)}
    handle = CountingHandle(open_handle(AioConfig(), direct=DirectPolicy.REQUIRE))
    manager = MemoryManager(handle, NvmeStore(tmp_path), torch.device("cpu"))
    pool = BufferPool("param", BUFFERS, max(SIZES) * 2, "offload_param.buffer_count")
    kept_budget = SIZES[0] + SIZES[1]  # the first two parameters keep their host copies
    try:
        home = NvmeHome(manager, pool, {i: f"p{i}" for i in shapes}, shapes, torch.bfloat16, max_in_cpu=kept_budget)
        manager.store.reserve()
        torch.manual_seed(0)
        values = {i: torch.randn(s).to(torch.bfloat16) for i, s in shapes.items()}
        for i, v in values.items():
            home.put(i, v)
        for round_ in range(2):
            reads = handle.reads
            got = list(home.fetch_many(list(shapes)))
            assert [i for i, _ in got] == list(shapes)
            for i, t in got:
                torch.testing.assert_close(t, values[i], rtol=0, atol=0)
                home.release(i)
            assert handle.reads - reads == (len(SIZES) if round_ == 0 else len(SIZES) - 2)
            assert handle.peak_outstanding == BUFFERS and pool.in_use == 0
        assert home.kept == {0, 1}
    finally:
        manager.close()
        handle._handle.close()

"""NvmeHome over a real manager and real libaio: reads started ahead (up to offload_param.buffer_count)
arrive equal and in order, the pool is never overcommitted, a read given up returns its buffer, and
max_in_cpu copies are kept so that later rounds skip NVMe for them."""
from __future__ import annotations

import contextlib

import threading

import torch

from infinity.config.aio import AioConfig
from infinity.io import DirectPolicy, open_handle
from infinity.memory.manager import MemoryManager
from infinity.memory.nvme_store import NvmeStore
from infinity.memory.record import State
from infinity.memory.pool import BufferPool
from infinity.swap.params import NvmeHome

SIZES = [1, 199, 4096 * 10 // 2, 3000, 777, 2048, 5, 10_000, 1, 4097]  # elements, odd and aligned
BUFFERS = 3


class CountingHandle:
    """A real handle that counts reads submitted and not yet waited for."""

    def __init__(self, handle):
        self._handle = handle
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
        return _Future(self, future)


class _Future:
    def __init__(self, owner, future):
        self.owner, self.future, self.waited = owner, future, False

    def done(self):
        return self.future.done()

    def wait(self):
        n = self.future.wait()
        if not self.waited:
            self.waited = True
            with self.owner._lock:
                self.owner.outstanding -= 1
        return n


@contextlib.contextmanager
def home_on_disk(tmp_path, max_in_cpu: int = 0):
    """An NvmeHome over real O_DIRECT swap files holding random values; closed (manager, then handle) after."""
    shapes = {i: torch.Size([n]) for i, n in enumerate(SIZES)}
    handle = CountingHandle(open_handle(AioConfig(), direct=DirectPolicy.REQUIRE))
    manager = MemoryManager(handle, NvmeStore(tmp_path), torch.device("cpu"))
    pool = BufferPool("param", BUFFERS, max(SIZES) * 2, "offload_param.buffer_count")
    home = NvmeHome(manager, pool, {i: f"p{i}" for i in shapes}, shapes, torch.bfloat16, max_in_cpu=max_in_cpu)
    manager.store.reserve()
    torch.manual_seed(0)
    values = {i: torch.randn(s).to(torch.bfloat16) for i, s in shapes.items()}
    try:
        for i, v in values.items():
            home.put(i, v)
        yield home, handle, pool, values
    finally:
        manager.close()
        handle._handle.close()


def read_through(home: NvmeHome, values) -> None:
    """Every parameter in order, reads kept ahead as far as the pool allows (as the coordinator does)."""
    ahead = 0  # the next parameter to read ahead
    for i in values:
        ahead = max(ahead, i)
        while ahead < len(values) and home.read_ahead(ahead):
            ahead += 1
        torch.testing.assert_close(home.fetch(i), values[i], rtol=0, atol=0)
        home.release(i)


def test_reads_ahead_overlap_and_keep_max_in_cpu_copies(tmp_path):
    kept_budget = SIZES[0] + SIZES[1]  # the first two parameters keep their host copies
    with home_on_disk(tmp_path, max_in_cpu=kept_budget) as (home, handle, pool, values):
        for round_ in range(2):
            reads = handle.reads
            read_through(home, values)
            assert handle.reads - reads == (len(SIZES) if round_ == 0 else len(SIZES) - 2)
            assert pool.in_use == 0 and pool.peak_in_use <= BUFFERS
        assert handle.peak_outstanding > 1  # reads were in flight together
        assert home.kept == {0, 1}
        assert all(home.manager.state(home.key(i)) is State.HOST_CLEAN for i in home.kept)


def test_read_ahead_refuses_when_the_pool_is_out_and_cancel_gives_the_buffer_back(tmp_path):
    with home_on_disk(tmp_path) as (home, handle, pool, values):
        assert all(home.read_ahead(i) for i in range(BUFFERS))
        assert not home.read_ahead(BUFFERS) and pool.in_use == BUFFERS  # nothing started
        home.cancel(0)
        assert pool.in_use == BUFFERS - 1 and home.manager.state(home.key(0)) is State.ON_NVME
        assert home.read_ahead(BUFFERS)
        for i in (1, 2, BUFFERS):
            torch.testing.assert_close(home.fetch(i), values[i], rtol=0, atol=0)
            home.release(i)
        assert pool.in_use == 0


def test_the_coordinators_residency_moves_the_managers_own_record(tmp_path):
    """One record per partition: residency (users, read ahead) and transfer state on the same object."""
    from infinity.memory.record import Residency
    from infinity.memory.residency import Residence

    with home_on_disk(tmp_path) as (home, handle, pool, values):
        record = home.record(0)
        assert record is home.manager.record(home.key(0))
        residence = Residence([home.record(i) for i in values], offloaded=values)
        assert home.read_ahead(0)
        residence.read_ahead(0)
        assert record.residency is Residency.READ_AHEAD and record.state is State.READING
        torch.testing.assert_close(home.fetch(0), values[0], rtol=0, atol=0)
        residence.use(0)
        assert record.residency is Residency.IN_USE and record.users == 1 and record.state is State.ON_COMPUTE
        residence.leave(0)
        residence.rest(0)
        home.release(0)
        assert record.residency is Residency.AT_REST and record.state is State.ON_NVME and pool.in_use == 0

"""The memory manager's CPU compute tier without copies: staging buffers lent as compute copies (within
the pool's reserve, replaced when a tensor outside still views them), and new values held in a staging
buffer after their write (write with AfterWrite.HOLD), with real swap files and real libaio."""
from __future__ import annotations

import pytest
import torch

from infinity.config.aio import AioConfig
from infinity.errors import InfinityError
from infinity.io import DirectPolicy, open_handle
from infinity.memory.manager import MemoryManager
from infinity.memory.nvme_store import NvmeStore
from infinity.memory.record import State
from infinity.memory.policy import AfterWrite
from infinity.memory.pool import BufferPool

SIZES = {"a": 4096 * 3, "b": 1000, "c": 4097, "d": 2048}  # bf16 elements: whole blocks and not
BUFFERS = 3


@pytest.fixture
def parts(tmp_path):
    handle = open_handle(AioConfig(), direct=DirectPolicy.REQUIRE)
    manager = MemoryManager(handle, NvmeStore(tmp_path), torch.device("cpu"))
    pool = BufferPool("param", BUFFERS, 2 * max(SIZES.values()) + 4096, "offload_param.buffer_count")
    torch.manual_seed(0)
    values = {k: torch.randn(n).to(torch.bfloat16) for k, n in SIZES.items()}
    for k, v in values.items():
        manager.add(k, v.numel(), torch.bfloat16, region="param", pool=pool)
    manager.store.reserve()
    for k, v in values.items():
        manager.write_through(k, v)
    yield manager, pool, values
    manager.close()
    handle.close()


def fetch(manager: MemoryManager, key: str) -> torch.Tensor:
    return manager.fetch(key).wait()


def shares(t: torch.Tensor, pool: BufferPool) -> bool:
    return any(t.untyped_storage().data_ptr() == b.tensor.untyped_storage().data_ptr() for b in pool._all)


def test_without_lending_to_compute_copies_and_gives_the_buffer_back(parts):
    manager, pool, values = parts
    got = fetch(manager, "a")
    assert not shares(got, pool) and pool.in_use == 0
    assert torch.equal(got, values["a"])
    manager.release("a")


def test_a_lent_buffer_is_the_compute_copy_until_release(parts):
    manager, pool, values = parts
    manager.lend_to_compute(pool, reserve=1)
    got = fetch(manager, "a")
    assert shares(got, pool) and pool.in_use == 1  # no copy: the staging buffer itself
    assert torch.equal(got, values["a"]) and manager.state("a") is State.ON_COMPUTE
    assert manager.ledger.report().compute_bytes == got.numel() * 2
    del got
    manager.release("a")
    assert pool.in_use == 0 and manager.state("a") is State.ON_NVME and pool.replaced == 0
    assert manager.ledger.report().host_bytes == 0 and manager.ledger.report().compute_bytes == 0


def test_past_the_reserve_to_compute_copies(parts):
    manager, pool, values = parts
    manager.lend_to_compute(pool, reserve=1)  # 3 buffers: at most 2 lent, one stays for reads
    got = {k: fetch(manager, k) for k in ("a", "b", "c")}
    assert [shares(got[k], pool) for k in "abc"] == [True, True, False]
    assert pool.in_use == 2
    assert all(torch.equal(got[k], values[k]) for k in got)
    for k in got:
        manager.release(k)
    assert pool.in_use == 0


def test_a_buffer_still_viewed_at_drop_is_replaced_and_the_view_keeps_its_values(parts):
    manager, pool, values = parts
    manager.lend_to_compute(pool, reserve=1)
    saved = fetch(manager, "a").view(-1)[:100]  # as autograd would save a weight for backward
    want = values["a"][:100].clone()
    manager.release("a")
    assert pool.replaced == 1 and pool.in_use == 0
    for k in ("b", "c", "d", "a"):  # every buffer of the pool is read into again
        fetch(manager, k)
        manager.release(k)
    assert torch.equal(saved, want)  # its memory was never lent again


def test_a_held_write_keeps_the_new_values_in_a_staging_buffer_and_on_nvme(parts):
    manager, pool, values = parts
    new = torch.randn(SIZES["c"])  # fp32, converted as it is copied
    manager.write("c", new, AfterWrite.HOLD, torch.bfloat16)
    manager.flush({"c"})
    assert manager.state("c") is State.HOST_CLEAN and pool.in_use == 1 and manager.ready("c")
    assert torch.equal(manager.to_compute("c"), new.to(torch.bfloat16))  # no read: the held copy
    manager.release("c")
    assert pool.in_use == 0
    assert torch.equal(fetch(manager, "c"), new.to(torch.bfloat16))  # and the swap file has them
    manager.release("c")


def test_a_held_write_refuses_a_partition_not_at_rest(parts):
    manager, pool, values = parts
    manager.fetch("a")  # a read in flight
    with pytest.raises(InfinityError, match="holding new values needs"):
        manager.write("a", torch.zeros(SIZES["a"]), AfterWrite.HOLD, torch.bfloat16)
    manager.cancel("a")
    assert manager.state("a") is State.ON_NVME and pool.in_use == 0
    small = BufferPool("small", 1, 1000 * 2, "offload_param.buffer_count")
    assert small.buffer_bytes == 4096  # a pool's buffers hold whole blocks, as a transfer of an extent moves


def test_a_cancelled_fetch_gives_its_buffer_back(parts):
    manager, pool, values = parts
    handle = manager.fetch("d")
    while not handle.ready():
        pass
    manager.cancel("d")
    assert manager.state("d") is State.ON_NVME and pool.in_use == 0


def test_advance_does_nothing_on_cpu(parts):
    manager, pool, values = parts
    handle = manager.fetch("d")
    assert manager.advance("d") is False
    assert torch.equal(handle.wait(), values["d"])
    manager.release("d")


def test_keep_gives_a_kept_partition_a_copy_of_its_own_and_the_buffer_back(parts):
    manager, pool, values = parts
    manager.lend_to_compute(pool, reserve=1)
    lent = fetch(manager, "a")
    assert manager.lent("a") and pool.in_use == 1
    del lent
    own = manager.keep("a")
    assert not manager.lent("a") and not shares(own, pool) and torch.equal(own, values["a"])
    assert pool.in_use == 0 and pool.replaced == 0 and manager.state("a") is State.ON_COMPUTE
    assert manager.keep("a") is own  # not lent: unchanged
    manager.release("a")
    assert manager.state("a") is State.ON_NVME and manager.ledger.report().compute_bytes == 0

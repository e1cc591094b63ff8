"""[Note: a partition inside another] (infinity/memory/views.py) over a real manager, real libaio and real
O_DIRECT files with checksums on: a view reads its range of the base's file, checked; while the base holds a
host copy the view copies from it and asks the drive for nothing; a view's own write reaches the base's
file and its host copy; `updated` gives a view a held copy without a write; a partition with an extent of
its own moves into the base; ranges that do not fit are refused by name.  [Note: a follower]: a bf16
partition that follows the base converts from the base's host copy while it has no values of its own."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from infinity.config.aio import AioConfig
from infinity.errors import EngineFailed, InfinityError, SwapChecksumError
from infinity.io import DirectPolicy, open_handle
from infinity.memory.manager import MemoryManager
from infinity.memory.nvme_store import NvmeStore
from infinity.memory.policy import AfterWrite, Origin
from infinity.memory.pool import BufferPool
from infinity.memory.record import State

BLOCK = 4096 // 4  # fp32 elements per 4096-byte block
VIEWS = {"v0": (0, 1000), "v1": (BLOCK, BLOCK), "v2": (2 * BLOCK, 5)}  # key: (first element, elements)
BASE = 3 * BLOCK


@contextlib.contextmanager
def family(tmp_path):
    """A base of three blocks in a "master" file, with the three views above; the base holds 0, 1, 2, ...
    and zero padding (as the optimizer's master does)."""
    handle = open_handle(AioConfig(), direct=DirectPolicy.REQUIRE)
    manager = MemoryManager(handle, NvmeStore(tmp_path), torch.device("cpu"))
    base_pool = BufferPool("optimizer", 2, BASE * 4, "offload_optimizer.buffer_count")
    view_pool = BufferPool("param", 2, BLOCK * 4, "offload_param.buffer_count")
    manager.add("base", BASE, torch.float32, region="master", pool=base_pool)
    for key, (start, numel) in VIEWS.items():
        manager.share(key, "base", start * 4, numel, torch.float32, view_pool)
    manager.store.reserve()
    manager.write_through("base", padded_values(0.0))
    try:
        yield manager, handle
    finally:
        manager.close()
        handle.close()


def padded_values(shift: float) -> torch.Tensor:
    values = torch.zeros(BASE)
    for start, numel in VIEWS.values():
        values[start:start + numel] = torch.arange(numel, dtype=torch.float32) + start + shift
    return values


def read(manager: MemoryManager, key: str) -> torch.Tensor:
    manager.start_read(key)
    values = manager.finish_read(key).clone()
    manager.drop(key)
    return values


def test_a_view_reads_its_range_of_the_base_and_a_flipped_byte_there_is_caught(tmp_path):
    with family(tmp_path) as (manager, handle):
        for key, (start, numel) in VIEWS.items():
            assert torch.equal(read(manager, key), padded_values(0.0)[start:start + numel])
        assert not list(tmp_path.rglob("param.swp"))  # the views take no space of their own
        _, extent = manager.store.extents("master")[0]
        fd = os.open(extent.path, os.O_RDWR)
        try:
            at = extent.offset + VIEWS["v1"][0] * 4 + 100
            os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x10]), at)
        finally:
            os.close(fd)
        assert torch.equal(read(manager, "v0"), padded_values(0.0)[:1000])  # its range is untouched
        with pytest.raises(SwapChecksumError) as err:
            read(manager, "v1")
        assert err.value.partition == "v1" and err.value.offset == extent.offset + VIEWS["v1"][0] * 4
        with pytest.raises(EngineFailed):
            read(manager, "v0")


def test_while_the_base_holds_newer_values_a_view_copies_them_without_a_request(tmp_path):
    with family(tmp_path) as (manager, handle):
        manager.stage("base", padded_values(0.5))
        manager.start_write("base")  # in flight, as the optimizer leaves it beside the next forward
        read_bytes = handle.stats.bytes_read
        for key, (start, numel) in VIEWS.items():
            assert torch.equal(read(manager, key), padded_values(0.5)[start:start + numel])
        assert handle.stats.bytes_read == read_bytes  # no read asked of the drive
        manager.finish_write("base")
        manager.drop("base")
        assert torch.equal(read(manager, "v1"), padded_values(0.5)[BLOCK:2 * BLOCK])  # from the file now
        assert handle.stats.bytes_read == read_bytes + BLOCK * 4


def test_a_views_own_write_reaches_the_bases_file_and_host_copy(tmp_path):
    with family(tmp_path) as (manager, handle):
        manager.start_read("base")
        manager.finish_read("base")  # the base holds a clean host copy
        new = torch.full((5,), -7.0)
        manager.write_part("v2", 0, new, staging=manager._entry("v2").pool)
        assert torch.equal(manager.host_view("base")[2 * BLOCK:2 * BLOCK + 5], new)
        manager.flush()
        manager.drop("base")
        after = read(manager, "base")  # from the file, checked against the view's write
        want = padded_values(0.0)
        want[2 * BLOCK:2 * BLOCK + 5] = new
        assert torch.equal(after, want)


def test_updated_holds_a_copy_without_writing(tmp_path):
    with family(tmp_path) as (manager, handle):
        written = handle.stats.bytes_written
        manager.updated("v1", torch.full((BLOCK,), 3.0), AfterWrite.HOLD)
        manager.updated("v0", torch.full((1000,), 4.0), AfterWrite.DROP)  # nothing held: nothing to do
        assert manager.state("v1") is State.READING and manager.ready("v1")
        assert manager.state("v0") is State.ON_NVME
        assert torch.equal(manager.finish_read("v1"), torch.full((BLOCK,), 3.0))
        assert handle.stats.bytes_written == written
        with pytest.raises(InfinityError, match="'base' is not part of another"):
            manager.updated("base", torch.zeros(BASE), AfterWrite.HOLD)


def test_a_partition_with_its_own_extent_moves_into_the_base(tmp_path):
    with family(tmp_path) as (manager, handle):
        pool = manager._entry("v0").pool
        manager.add("old", 300, torch.float32, region="param", pool=pool)
        manager.store.reserve()
        manager.write_through("old", torch.full((300,), 9.0))
        manager.write_through("base", padded_values(1.0))
        manager.share("old", "base", BLOCK * 4, 300, torch.float32, pool)
        assert torch.equal(read(manager, "old"), padded_values(1.0)[BLOCK:BLOCK + 300])


@pytest.mark.parametrize("offset, numel, why", [(100, 10, "not aligned"), (2 * BLOCK * 4, BLOCK + 1, "past the end")])
def test_a_range_that_does_not_fit_is_refused_by_name(tmp_path, offset, numel, why):
    with family(tmp_path) as (manager, handle):
        pool = manager._entry("v0").pool
        with pytest.raises(InfinityError, match=r"partition 'bad' cannot be bytes .* of 'base'"):
            manager.share("bad", "base", offset, numel, torch.float32, pool)
        with pytest.raises(InfinityError, match="cannot be bytes"):
            manager.share("bad", "v0", 0, 10, torch.float32, pool)  # a view has no views


def test_a_follower_converts_from_the_followed_host_copy_until_it_has_values_of_its_own(tmp_path):
    with family(tmp_path) as (manager, handle):
        pool = manager._entry("v0").pool
        manager.add("half", 1000, torch.bfloat16, region="param", pool=pool)
        manager.store.reserve()
        manager.follow("half", "base", 0)
        new = padded_values(0.5)
        manager.write("half", new[:1000], AfterWrite.DROP, torch.bfloat16, Origin.FOLLOWED)  # the step's write
        manager.flush()
        manager.stage("base", new)
        manager.start_write("base")  # in flight, its buffer held, as after a step
        read_bytes = handle.stats.bytes_read
        assert torch.equal(read(manager, "half"), new[:1000].to(torch.bfloat16))
        assert handle.stats.bytes_read == read_bytes  # converted from the base's buffer, not read
        own = torch.full((1000,), 2.0)
        manager.write("half", own, AfterWrite.DROP, torch.bfloat16)  # values of its own (GatheredParameters)
        manager.flush()
        assert torch.equal(read(manager, "half"), own.to(torch.bfloat16))  # from its file, not the base's copy
        assert handle.stats.bytes_read > read_bytes
        manager.finish_write("base")
        manager.drop("base")
        with pytest.raises(InfinityError, match="'half' .* cannot follow bytes from 10240 of 'base'"):
            manager.follow("half", "base", 10240)  # its 1000 elements would run past the end

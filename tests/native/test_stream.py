"""Streamed copies through a few staging buffers (infinity/memory/stream.py) and the memory manager's
copy_out / copy_in between a swap extent and another file: real files, both backends, odd sizes."""
from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch

from infinity.checkpoint.checksum import Hashed, StreamDigest
from infinity.errors import InfinityError
from infinity.io import Access, open_file
from infinity.memory import HostBuffer
from infinity.memory.manager import MemoryManager
from infinity.memory.nvme_store import ALIGNMENT, NvmeStore
from infinity.memory.pool import BufferPool
from infinity.memory.stream import Chain, FileEnd, HostPart, SwapPart, SwapRange, TensorEnd, _runs, copy


def staging(count: int, nbytes: int = 2 * ALIGNMENT) -> list[HostBuffer]:
    return [HostBuffer(nbytes, zero=False) for _ in range(count)]


@pytest.mark.parametrize("nbytes", [1, ALIGNMENT, 5 * ALIGNMENT, 7 * ALIGNMENT + 199])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_file_to_file_copies_every_byte_and_shows_them_in_order(tmp_path, make_handle, nbytes, count):
    data = os.urandom(nbytes)
    (tmp_path / "src").write_bytes(os.urandom(2 * ALIGNMENT) + data + os.urandom(100))
    handle = make_handle()
    seen = hashlib.sha256()
    with open_file(tmp_path / "src", Access.READ) as src, open_file(tmp_path / "dst", Access.WRITE) as dst:
        copy(handle, FileEnd(src, 2 * ALIGNMENT), FileEnd(dst, ALIGNMENT), nbytes, staging(count),
             lambda chunk: seen.update(chunk.numpy()))
    assert (tmp_path / "dst").read_bytes()[ALIGNMENT:] == data
    assert seen.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("count", [1, 2, 4])
def test_a_checksum_on_another_thread_keeps_each_buffer_until_it_is_done(tmp_path, make_handle, count):
    """seen hands back a completion that a slow worker thread finishes: no staging buffer is read into
    again before its chunk was hashed, so the digest is the data's (checkpoint/checksum.py)."""
    data = os.urandom(9 * ALIGNMENT + 77)
    (tmp_path / "src").write_bytes(data)
    handle = make_handle()
    reused: list[int] = []

    class SlowDigest(StreamDigest):
        def update(self, chunk: torch.Tensor) -> Hashed:
            first = bytes(chunk.numpy())

            def later() -> None:
                time.sleep(0.01)
                if bytes(chunk.numpy()) != first:
                    reused.append(chunk.data_ptr())
                self._digest.update(first)
            return Hashed(self._worker.submit(later))

    with open_file(tmp_path / "src", Access.READ) as src, open_file(tmp_path / "dst", Access.WRITE) as dst, \
            SlowDigest(algorithm="sha256") as digest:
        copy(handle, FileEnd(src, 0), FileEnd(dst, 0), len(data), staging(count), digest.update)
        assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert reused == []
    assert (tmp_path / "dst").read_bytes()[:len(data)] == data


def test_tensor_ends_pad_with_zeros_and_drop_the_padding(tmp_path, make_handle):
    values = torch.arange(1000, dtype=torch.float32)  # 4000 bytes, stored as 4096
    handle = make_handle()
    with open_file(tmp_path / "f", Access.READ_WRITE) as f:
        copy(handle, TensorEnd(values), FileEnd(f, 0), ALIGNMENT, staging(2))
        raw = (tmp_path / "f").read_bytes()
        assert raw[:4000] == values.numpy().tobytes() and raw[4000:] == bytes(96)
        back = torch.zeros(1000)
        copy(handle, FileEnd(f, 0), TensorEnd(back), ALIGNMENT, staging(2))
    assert torch.equal(back, values)


@pytest.mark.parametrize("count", [1, 3, 4])
def test_a_chain_streams_many_pieces_across_chunk_boundaries(tmp_path, make_handle, count):
    """Pieces of 1, 2 and 5 blocks from two files and a tensor, through chunks of 2 blocks: chunks
    straddle pieces, and every byte lands in order."""
    a, b = os.urandom(8 * ALIGNMENT), os.urandom(8 * ALIGNMENT)
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(b)
    values = torch.arange(3 * ALIGNMENT // 4, dtype=torch.float32)
    handle = make_handle()
    with open_file(tmp_path / "a", Access.READ) as fa, open_file(tmp_path / "b", Access.READ) as fb, \
            open_file(tmp_path / "out", Access.READ_WRITE) as out:
        chain = Chain(((FileEnd(fa, 3 * ALIGNMENT), ALIGNMENT), (TensorEnd(values), 3 * ALIGNMENT),
                       (FileEnd(fb, 0), 2 * ALIGNMENT), (FileEnd(fa, 0), 5 * ALIGNMENT)))
        copy(handle, chain, FileEnd(out, ALIGNMENT), chain.nbytes, staging(count))
        want = a[3 * ALIGNMENT:4 * ALIGNMENT] + values.numpy().tobytes() + b[:2 * ALIGNMENT] + a[:5 * ALIGNMENT]
        assert (tmp_path / "out").read_bytes()[ALIGNMENT:] == want
        back = torch.zeros_like(values)
        into = Chain(((TensorEnd(torch.zeros(1024)), ALIGNMENT), (TensorEnd(back), 3 * ALIGNMENT)))
        copy(handle, FileEnd(out, ALIGNMENT), into, into.nbytes, staging(count))
    assert torch.equal(back, values)


def test_a_failed_read_completes_the_others_and_raises(tmp_path, make_handle):
    (tmp_path / "short").write_bytes(os.urandom(3 * ALIGNMENT))
    handle = make_handle()
    with open_file(tmp_path / "short", Access.READ) as src, open_file(tmp_path / "dst", Access.WRITE) as dst:
        with pytest.raises(InfinityError, match="short read"):
            copy(handle, FileEnd(src, 0), FileEnd(dst, 0), 8 * ALIGNMENT, staging(4))


def test_manager_copies_part_of_an_extent_out_and_in(tmp_path, make_handle):
    manager = MemoryManager(make_handle(), NvmeStore(tmp_path), torch.device("cpu"))
    pool = BufferPool("p", 2, 4 * ALIGNMENT, "test")
    try:
        manager.add("x", 3 * ALIGNMENT // 4, torch.float32, region="param", pool=pool)
        manager.store.reserve()
        values = torch.randn(3 * ALIGNMENT // 4)
        manager.write_through("x", values)
        with open_file(tmp_path / "ckpt", Access.READ_WRITE) as f:
            manager.copy_out([SwapRange("x", ALIGNMENT, 2 * ALIGNMENT)], f, 0, staging(2, ALIGNMENT))
            assert (tmp_path / "ckpt").read_bytes() == values.numpy().tobytes()[ALIGNMENT:]
            os.pwrite(f.buffered_fd, bytes(2 * ALIGNMENT), 0)  # zeros go back into the same range
            manager.copy_in([SwapRange("x", ALIGNMENT, 2 * ALIGNMENT)], f, 0, staging(2, ALIGNMENT))
            manager.start_read("x")
            back = manager.finish_read("x").clone()
            with pytest.raises(InfinityError, match="host_dirty; copies to or from a file need it at rest"):
                manager.stage("x")
                manager.copy_out([SwapRange("x", 0, ALIGNMENT)], f, 0, staging(1, ALIGNMENT))
            with pytest.raises(InfinityError, match="not an aligned range"):
                manager.start_write("x")
                manager.finish_write("x")
                manager.copy_in([SwapRange("x", 100, ALIGNMENT)], f, 0, staging(1, ALIGNMENT))
            manager.drop("x")
        first = ALIGNMENT // 4  # elements before the copied range
        assert torch.equal(back[:first], values[:first]) and not back[first:].any()
    finally:
        manager.close()


def test_host_tensors_between_swap_parts_ride_in_their_managers_copy():
    """One pipeline per file (stream._runs): host tensors join the run of the swap parts around them; a
    second manager's part, or a tensor that is not contiguous host memory, starts a new run."""
    first, second = object(), object()
    host = HostPart(torch.zeros(ALIGNMENT // 4))
    strided = HostPart(torch.zeros(8, ALIGNMENT // 32).t())
    parts = [(host, ALIGNMENT), (SwapPart(first, "a"), ALIGNMENT), (host, ALIGNMENT),
             (SwapPart(first, "b"), 2 * ALIGNMENT), (host, ALIGNMENT), (SwapPart(second, "c"), ALIGNMENT),
             (strided, ALIGNMENT), (host, ALIGNMENT)]
    runs = [([p for p, _ in items], pos) for items, pos in _runs(parts, 100)]
    assert [len(r) for r, _ in runs] == [5, 1, 2]
    assert [pos for _, pos in runs] == [100, 100 + 6 * ALIGNMENT, 100 + 7 * ALIGNMENT]
    assert runs[1][0][0].manager is second and runs[2][0][0] is strided


def test_a_partition_never_written_reads_as_zeros_without_the_drive(tmp_path, make_handle):
    """[Note: an extent never written reads as zeros] (memory/manager.py): the buffer a start_read borrows
    for a partition nothing was written into is zeroed, with no request to the drive, even when it held
    other bytes; once anything is written into the extent (write_part, a write, a checkpoint's copy_in),
    reads go to the drive and return those bytes."""
    handle = make_handle()
    manager = MemoryManager(handle, NvmeStore(tmp_path), torch.device("cpu"))
    pool = BufferPool("p", 1, 2 * ALIGNMENT, "test")
    n = 2 * ALIGNMENT // 4
    try:
        for key in ("moments", "part", "loaded"):
            manager.add(key, n, torch.float32, region="optimizer", pool=pool)
        manager.store.reserve()
        pool.acquire(2 * ALIGNMENT)[1].tensor.fill_(7)  # the pool's buffer holds other bytes
        pool.release(0)
        requests = handle.stats.requests
        manager.start_read("moments")
        assert manager.ready("moments") and not manager.finish_read("moments").any()
        manager.drop("moments")
        assert handle.stats.requests == requests
        values = torch.randn(n)
        manager.write_part("part", ALIGNMENT, values[:n // 2], staging=pool)
        manager.flush()
        manager.start_read("part")
        part = manager.finish_read("part").clone()
        manager.drop("part")
        assert not part[:n // 2].any() and torch.equal(part[n // 2:], values[:n // 2])
        with open_file(tmp_path / "ckpt", Access.READ_WRITE) as f:
            os.pwrite(f.buffered_fd, values.numpy().tobytes(), 0)
            manager.copy_in([SwapRange("loaded", 0, 2 * ALIGNMENT)], f, 0, staging(2, ALIGNMENT))
        manager.start_read("loaded")
        assert torch.equal(manager.finish_read("loaded"), values)
        manager.drop("loaded")
        assert handle.stats.requests > requests
    finally:
        manager.close()

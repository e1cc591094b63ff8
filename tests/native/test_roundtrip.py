"""Byte-exact round trips through both backends at awkward sizes and offsets."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from infinity.io import DirectPolicy, open_file
from infinity.io.files import Access
from infinity.memory import HostBuffer

SIZES = [1, 4095, 4096, 199 * 4096 + 17, 64 << 20]
OFFSETS = [0, 4096 * 3, 4096 * 3 + 5]


def aligned_copy(data: bytes) -> HostBuffer:
    buf = HostBuffer(len(data))
    buf.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    return buf


@pytest.mark.parametrize("nbytes", SIZES, ids=lambda n: f"{n}B")
@pytest.mark.parametrize("offset", OFFSETS, ids=lambda o: f"off{o}")
def test_aligned_buffer_round_trip(make_handle, tmp_path, nbytes, offset):
    data = os.urandom(nbytes)
    h = make_handle()
    path = tmp_path / "f.bin"
    assert h.pwrite(aligned_copy(data).tensor, path, offset) == nbytes
    assert path.read_bytes()[offset:] == data  # what landed on disk, read back by plain Python
    out = HostBuffer(nbytes)
    assert h.pread(out.tensor, path, offset) == nbytes
    assert out.numpy().tobytes() == data


@pytest.mark.parametrize("nbytes", SIZES[:4], ids=lambda n: f"{n}B")
def test_unaligned_buffers_round_trip(make_handle, tmp_path, nbytes):
    data = os.urandom(nbytes)
    h = make_handle()
    path = tmp_path / "g.bin"
    src = bytearray(b"x" + data)  # one byte in: the buffer is not 4096-aligned
    h.pwrite(memoryview(src)[1:], path, 7)
    dst = np.zeros(nbytes + 1, dtype=np.uint8)
    h.pread(dst[1:], path, 7)
    assert dst[1:].tobytes() == data


def test_direct_path_bypasses_page_cache_for_aligned_body(tmp_path):
    from infinity.config.aio import AioConfig, Backend
    from infinity.io import open_handle

    nbytes = 199 * 4096 + 17
    with open_handle(AioConfig(backend=Backend.LIBAIO, block_size=65536), direct=DirectPolicy.REQUIRE) as h:
        h.pwrite(aligned_copy(os.urandom(nbytes)).tensor, tmp_path / "d.bin")
        assert h.stats.direct_bytes == 199 * 4096  # the 17-byte tail went through the buffered descriptor
        assert h.stats.bytes_written == nbytes


def test_torch_and_numpy_see_host_buffer_without_copy():
    buf = HostBuffer(1 << 21)
    assert buf.address % 4096 == 0
    floats = buf.view(torch.float32)
    floats[3] = 1.5
    assert buf.numpy().view(np.float32)[3] == 1.5
    assert floats.data_ptr() == buf.address


def test_open_file_reused_across_transfers(make_handle, tmp_path):
    h = make_handle()
    data = os.urandom(3 * 65536)
    with open_file(tmp_path / "r.bin", Access.READ_WRITE) as f:
        futures = [h.submit_write(aligned_copy(data[i:i + 65536]).tensor, f, i) for i in range(0, len(data), 65536)]
        assert sum(fu.wait() for fu in futures) == len(data)
        out = HostBuffer(len(data))
        h.pread(out.tensor, f, 0)
    assert out.numpy().tobytes() == data

"""The NVMe store: aligned extents in per-run, per-rank swap files, cleaned up at close and on restart."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from infinity.config.aio import AioConfig
from infinity.errors import CapacityError, InfinityError, NvmePathError
from infinity.io import DirectPolicy, open_handle
from infinity.memory import HostBuffer
from infinity.memory.nvme_store import ALIGNMENT, SWAP_DIR, NvmeStore


def test_extents_are_aligned_and_private(tmp_path):
    with NvmeStore(tmp_path, rank=3) as store:
        a = store.allocate("a", 10)
        b = store.allocate("b", 5000)
        c = store.allocate("c", 3, region="optimizer")
        assert (a.offset, b.offset, c.offset) == (0, ALIGNMENT, 0)
        assert b.capacity == 2 * ALIGNMENT and store.planned_bytes == 4 * ALIGNMENT
        assert f"rank-3{os.sep}run-{os.getpid()}" in a.path
        assert stat.S_IMODE(os.stat(a.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(store.folder).st_mode) == 0o700
        with pytest.raises(InfinityError, match="already allocated"):
            store.allocate("a", 1)
        folder = store.folder
    assert not folder.exists()  # removed at close


def test_extents_take_direct_io_round_trips(tmp_path):
    data = [os.urandom(n) for n in (4096, 12345, 1)]
    with NvmeStore(tmp_path) as store, open_handle(AioConfig(), direct=DirectPolicy.REQUIRE) as h:
        extents = [store.allocate(f"k{i}", len(d)) for i, d in enumerate(data)]
        store.reserve()
        for d, e in zip(data, extents):
            buf = HostBuffer(len(d))
            buf.numpy()[:] = list(d)
            h.pwrite(buf.tensor, e.path, e.offset)
        for d, e in zip(data, extents):
            out = HostBuffer(e.nbytes)
            h.pread(out.tensor, e.path, e.offset)
            assert out.numpy().tobytes() == d


def test_folders_of_dead_runs_are_removed_on_the_next_start(tmp_path):
    # A real process makes a store and dies without closing it.
    code = ("import os, sys; from infinity.memory.nvme_store import NvmeStore; "
            f"s = NvmeStore({str(tmp_path)!r}); s.allocate('x', 10); print(s.folder); os._exit(0)")
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.isdir(dead)
    with NvmeStore(tmp_path):
        assert not os.path.exists(dead)


def test_reserve_checks_free_space(tmp_path):
    with NvmeStore(tmp_path) as store:
        store.allocate("huge", 1 << 60)
        with pytest.raises(CapacityError, match="nvme_path"):
            store.reserve()


def test_bad_nvme_path(tmp_path):
    with pytest.raises(NvmePathError, match="does not exist"):
        NvmeStore(tmp_path / "absent", key="offload_param.nvme_path")
    assert not (tmp_path / "absent").exists()
    assert not (tmp_path / SWAP_DIR).exists()


def test_unknown_key(tmp_path):
    with NvmeStore(tmp_path) as store, pytest.raises(InfinityError, match="never allocated"):
        store.extent("nope")

"""Swap integrity (infinity/memory/integrity.py): a byte flipped in a swap file between a write and the
next read of that partition (real O_DIRECT files, real libaio) is a SwapChecksumError naming the file, the
offset and the partition; the run latches failed, and the last checkpoint still loads.  With
"swap_checksum": false nothing is checked (the flip goes unnoticed)."""
from __future__ import annotations

import os

import pytest

from infinity.config.aio import AioConfig, Backend
from infinity.errors import SwapChecksumError
from infinity.memory.integrity import Integrity
from infinity.memory.nvme_store import Extent
from infinity.swap.params import Tier
from infinity.zero import Engine, EngineSettings

from test_faults import assert_refuses_everything
from training_reference import ADAM, fresh_model, make_batches, train


@pytest.fixture(scope="module")
def batches():
    return make_batches()


def settings(nvme_path, integrity: Integrity = Integrity.CRC32C, optimizer_path=None) -> EngineSettings:
    return EngineSettings(param_tier=Tier.NVME, optimizer_tier=Tier.NVME, param_nvme_path=str(nvme_path),
                          optimizer_nvme_path=str(optimizer_path or nvme_path), adam=ADAM, gradient_clipping=1.0,
                          sub_group_size=20_000, aio=AioConfig(backend=Backend.LIBAIO), integrity=integrity)


def flip_byte(engine: Engine, region: str, last: bool) -> tuple[str, str, Extent]:
    """Flips one bit of a real byte of region's first (or last) extent, through a file descriptor of its
    own, as a drive might; returns (the file, the partition's key, its extent)."""
    engine.run.optimizer.settle()  # the step's state writes left in flight are on the drive, not landing later
    for manager in engine.run.managers:
        manager.flush()  # the writes of the bytes to flip are on the drive (a backward's gradients are in flight)
    (manager,) = [m for m in engine.run.managers if m.store.extents(region)]
    key, extent = manager.store.extents(region)[-1 if last else 0]
    at = extent.offset + extent.nbytes // 2
    fd = os.open(extent.path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, at)
        os.pwrite(fd, bytes([byte[0] ^ 0x10]), at)
        os.fsync(fd)
    finally:
        os.close(fd)
    return extent.path, key, extent


def assert_names(err: SwapChecksumError, path: str, key: str, extent: Extent) -> None:
    assert err.path == path and err.partition == key
    assert extent.offset <= err.offset < extent.offset + extent.nbytes
    text = str(err)
    assert path in text and repr(key) in text and f"offset {err.offset}" in text and "checksum" in text
    assert "last checkpoint" in text


# param: the forward's fetch of the last parameter (the first ones may be held from the step); the
# optimizer's states and master weights: the step's read of sub-group 0; grad: the last sub-group's, written
# by backward, read by the step (sub-group 0's gradient stays in host memory until its update: issue 18).
# param: with the optimizer on a path of its own, so that the parameters keep a file of their own (on one
# path their partitions are ranges of the master file: the last test below).
@pytest.mark.parametrize("region", ["param", "exp_avg", "master", "grad"])
def test_flipped_byte_is_caught_at_the_next_read_and_latches(tmp_path, batches, region):
    ckpt = tmp_path / "ckpt"
    (tmp_path / "optimizer").mkdir()
    engine = Engine(fresh_model(), settings(tmp_path, optimizer_path=tmp_path / "optimizer" if region == "param"
                                            else None))
    try:
        train(engine, batches[:1])
        engine.save_checkpoint(str(ckpt))
        if region == "grad":
            engine.backward(engine(*batches[1]))
        path, key, extent = flip_byte(engine, region, last=region in ("param", "grad"))
        with pytest.raises(SwapChecksumError) as err:
            if region == "grad":
                engine.step()
            train(engine, batches[1:3])
        assert_names(err.value, path, key, extent)
        assert_refuses_everything(engine, batches, f"SwapChecksumError: .*{region}.swp")
    finally:
        engine.close()
    resumed = Engine(fresh_model(), settings(tmp_path))
    try:
        resumed.load_checkpoint(str(ckpt))
        assert resumed.global_steps == 1
        train(resumed, batches[1:3])  # the checkpoint taken before the flip trains on
    finally:
        resumed.close()


def test_a_flip_in_a_parameters_range_of_the_master_file_is_caught_at_its_fetch(tmp_path, batches):
    """On one path a parameter's partition is its range of the master file ([Note: a partition inside
    another] in memory/views.py): its read is checked against the master write's checksum, and the error
    names the parameter's partition and the master file."""
    engine = Engine(fresh_model(), settings(tmp_path))
    try:
        train(engine, batches[:1])
        engine.run.optimizer.settle()  # the master's write completes and its buffer goes: reads go to the drive
        i = max(engine.run.offloaded)
        home = engine.run.homes[i]
        key, manager = home.key(i), home.manager
        extent = manager.extent(key)
        assert manager.base_of(key) is not None and extent.path.endswith("master.swp")
        at = extent.offset + extent.nbytes // 2
        fd = os.open(extent.path, os.O_RDWR)
        try:
            os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x10]), at)
        finally:
            os.close(fd)
        with pytest.raises(SwapChecksumError) as err:
            train(engine, batches[1:2])
        assert err.value.partition == key and err.value.path == extent.path
        assert extent.offset <= err.value.offset < extent.offset + extent.nbytes
        assert_refuses_everything(engine, batches, "SwapChecksumError: .*master.swp")
    finally:
        engine.close()


def test_checkpoint_save_checks_what_it_copies(tmp_path, batches):
    """A save streams the extents through copy_out: a flipped byte stops it, and no tag is left behind."""
    ckpt = tmp_path / "ckpt"
    engine = Engine(fresh_model(), settings(tmp_path))
    try:
        train(engine, batches[:1])
        engine.save_checkpoint(str(ckpt))
        train(engine, batches[1:2])
        path, key, extent = flip_byte(engine, "exp_avg_sq", last=False)
        with pytest.raises(SwapChecksumError) as err:
            engine.save_checkpoint(str(ckpt))
        assert_names(err.value, path, key, extent)
        assert sorted(p.name for p in ckpt.iterdir() if not p.name.startswith(".")) == ["global_step1", "latest"]
    finally:
        engine.close()


def test_checkpoint_load_records_checksums(tmp_path, batches):
    """Extents filled by load_checkpoint (copy_in) carry checksums too: a flip after a load is caught."""
    ckpt = tmp_path / "ckpt"
    engine = Engine(fresh_model(), settings(tmp_path))
    try:
        train(engine, batches[:1])
        engine.save_checkpoint(str(ckpt))
        engine.load_checkpoint(str(ckpt))
        path, key, extent = flip_byte(engine, "exp_avg", last=False)
        with pytest.raises(SwapChecksumError) as err:
            train(engine, batches[1:2])
        assert_names(err.value, path, key, extent)
    finally:
        engine.close()


def test_checksum_off_reads_whatever_is_there(tmp_path, batches):
    engine = Engine(fresh_model(), settings(tmp_path, Integrity.NONE))
    try:
        train(engine, batches[:1])
        flip_byte(engine, "exp_avg", last=False)
        train(engine, batches[1:3])  # trains on the changed byte without a word: what the checksum prevents
    finally:
        engine.close()

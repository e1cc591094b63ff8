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


def settings(nvme_path, integrity: Integrity = Integrity.CRC32C) -> EngineSettings:
    return EngineSettings(param_tier=Tier.NVME, optimizer_tier=Tier.NVME, param_nvme_path=str(nvme_path),
                          optimizer_nvme_path=str(nvme_path), adam=ADAM, gradient_clipping=1.0,
                          sub_group_size=20_000, aio=AioConfig(backend=Backend.LIBAIO), integrity=integrity)


def flip_byte(engine: Engine, region: str, last: bool) -> tuple[str, str, Extent]:
    """Flips one bit of a real byte of region's first (or last) extent, through a file descriptor of its
    own, as a drive might; returns (the file, the partition's key, its extent)."""
    (manager,) = engine.run.managers
    manager.flush()  # the writes of the bytes to flip are on the drive (a backward's gradients are in flight)
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
@pytest.mark.parametrize("region", ["param", "exp_avg", "master", "grad"])
def test_flipped_byte_is_caught_at_the_next_read_and_latches(tmp_path, batches, region):
    ckpt = tmp_path / "ckpt"
    engine = Engine(fresh_model(), settings(tmp_path))
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

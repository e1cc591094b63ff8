"""Checkpoint and consolidate errors are CheckpointErrors naming the path and the cause: a deleted rank
folder, a forged client_state.pt, a read-only save folder, a full drive under infinity-consolidate (both
formats).  A failed save leaves no tag folder, a failed consolidate no output (nor a temporary file)."""
from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import crc32c
import pytest

from infinity.checkpoint.format import CLIENT_STATE_FILE, MANIFEST, rank_dir
from infinity.cli.consolidate import EXIT_FAILED, main as consolidate_main
from infinity.errors import CheckpointError
from infinity.swap.params import Tier
from infinity.zero import Engine, EngineSettings

from tmpfs import size_limited_tmpfs
from training_reference import ADAM, fresh_model, make_batches, train

TAG = "global_step1"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A checkpoint folder of the small GPT after one step (world 1)."""
    root = tmp_path_factory.mktemp("saved")
    engine = Engine(fresh_model(), settings(root))
    try:
        train(engine, make_batches()[:1])
        engine.save_checkpoint(str(root / "ckpt"))
    finally:
        engine.close()
    return root / "ckpt"


def settings(swap: Path) -> EngineSettings:
    return EngineSettings(param_tier=Tier.NVME, optimizer_tier=Tier.NVME, param_nvme_path=str(swap),
                          optimizer_nvme_path=str(swap), adam=ADAM, sub_group_size=20_000)


def copy_of(saved: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved, ckpt)
    return ckpt


def load_error(ckpt: Path, tmp_path: Path) -> CheckpointError:
    engine = Engine(fresh_model(), settings(tmp_path))
    try:
        with pytest.raises(CheckpointError) as err:
            engine.load_checkpoint(str(ckpt))
        return err.value
    finally:
        engine.close()


def test_a_deleted_rank_folder_is_named_as_deleted(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    shutil.rmtree(rank_dir(ckpt, TAG, 0))
    err = load_error(ckpt, tmp_path)
    assert err.path == str(rank_dir(ckpt, TAG, 0)) and "no rank folder at all" in str(err)
    assert "deleted" in str(err) and "fewer ranks" not in str(err)


def test_a_forged_client_state_is_a_checkpoint_error_without_torchs_advice(saved, tmp_path):
    """The file holds a pickle that would run a command; the manifest's size and checksum are forged to
    match, so only torch.load(weights_only=True) stands in the way: its refusal is a CheckpointError."""
    ckpt = copy_of(saved, tmp_path)
    folder = rank_dir(ckpt, TAG, 0)
    forged = pickle.dumps(__import__("os").system)  # a global weights_only refuses
    (folder / CLIENT_STATE_FILE).write_bytes(forged)
    manifest = json.loads((folder / MANIFEST).read_text())
    entry = next(f for f in manifest["files"] if f["name"] == CLIENT_STATE_FILE)
    entry["bytes"], entry["checksum"] = len(forged), f"{crc32c.crc32c(forged):08x}"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    err = load_error(ckpt, tmp_path)
    assert err.path == str(folder / CLIENT_STATE_FILE) and "weights_only=True" in str(err)
    assert "weights_only=False" not in str(err) and "weights_only` set to `False" not in str(err)
    assert "altered" in str(err)


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[Path]:
    """A real read-only file system (a tmpfs mounted ro): root, whom permissions do not stop, is refused too."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_saving_into_a_read_only_folder_is_a_checkpoint_error(tmp_path):
    engine = Engine(fresh_model(), settings(tmp_path))
    try:
        train(engine, make_batches()[:1])
        with read_only_folder(tmp_path / "ro") as folder:
            with pytest.raises(CheckpointError) as err:
                engine.save_checkpoint(str(folder / "ckpt"))
            assert str(folder / "ckpt") in err.value.path and "EROFS" in str(err.value)
            assert "read-only" in str(err.value) and isinstance(err.value.__cause__, OSError)
        train(engine, make_batches()[1:2])  # the run goes on
    finally:
        engine.close()


@pytest.mark.parametrize("how", ["safetensors", "torch"])
def test_consolidate_on_a_full_drive_names_the_output_and_leaves_nothing(saved, tmp_path, capsys, how):
    with size_limited_tmpfs(tmp_path / "small", "256k") as folder:
        out = folder / ("model.safetensors" if how == "safetensors" else "model.bin")
        assert consolidate_main([str(saved), str(out), "--format", how]) == EXIT_FAILED
        err = capsys.readouterr().err
        assert str(out) in err and "ENOSPC" in err and "free space" in err
        assert "RuntimeError" not in err and "enforce fail" not in err and "Traceback" not in err
        assert list(folder.iterdir()) == []  # no output, no temporary file

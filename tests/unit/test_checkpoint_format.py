"""The checkpoint manifest round-trips through JSON; tags and sizes are checked with clear errors."""
from __future__ import annotations

import pytest
import torch

from infinity.checkpoint.format import (ALIGNMENT, BufferEntry, FileEntry, Manifest, OptimizerState, ParamEntry,
                                        check_tag, optimizer_tensor, read_latest, stored_numel)
from infinity.errors import CheckpointError
from infinity.shard import shard_of


def test_manifest_round_trips():
    shard = shard_of("w", torch.Size([3, 5]), 2, 1)
    params = (ParamEntry.of(shard, torch.bfloat16),)
    manifest = Manifest(tag="t", world=2, rank=1, precision="bfloat16", global_steps=3, params=params,
                        buffers=(BufferEntry("mask", (4, 4), "bool", stored_numel(16, 1)),),
                        files=(FileEntry("model.safetensors", 8192, "ab"),), config={"a": 1})
    back = Manifest.from_json(manifest.to_json())
    assert back == manifest
    assert back.params[0].shard() == shard and back.params[0].real == 7
    assert back.params[0].stored * 2 % ALIGNMENT == 0


def test_names_and_padding():
    assert optimizer_tensor(OptimizerState.EXP_AVG, "a.b") == "exp_avg/a.b"
    assert stored_numel(1, 4) == 1024 and stored_numel(1024, 4) == 1024 and stored_numel(1025, 2) == 2048


def test_bad_manifest_and_tags(tmp_path):
    with pytest.raises(CheckpointError, match="version 9"):
        Manifest.from_json('{"format": "infinity-checkpoint", "version": 9}')
    with pytest.raises(CheckpointError, match="not an infinity-checkpoint manifest"):
        Manifest.from_json('{"format": "x"}')
    with pytest.raises(CheckpointError, match="no `latest`"):
        read_latest(tmp_path)
    for bad in ("", "a/b", "..", "latest", ".hidden"):
        with pytest.raises(CheckpointError, match="not a usable tag"):
            check_tag(bad)

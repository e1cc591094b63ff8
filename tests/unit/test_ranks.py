"""infinity.init_distributed reads torchrun's environment: a wrong one is a UsageError that names the
variable and how to launch, before any process group is started."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from infinity.errors import UsageError
from infinity.zero.ranks import Ranks, init_distributed


def test_one_process_starts_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == Ranks(1, 0)
    assert not dist.is_initialized()


def test_world_size_without_torchruns_other_variables_names_them(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UsageError, match=r"WORLD_SIZE is 2 but \$RANK is not set: launch with torchrun"):
        init_distributed()
    assert not dist.is_initialized()


def test_a_world_size_that_is_not_a_number_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UsageError, match=r"\$WORLD_SIZE is 'two', not a whole number"):
        init_distributed()

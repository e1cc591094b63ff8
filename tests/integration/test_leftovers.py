"""What a refused run leaves behind: nothing.  initialize refusing for lack of space after a zero.Init build
(which wrote the parameters into its run folder) removes that folder."""
from __future__ import annotations

import pytest
import torch

import infinity
from infinity.errors import CapacityError
from infinity.models.gpt import Gpt

from test_initialize import config
from tmpfs import size_limited_tmpfs
from training_reference import SPEC


def test_initialize_refused_for_space_after_zero_init_leaves_no_run_folder(tmp_path):
    # 1 MiB holds the parameters (0.5 MiB in fp32) but not the optimizer's master, moments and gradients.
    with size_limited_tmpfs(tmp_path / "small", "1m") as folder:
        cfg = config(folder)
        torch.manual_seed(0)
        with infinity.zero.Init(config=cfg):
            model = Gpt(SPEC)
        runs = list((folder / "infinity-swap" / "rank-0").iterdir())
        assert len(runs) == 1 and (runs[0] / "param.swp").exists()  # zero.Init's writes are there
        with pytest.raises(CapacityError, match="swap files under"):
            infinity.initialize(model=model, config=cfg)
        assert list((folder / "infinity-swap" / "rank-0").iterdir()) == []  # main: run-PID/ stayed

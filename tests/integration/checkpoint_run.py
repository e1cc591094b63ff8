"""Training runs for the checkpoint tests, also run as a script in a fresh process:

    python checkpoint_run.py resume CKPT NVME OUT   load CKPT's latest, train steps 6-10, write losses and
                                                    weights to OUT
    python checkpoint_run.py hang CKPT NVME         save at step 5, train to 7, and stop forever while saving step 7
                                                    (after optimizer.safetensors is written, before its rename)
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from training_reference import ADAM, fresh_model, make_batches, train  # noqa: E402

from infinity.swap.params import Tier  # noqa: E402
from infinity.zero import Engine, EngineSettings  # noqa: E402

PAUSED = "PAUSED-IN-SAVE"
SAVE_AT, STEPS = 5, 10


def settings(nvme: str, param: Tier = Tier.NVME, optimizer: Tier = Tier.NVME, **extra) -> EngineSettings:
    base = dict(param_tier=param, optimizer_tier=optimizer, param_nvme_path=nvme, optimizer_nvme_path=nvme, adam=ADAM,
                gradient_clipping=1.0, sub_group_size=20_000, optimizer_buffer_count=4)
    return EngineSettings(**{**base, **extra})


def resume(ckpt: str, nvme: str, out: str) -> None:
    from safetensors.torch import save_file

    engine = Engine(fresh_model(), settings(nvme))
    try:
        engine.load_checkpoint(ckpt)
        losses = train(engine, make_batches()[SAVE_AT:STEPS])
        weights = engine.parameter_values()
    finally:
        engine.close()
    save_file({**weights, "__losses__": torch.tensor(losses, dtype=torch.float64)}, out)


def hang(ckpt: str, nvme: str, first_tag: str = "global_step5", second_tag: str = "global_step7") -> None:
    from infinity.checkpoint import files
    from infinity.checkpoint.format import OPTIMIZER_FILE

    batches = make_batches()
    engine = Engine(fresh_model(), settings(nvme))
    train(engine, batches[:SAVE_AT])
    engine.save_checkpoint(ckpt, tag=first_tag)
    train(engine, batches[SAVE_AT:SAVE_AT + 2])
    commit = files.commit

    def pausing(temp, final, fd):
        if final.name == OPTIMIZER_FILE:
            print(PAUSED, flush=True)
            time.sleep(600)
        commit(temp, final, fd)

    files.commit = pausing
    engine.save_checkpoint(ckpt, tag=second_tag)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"resume": resume, "hang": hang}[mode](*args)

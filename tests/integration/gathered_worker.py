"""One rank of a two-rank run that changes parameters through infinity.zero.GatheredParameters, launched by
tests/integration/test_hf_partitioned.py (as test_distributed.py launches dist_worker.py):

    python tests/integration/gathered_worker.py OUT NVME_ROOT nvme STEPS

The model is built under zero.Init (which starts the process group); before initialize, head.weight is
doubled on rank 0 (rank 1 zeroes its copy: rank 0's values must win); before step 3, blocks.0.up.weight is
halved the same way after initialize, and a read-only block's change is dropped.  Writes OUT.rank<r>.pt."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import infinity  # noqa: E402
from dist_worker import config  # noqa: E402
from training_reference import fresh_model, make_batches  # noqa: E402

CHANGED_AT = 3


def change(p: torch.nn.Parameter, factor: float, rank: int) -> None:
    with infinity.zero.GatheredParameters(p, modifier_rank=0):
        if rank == 0:
            p.data.mul_(factor)
        else:
            p.data.zero_()


def main() -> None:
    out, nvme_root, tier, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rank = int(os.environ["RANK"])
    with infinity.zero.Init(config=config(nvme_root, tier, rank)):
        model = fresh_model()
    change(model.head.weight, 2.0, rank)
    world = torch.distributed.get_world_size()
    engine, *_ = infinity.initialize(model=model, config=config(nvme_root, tier, rank))
    up = dict(model.named_parameters())["blocks.0.up.weight"]
    losses = []
    for step, (x, y) in enumerate(make_batches()[:steps]):
        if step == CHANGED_AT:
            change(up, 0.5, rank)
            with infinity.zero.GatheredParameters(up):  # read-only: dropped on every rank
                up.data.zero_()
        part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss = engine(x[part], y[part])
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(float(mean) / world)
    torch.save({"losses": losses, "weights": engine.parameter_values()}, f"{out}.rank{rank}.pt")
    engine.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

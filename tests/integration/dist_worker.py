"""One rank of a data-parallel run, launched by tests/integration/test_distributed.py (or by hand with
torchrun): trains the small GPT on its part of each global batch and writes what it saw to OUT.rank<r>.pt.

    python tests/integration/dist_worker.py OUT NVME_ROOT TIER STEPS [FAULT_STEP kill|stop|enospc] [TIMEOUT_S]

With $CKPT_SAVE_AT=N and $CKPT_DIR the run saves a checkpoint after step N; with $CKPT_RESUME=1 it first
loads $CKPT_DIR's latest checkpoint and trains the steps after it (to STEPS).  With $BUILD_UNDER_ZERO_INIT=1
the model is built under infinity.zero.Init (which starts the process group itself); with
$SEED_BY_RANK=1 each rank builds it from its own seed (rank 0 from the reference's), so only the
broadcast of rank 0's initial values makes the ranks agree.  With $BUILD_UNDER_ZERO_INIT=alone, zero.Init
runs with WORLD_SIZE hidden (as one process would), the process group starts after it, and initialize's
refusal goes to OUT.rank<r>.pt.

TIER: nvme (parameters and optimizer on NVMe), cpu, or none.  FAULT_STEP: rank 1 kills itself with
SIGKILL (kill), stops itself with SIGSTOP (stop: alive but silent), or fills its drive (enospc: its
NVMe folder must be a small file system of its own; its gradient swap file loses its blocks, so the
backward's writes hit ENOSPC) before that step's backward; the process group's timeout is TIMEOUT_S
(default 60).  With $DELETE_NVME_ON_RANK=r, rank r's NVMe folder is deleted before initialize."""
from __future__ import annotations

import datetime
import os
import shutil
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import infinity  # noqa: E402
from infinity.models.gpt import Gpt  # noqa: E402
from training_reference import ADAM, SPEC, fresh_model, make_batches  # noqa: E402


PERSISTENT = 100  # parameters of at most this many elements are replicated; the rest are split


def config(nvme_root: str, tier: str, rank: int) -> dict:
    path = os.path.join(nvme_root, f"rank{rank}")  # each rank its own (node-local) folder
    os.makedirs(path, exist_ok=True)
    offload = {"device": tier} | ({"nvme_path": path} if tier == "nvme" else {})
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": ADAM.lr, "betas": list(ADAM.betas), "eps": ADAM.eps,
                                                       "weight_decay": ADAM.weight_decay}},
            "zero_optimization": {"stage": 3, "sub_group_size": 20_000,
                                  "stage3_param_persistence_threshold": PERSISTENT,
                                  "stage3_gather_16bit_weights_on_model_save": True,
                                  "offload_param": offload,
                                  "offload_optimizer": offload | ({"buffer_count": 4} if tier == "nvme" else {})}}


def build_model(rank: int) -> torch.nn.Module:
    if os.environ.get("SEED_BY_RANK") and rank > 0:
        torch.manual_seed(1000 + rank)
        return Gpt(SPEC)
    return fresh_model()


def fill_drive(engine) -> None:
    """This rank's drive full, its gradient swap file without blocks: the next gradient write hits ENOSPC."""
    from test_faults import fill, punch_hole

    (manager,) = engine.run.managers
    punch_hole(str(manager.store.folder / "grad.swp"))
    fill(manager.store.folder.parents[2])


def main() -> None:
    out, nvme_root, tier, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    fault_at = int(sys.argv[5]) if len(sys.argv) > 5 else -1
    fault = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "enospc": "enospc"}[sys.argv[6]] if fault_at >= 0 else None
    timeout = float(sys.argv[7]) if len(sys.argv) > 7 else 60.0
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("BUILD_UNDER_ZERO_INIT") == "alone":
        world_size = os.environ.pop("WORLD_SIZE")
        with infinity.zero.Init(config=config(nvme_root, tier, rank)):  # sees one process: starts no group
            model = build_model(rank)
        os.environ["WORLD_SIZE"] = world_size
        infinity.init_distributed(timeout=datetime.timedelta(seconds=timeout))
        try:
            infinity.initialize(model=model, config=config(nvme_root, tier, rank))
        except infinity.UsageError as err:
            torch.save({"refused": str(err)}, f"{out}.rank{rank}.pt")
        return
    if os.environ.get("BUILD_UNDER_ZERO_INIT"):
        with infinity.zero.Init(config=config(nvme_root, tier, rank)):  # starts the process group
            model = build_model(rank)
    else:
        infinity.init_distributed(timeout=datetime.timedelta(seconds=timeout))
        model = build_model(rank)
    if not torch.distributed.is_initialized():  # world 1 (init_distributed starts none): for the loss all-reduce
        torch.distributed.init_process_group("gloo")
    world = torch.distributed.get_world_size()
    if os.environ.get("FREEZE_EMBEDDINGS"):  # frozen parameters: held and gathered, never trained
        model.tokens.requires_grad_(False)
        model.positions.requires_grad_(False)
    settings = config(nvme_root, tier, rank)
    if os.environ.get("DELETE_NVME_ON_RANK") == str(rank):
        shutil.rmtree(os.path.join(nvme_root, f"rank{rank}"))  # this rank's swap folder is gone at the start
    engine, *_ = infinity.initialize(model=model, config=settings)
    ckpt, save_at = os.environ.get("CKPT_DIR"), int(os.environ.get("CKPT_SAVE_AT", "-1"))
    first = 0
    if os.environ.get("CKPT_RESUME"):
        engine.load_checkpoint(ckpt)
        first = engine.global_steps
    losses, reports = [], []
    for step, (x, y) in enumerate(make_batches()[:steps]):
        if step < first:
            continue
        part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)  # this rank's part of the global batch
        loss = engine(x[part], y[part])
        if step == fault_at and rank == 1 and fault == "enospc":
            fill_drive(engine)
        elif step == fault_at and rank == 1 and fault is not None:
            os.kill(os.getpid(), fault)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)  # the global batch's loss, for the comparison
        losses.append(float(mean) / world)
        reports.append(engine.step_report().to_dict())
        if step + 1 == save_at:
            engine.save_checkpoint(ckpt)
    weights = engine.parameter_values()
    if os.environ.get("SAVE_16BIT_DIR"):
        engine.save_16bit_model(os.environ["SAVE_16BIT_DIR"])  # every rank gathers; rank 0 writes
    torch.save({"losses": losses, "reports": reports, "weights": weights, "rank": rank, "world": world,
                "shards": [(s.name, s.numel, s.start, s.length, s.replicated) for s in engine.run.shards],
                "gathered_ahead": sum(r["gathered_ahead"] for r in reports),
                "param_swap_bytes": sum(m.store._ends.get("param", 0) for m in engine.run.managers)},
               f"{out}.rank{rank}.pt")
    engine.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

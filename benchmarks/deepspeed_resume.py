"""A DeepSpeed ZeRO-3 checkpoint resumed in infinity against DeepSpeed's own resume (issue 21).

DeepSpeed (in its own environment, --ds_python) trains a small MLP with ZeRO-3, parameters and optimizer
offloaded to the CPU (where its resume is exact), saves at step 5 and trains on to step 10 (`continued`);
a fresh DeepSpeed engine loads the step-5 save and trains steps 6-10 (`resumed`).  infinity then builds the
same model with parameters and optimizer states on NVMe, load_checkpoint()s DeepSpeed's folder
(checkpoint/deepspeed.py imports it) and trains steps 6-10.  Printed side by side: the losses of steps
6-10 and the final weights' largest relative difference; infinity's must equal DeepSpeed's resumed run
within 1e-6 (fp32); DeepSpeed's own resumed run against its continued one is printed beside, for scale.  --world N runs DeepSpeed on N CPU ranks (gloo), so the save holds N partitions.

    benchmarks/setup_deepspeed.sh        # once: DeepSpeed in ../dsvenv
    .venv/bin/python benchmarks/deepspeed_resume.py --work bench-out/ds-resume --world 2

The DeepSpeed half is this file run by --ds_python with --deepspeed_rank (one process per rank).
Benchmark-only: DeepSpeed is never a dependency of infinity.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
STEPS, SAVE_AT, LR, WD = 10, 5, 1e-3, 0.01


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 8))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.body(x), y)


def fresh() -> Net:
    torch.manual_seed(0)
    return Net()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 64, generator=gen), torch.randn(16, 8, generator=gen)) for _ in range(STEPS)]


def ds_config(optimizer: str) -> dict:
    return {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "steps_per_print": 1000, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}},
            "optimizer": {"type": optimizer, "params": {"lr": LR, "weight_decay": WD}}}


# ---- the DeepSpeed half (run by --ds_python) -------------------------------------------------------
def deepspeed_rank(work: Path, optimizer: str) -> None:
    import deepspeed  # noqa: PLC0415 (only in DeepSpeed's environment)

    def engine():
        model = fresh()
        eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(optimizer))
        return eng

    def train(eng, steps):
        losses = []
        for x, y in steps:
            loss = eng(x, y)
            eng.backward(loss)
            eng.step()
            losses.append(loss.item())
        return losses

    def weights(eng):
        out = {}
        for name, p in eng.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().clone().float()
        return out

    data = batches()
    first = engine()
    train(first, data[:SAVE_AT])
    first.save_checkpoint(str(work / "ds-ckpt"))
    continued = train(first, data[SAVE_AT:])
    continued_w = weights(first)
    second = engine()
    second.load_checkpoint(str(work / "ds-ckpt"))
    resumed = train(second, data[SAVE_AT:])
    resumed_w = weights(second)
    if torch.distributed.get_rank() == 0:
        torch.save({"continued": continued, "resumed": resumed, "continued_w": continued_w, "resumed_w": resumed_w,
                    "version": deepspeed.__version__, "world": torch.distributed.get_world_size()},
                   work / "deepspeed.pt")


def run_deepspeed(ds_python: str, work: Path, world: int, optimizer: str) -> None:
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("DS_PORT", "29655"),
               "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(work / "torch-extensions"))}
        procs.append(subprocess.Popen([ds_python, __file__, "--deepspeed_rank", "--work", str(work),
                                       "--optimizer", optimizer], env=env))
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("DeepSpeed's run failed (see its output above); run benchmarks/setup_deepspeed.sh first")


# ---- the infinity half ------------------------------------------------------------------------------
def run_infinity(work: Path, optimizer: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    import infinity  # noqa: PLC0415

    swap = work / "swap"
    swap.mkdir(exist_ok=True)
    config = ds_config(optimizer)
    config["zero_optimization"].update({"offload_param": {"device": "nvme", "nvme_path": str(swap)},
                                        "offload_optimizer": {"device": "nvme", "nvme_path": str(swap)}})
    for key in ("zero_allow_untested_optimizer", "steps_per_print"):
        config.pop(key)
    engine, *_ = infinity.initialize(model=fresh(), config=config)
    try:
        engine.load_checkpoint(str(work / "ds-ckpt"))
        assert engine.global_steps == SAVE_AT
        losses = []
        for x, y in batches()[SAVE_AT:]:
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        return losses, engine.parameter_values()
    finally:
        engine.close()


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("bench-out/ds-resume"))
    p.add_argument("--world", type=int, default=1, help="DeepSpeed ranks (CPU, gloo)")
    p.add_argument("--optimizer", default="AdamW", help="the config's optimizer.type in both runs")
    p.add_argument("--ds_python", default=str(HERE.parent.parent / "dsvenv" / "bin" / "python"))
    p.add_argument("--deepspeed_rank", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.deepspeed_rank:
        deepspeed_rank(args.work, args.optimizer)
        return
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    run_deepspeed(args.ds_python, args.work, args.world, args.optimizer)
    ds = torch.load(args.work / "deepspeed.pt", weights_only=True)
    losses, weights = run_infinity(args.work, args.optimizer)
    print(f"DeepSpeed {ds['version']}, {ds['world']} rank(s), ZeRO-3 CPU offload, {args.optimizer}; saved at step "
          f"{SAVE_AT}; infinity resumes from that folder with parameters and optimizer on NVMe")
    print(f"{'step':>4} {'DS continued':>14} {'DS resumed':>14} {'infinity':>14} {'rel vs resumed':>15}")
    for i, (c, r, mine) in enumerate(zip(ds["continued"], ds["resumed"], losses)):
        print(f"{SAVE_AT + 1 + i:>4} {c:>14.9f} {r:>14.9f} {mine:>14.9f} {rel(mine, r):>15.2e}")
    worst_loss = max(rel(m, r) for m, r in zip(losses, ds["resumed"]))
    own = max(rel(c, r) for c, r in zip(ds["continued"], ds["resumed"]))
    print(f"largest relative difference of the losses, steps {SAVE_AT + 1}-{STEPS}: infinity vs DeepSpeed resumed "
          f"{worst_loss:.2e}; DeepSpeed continued vs its own resumed {own:.2e}")
    mine_w, own_w = weight_differences(weights, ds["resumed_w"]), weight_differences(ds["continued_w"], ds["resumed_w"])
    print(f"final weights, relative to DeepSpeed resumed (whole model / worst tensor): infinity {mine_w[0]:.2e} / "
          f"{mine_w[1]:.2e}; DeepSpeed continued {own_w[0]:.2e} / {own_w[1]:.2e}")
    print(json.dumps({"losses_rel": worst_loss, "ds_own_losses_rel": own, "weights_rel": mine_w[0],
                      "losses_within_1e-6": worst_loss <= 1e-6}))


def weight_differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(the whole model's relative difference, the largest per-tensor one), by norms."""
    diff = torch.cat([(got[n].float() - w).reshape(-1) for n, w in want.items()])
    whole = torch.cat([w.reshape(-1) for w in want.values()])
    worst = max(float((got[n].float() - w).norm() / w.norm()) for n, w in want.items())
    return float(diff.norm() / whole.norm()), worst

if __name__ == "__main__":
    main()

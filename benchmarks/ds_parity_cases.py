"""The cases benchmarks/ds_parity.py runs both ways: the model, the data, the configs and the training loop
that records, at every micro-batch, what DeepSpeed's API reports.  Plain torch and plain dicts only: the
same file is imported by infinity's side and by DeepSpeed's side (benchmarks/ds_parity_worker.py, in
DeepSpeed's own environment).  Benchmark-only."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

STEPS = 12
LR = 1e-2
SCHEDULERS: dict[str, dict[str, Any]] = {
    "WarmupLR log": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-2,
                                                    "warmup_num_steps": 6}},
    "WarmupLR linear": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-2,
                                                       "warmup_num_steps": 6, "warmup_type": "linear"}},
    "WarmupLR no max": {"type": "WarmupLR", "params": {"warmup_num_steps": 6}},
    "WarmupDecayLR": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-2,
                                                          "warmup_num_steps": 4, "total_num_steps": 10}},
    "WarmupCosineLR": {"type": "WarmupCosineLR", "params": {"warmup_min_ratio": 0.1, "warmup_num_steps": 4,
                                                            "total_num_steps": 10, "cos_min_ratio": 0.05}},
    "OneCycle": {"type": "OneCycle", "params": {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-2,
                                                "cycle_first_step_size": 4, "cycle_second_step_size": 3,
                                                "decay_step_size": 2, "decay_lr_rate": 0.5, "decay_mom_rate": 0.1}},
    "LRRangeTest": {"type": "LRRangeTest", "params": {"lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 3,
                                                      "lr_range_test_step_rate": 2.0, "lr_range_test_staircase": True}},
}
OVERFLOW_STEPS = (2, 3, 4, 9, 13, 14)  # the forced overflows (0-based optimizer steps)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))


def batches(n: int, micro: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(micro, 16, generator=g), torch.randn(micro, 4, generator=g)) for _ in range(n)]


def config(case: str, **extra: Any) -> dict[str, Any]:
    """DeepSpeed's side of each case; infinity's adds its offload blocks (ds_parity.py)."""
    base: dict[str, Any] = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 1000,
                            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01,
                                                                      "torch_adam": True}},
                            "zero_optimization": {"stage": 3}}
    if case in SCHEDULERS:
        base["scheduler"] = SCHEDULERS[case]
    if case == "counters":
        base["gradient_accumulation_steps"] = 4
    if case == "derived micro":
        base = {**base, "train_batch_size": 32, "gradient_accumulation_steps": 4}
        del base["train_micro_batch_size_per_gpu"]
    if case == "mismatch":
        base = {**base, "train_batch_size": 30, "gradient_accumulation_steps": 4}
    base.update(extra)
    return base


def train(engine: Any, steps: int, gas: int = 1, overflow_at: tuple[int, ...] = (),
          half: bool = False, scale_of: Callable[[], float] | None = None) -> list[dict[str, Any]]:
    """steps × gas micro-batches; one record per micro-batch: what DeepSpeed's API says between backward
    and step (lr, betas, loss scale, counters) and after the step.  The loss is taken in fp32 and, in fp16,
    made small enough (× 1e-4) that only the forced overflows (loss × inf at the steps in overflow_at)
    overflow: the scaled gradients stay within fp16's range."""
    out = []
    for k, (x, y) in enumerate(batches(steps * gas)):
        if half:
            x, y = x.half(), y.half()
        loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
        if half:
            loss = loss * 1e-4
        if k // gas in overflow_at:
            loss = loss * float("inf")
        engine.backward(loss)
        row = {"loss": float(loss.detach().float()) if k // gas not in overflow_at else None,
               "lr": engine.get_lr()[0], "mom": [list(m) for m in engine.get_mom()],
               "micro_steps": engine.micro_steps, "boundary": engine.is_gradient_accumulation_boundary(),
               "global_steps_before": engine.global_steps,
               "scale": scale_of() if scale_of is not None else None}
        engine.step()
        row.update(global_steps=engine.global_steps, applied=engine.was_step_applied(),
                   skipped=engine.skipped_steps, samples=engine.global_samples,
                   grad_norm=_number(engine.get_global_grad_norm()) if row["boundary"] else None)
        out.append(row)
    return out


def _number(value: Any) -> float | None:
    return None if value is None else float(value)

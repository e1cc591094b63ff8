"""Learning-rate schedules named in DeepSpeed's scheduler block, as functions of the optimizer step."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Warmup(enum.Enum):
    LOG = "log"
    LINEAR = "linear"


@dataclass(frozen=True)
class LrSchedule:
    """WarmupLR (total_steps None) or WarmupDecayLR: lr of optimizer step k (0-based)."""

    max_lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup: Warmup = Warmup.LOG
    total_steps: int | None = None

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            if self.warmup is Warmup.LOG:
                gamma = math.log(step + 1) / math.log(self.warmup_steps) if self.warmup_steps > 1 else 1.0
            else:
                gamma = step / self.warmup_steps
            return self.min_lr + (self.max_lr - self.min_lr) * gamma
        if self.total_steps is None:
            return self.max_lr
        remaining = max(self.total_steps - step, 0) / max(self.total_steps - self.warmup_steps, 1)
        return self.max_lr * remaining


def constant(lr: float) -> LrSchedule:
    return LrSchedule(max_lr=lr, min_lr=lr)

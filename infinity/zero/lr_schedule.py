"""Learning-rate schedules named in DeepSpeed's scheduler block, as functions of the optimizer step.

[Note: DeepSpeed's formulas] All three warm up from min_lr to max_lr over warmup_steps (log:
log(k+1)/log(warmup_steps); linear: k/warmup_steps).  After warm-up WarmupLR stays at max_lr,
WarmupDecayLR falls linearly to min_lr at total_steps, and WarmupCosineLR (whose lrs are ratios of the
optimizer's lr) follows half a cosine down to floor_lr.  Step k is 0-based: the first optimizer step
uses lr(0), as DeepSpeed's schedulers do after their constructor's first step().
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Warmup(enum.Enum):
    LOG = "log"
    LINEAR = "linear"


class Decay(enum.Enum):
    """What follows the warm-up."""

    NONE = "none"  # WarmupLR
    LINEAR = "linear"  # WarmupDecayLR
    COSINE = "cosine"  # WarmupCosineLR


@dataclass(frozen=True)
class LrSchedule:
    max_lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup: Warmup = Warmup.LOG
    total_steps: int | None = None
    decay: Decay = Decay.NONE
    floor_lr: float = 0.0  # COSINE: the lr at total_steps

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.min_lr + (self.max_lr - self.min_lr) * self._warmup_gamma(step)
        if self.decay is Decay.NONE or self.total_steps is None:
            return self.max_lr
        if self.decay is Decay.LINEAR:
            remaining = max(self.total_steps - step, 0) / max(self.total_steps - self.warmup_steps, 1)
            return self.min_lr + (self.max_lr - self.min_lr) * remaining
        done = (step - self.warmup_steps + 1) / max(self.total_steps - self.warmup_steps, 1)
        ratio = (1 + math.cos(math.pi * min(done, 1.0))) / 2
        return max(0.0, self.floor_lr + (self.max_lr - self.floor_lr) * ratio)

    def _warmup_gamma(self, step: int) -> float:
        if self.warmup is Warmup.LINEAR:
            return step / self.warmup_steps
        return math.log(step + 1) / math.log(self.warmup_steps) if self.warmup_steps > 1 else 1.0


def constant(lr: float) -> LrSchedule:
    return LrSchedule(max_lr=lr, min_lr=lr)

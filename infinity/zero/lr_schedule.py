"""Learning-rate schedules of DeepSpeed's scheduler block, value for value as DeepSpeed 0.19.8's
deepspeed/runtime/lr_schedules.py: WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest.

Each curve gives the value DeepSpeed's scheduler sets at `last_batch_iteration` i (i >= -1; -1 is what
its constructor sets).  `LrSchedule` turns that into the lr of each optimizer step.

[Note: DeepSpeed spends the first value twice]  DeepSpeed's scheduler constructor sets the lr of
iteration -1, the first optimizer step uses it, and only then does the engine's first scheduler.step()
move to iteration 0; so optimizer step k (0-based, counting applied steps: an fp16 step skipped for an
overflow does not step the scheduler) uses the value of iteration k - 1.  For the warm-ups that value at
-1 is warmup_min_lr, equal to iteration 0's under log warm-up, hence "twice"; WarmupCosineLR's is 0.0.
This is the default (FirstStep.DEEPSPEED); scheduler.first_step "schedule" gives step k the value of
iteration k instead.  A config's last_batch_iteration L other than -1 starts the count there, and the
first step keeps the optimizer's own lr, as DeepSpeed's constructors then set nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from infinity.config.training import FirstStep, WarmupType

Betas = tuple[float, float]


class Curve(Protocol):
    def value(self, i: int) -> float: ...


@dataclass(frozen=True)
class Warmup:
    """The warm-up DeepSpeed's three warm-up schedulers share; steps is already max(2, warmup_num_steps)."""

    steps: int = 1000
    type: WarmupType = WarmupType.LOG

    def gamma(self, i: int) -> float:
        """From 0 towards 1 over the warm-up (i < steps)."""
        if self.type is WarmupType.LINEAR:
            return i / self.steps
        return (1.0 / math.log(self.steps)) * math.log(i + 1)  # DeepSpeed's inverse_log_warm_up, bit for bit


def warmup_steps(given: int) -> int:
    """DeepSpeed warms up over max(2, warmup_num_steps) steps."""
    return max(2, given)


@dataclass(frozen=True)
class WarmupLR:
    min_lr: float
    max_lr: float
    warmup: Warmup = Warmup()

    def value(self, i: int) -> float:
        if i < 0:
            return self.min_lr
        return self.min_lr + (self.max_lr - self.min_lr) * self._gamma(i)

    def _gamma(self, i: int) -> float:
        return self.warmup.gamma(i) if i < self.warmup.steps else 1.0


@dataclass(frozen=True)
class WarmupDecayLR(WarmupLR):
    total_steps: int = 1

    def _gamma(self, i: int) -> float:
        if i < self.warmup.steps:
            return self.warmup.gamma(i)
        return max(0.0, float(self.total_steps - i) / float(max(1.0, self.total_steps - self.warmup.steps)))


@dataclass(frozen=True)
class WarmupCosineLR:
    base_lr: float  # the optimizer's lr
    total_steps: int
    warmup_min_ratio: float = 0.0
    cos_min_ratio: float = 0.0001
    warmup: Warmup = Warmup()

    def value(self, i: int) -> float:
        return self.base_lr * self.ratio(i)

    def ratio(self, i: int) -> float:
        if i < 0:
            return 0.0
        if i < self.warmup.steps:
            return self.warmup_min_ratio + self.warmup.gamma(i) * (1.0 - self.warmup_min_ratio)
        progress = min(1.0, (i - self.warmup.steps + 1) / max(1, self.total_steps - self.warmup.steps))
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * (1 + math.cos(math.pi * progress)) / 2)


@dataclass(frozen=True)
class LRRangeTest:
    min_lr: float = 1e-3
    step_size: int = 2000
    step_rate: float = 1.0
    staircase: bool = False

    def value(self, i: int) -> float:
        interval = (i + 1) / self.step_size
        return self.min_lr * (1 + self.step_rate * (math.floor(interval) if self.staircase else interval))


@dataclass(frozen=True)
class OneCycle:
    """Up from min_lr to max_lr over first_step_size, down over second_step_size, then decay; momentum
    (Adam's beta1, with beta2 set to 0.99, as DeepSpeed does) the other way round."""

    min_lr: float
    max_lr: float
    decay_lr_rate: float = 0.0
    first_step_size: float = 2000.0
    second_step_size: float = 2000.0
    first_stair_count: int = 0
    second_stair_count: int = 0
    decay_step_size: int = 0
    cycle_momentum: bool = True
    min_mom: float = 0.8
    max_mom: float = 0.9
    decay_mom_rate: float = 0.0

    @property
    def total_size(self) -> float:
        return self.first_step_size + self.second_step_size

    def value(self, i: int) -> float:
        if i < self.total_size:
            return self.min_lr + (self.max_lr - self.min_lr) * self._scale(i)
        if math.isclose(self.decay_step_size, 0) or math.isclose(self.decay_lr_rate, 0):
            return self.min_lr
        return self.min_lr / (1 + self.decay_lr_rate * (i - self.total_size + 1) / self.decay_step_size)

    def momentum(self, i: int) -> Betas:
        if i < self.total_size:
            return (self.max_mom - (self.max_mom - self.min_mom) * self._scale(i), 0.99)
        if math.isclose(self.decay_step_size, 0) or math.isclose(self.decay_mom_rate, 0):
            return (self.max_mom, 0.99)
        return (self.max_mom * (1 + self.decay_mom_rate * (i - self.total_size + 1) / self.decay_step_size), 0.99)

    def _scale(self, i: int) -> float:
        """DeepSpeed's OneCycle._get_scale_factor at last_batch_iteration i."""
        batch = i + 1
        cycle = math.floor(1 + batch / self.total_size)
        x = 1.0 + batch / self.total_size - cycle
        ratio = self.first_step_size / self.total_size
        if x <= ratio:
            scale, stairs = x / ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (ratio - 1), self.second_stair_count
        if stairs > 0:
            at = batch % self.total_size
            if at <= self.first_step_size:
                position = at * stairs / self.first_step_size
            else:
                position = (self.total_size - at) * stairs / self.second_step_size
            scale = math.floor(position) / stairs
        return scale


@dataclass(frozen=True)
class LrSchedule:
    """The lr (and, for OneCycle, Adam's betas) of each optimizer step; `applied` counts the steps
    applied so far (fp16 steps skipped for an overflow leave the schedule where it was)."""

    curve: Curve
    base_lr: float  # the optimizer's lr: the first step's when last_batch_iteration is not -1
    base_betas: Betas = (0.9, 0.999)
    last_batch_iteration: int = -1
    first_step: FirstStep = FirstStep.DEEPSPEED

    def iteration(self, applied: int) -> int:
        """The scheduler's last_batch_iteration after `applied` steps."""
        return self.last_batch_iteration + applied + (self.first_step is FirstStep.SCHEDULE)

    def lr(self, applied: int) -> float:
        if self._untouched(applied):
            return self.base_lr
        return self.curve.value(self.iteration(applied))

    def betas(self, applied: int) -> Betas | None:
        """OneCycle's cycled betas, or None when the schedule leaves them alone."""
        curve = self.curve
        if not isinstance(curve, OneCycle) or not curve.cycle_momentum:
            return None
        if self._untouched(applied):
            return self.base_betas
        if applied == 0 and self.first_step is FirstStep.DEEPSPEED:
            return (curve.min_mom, 0.99)  # what DeepSpeed's constructor sets
        return curve.momentum(self.iteration(applied))

    def _untouched(self, applied: int) -> bool:
        """DeepSpeed's constructors set nothing when last_batch_iteration is not -1."""
        return applied == 0 and self.first_step is FirstStep.DEEPSPEED and self.last_batch_iteration != -1


def constant(lr: float) -> LrSchedule:
    return LrSchedule(WarmupLR(min_lr=lr, max_lr=lr), base_lr=lr)

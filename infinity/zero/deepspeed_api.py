"""The parts of DeepSpeed's engine API that only read the engine's counters, config and ranks, with
DeepSpeed 0.19.8's names, signatures and return values (docs/engine.md has the whole table).

A mixin: `Engine` (zero/engine.py) inherits it and keeps the state it reads (`counters`, `config`,
`settings`, `run`, `_grad_norm`, `_step_applied`, `_no_sync`)."""
from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterator

from infinity.config.training import Precision
from infinity.errors import UsageError

if TYPE_CHECKING:
    from infinity.config import Config
    from infinity.zero.build import Run
    from infinity.zero.settings import EngineSettings
    from infinity.zero.state import Counters


class DeepSpeedApi:
    counters: "Counters"
    config: "Config | None"
    settings: "EngineSettings"
    run: "Run"
    _grad_norm: float | None
    _step_applied: bool
    _no_sync: bool

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients (fp16 overflows); global_steps counts them too."""
        return self.counters.skipped_steps

    @property
    def global_samples(self) -> int:
        """train_batch_size() per optimizer step, skipped steps included (DeepSpeed's count)."""
        return self.counters.global_samples

    @property
    def global_rank(self) -> int:
        return self.run.ranks.rank

    @property
    def world_size(self) -> int:
        return self.run.ranks.world

    @property
    def local_rank(self) -> int:
        """$LOCAL_RANK (torchrun sets it), else 0, as DeepSpeed reads it."""
        return int(os.environ.get("LOCAL_RANK", 0))

    def get_global_grad_norm(self) -> float | None:
        """The last step's gradient 2-norm, unscaled (inf for a skipped fp16 step; None before the first
        step).  As DeepSpeed's ZeRO-3, it is divided by the loss scale after that step's update."""
        return self._grad_norm

    def was_step_applied(self) -> bool:
        """Whether the latest step() changed the parameters (False inside an accumulation window and for a
        skipped fp16 step)."""
        return self._step_applied

    def train_batch_size(self) -> int:
        given = self.settings.train_batch_size
        return given or self.train_micro_batch_size_per_gpu() * self.settings.gradient_accumulation_steps * self.world_size

    def train_micro_batch_size_per_gpu(self) -> int:
        """The config's, or derived from train_batch_size as DeepSpeed derives it (zero/from_config.py)."""
        return self.settings.micro_batch_size

    def zero_optimization_stage(self) -> int:
        """The config's zero_optimization.stage (3 for an engine built from settings, which partitions)."""
        return int(self.config.zero_optimization.stage) if self.config is not None else 3

    def gradient_clipping(self) -> float:
        return self.settings.gradient_clipping

    def fp16_enabled(self) -> bool:
        return self.settings.precision is Precision.FP16

    def bfloat16_enabled(self) -> bool:
        return self.settings.precision is Precision.BF16

    def zero_optimization(self) -> bool:
        return self.zero_optimization_stage() > 0

    def get_mom(self) -> list[Any]:
        """Each parameter group's betas (Adam, Lion) or momentum (SGD, RMSprop), as DeepSpeed returns them."""
        return [tuple(g["betas"]) if "betas" in g else g.get("momentum") for g in self.run.param_groups]

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """DeepSpeed's: gradients accumulate locally, unreduced, for the block; step() inside it is refused.
        As DeepSpeed, refused under ZeRO stage 2 and 3, whose gradients are partitioned as they are made."""
        stage = self.zero_optimization_stage()
        if stage >= 2:
            raise UsageError(f"no_sync() is incompatible with gradient partitioning of ZeRO stage {stage} (DeepSpeed "
                             "refuses it too); leave it out: gradients are reduced once per accumulation window")
        if self._no_sync:
            raise UsageError("no_sync() was entered again inside no_sync(); DeepSpeed does not nest it either")
        self._no_sync = True
        try:
            yield
        finally:
            self._no_sync = False

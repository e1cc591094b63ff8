"""The engine as checkpoints see it: the protocol of infinity/checkpoint/protocol.py (`Checkpointable`)
over one Engine.  Save, load and save_16bit_model are given this view, never the engine itself: the run's
parts (zero/build.py's Run), the engine's counters, learning rate and loss scaler, and the engine's
settled() and latching_failure() blocks, which follow its TrainingState."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ContextManager

import torch

from infinity.io.handle import IoHandle
from infinity.memory.stream import Part
from infinity.zero.settings import dtype_of

if TYPE_CHECKING:
    from infinity.zero.engine import Engine


class CheckpointView:
    """[Note: the same objects as the engine's]  The attributes are the run's and the engine's own objects
    (lists, the counters, the scaler), not copies: a load restores into them.  lr and global_steps change
    with each step, so they are read through."""

    def __init__(self, engine: Engine):
        run = self._run = engine.run
        self._engine = engine
        self.module, self.names, self.params, self.shapes, self.shards = (run.module, run.names, run.params,
                                                                          run.shapes, run.shards)
        self.frozen = run.frozen
        self.ranks, self.rank, self.world, self.settings = run.ranks, run.rank, run.world, run.settings
        self.config, self.counters, self.loss_scaler = engine.config, engine.counters, engine.scaler
        self.client_scheduler = engine.client_scheduler
        self.dtype: torch.dtype = dtype_of(run.settings.precision)

    @property
    def lr(self) -> float:
        return self._engine.lr

    @property
    def global_steps(self) -> int:
        return self._engine.counters.global_steps

    def param_part(self, i: int) -> Part:
        """[Note: one place]  Where this rank's part of parameter i (shards[i]) rests between uses: what
        checkpoints save and load.  With a world of one rank the part is the whole parameter."""
        return self._run.homes[i].part(i)

    @property
    def optimizer_states(self) -> tuple[str, ...]:
        return self._run.optimizer.states

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._run.param_groups

    def optimizer_part(self, i: int, state: str) -> Part:
        return self._run.optimizer.state_part(self._run.slices[i], state)

    def optimizer_steps(self) -> dict[str, float]:
        return self._run.optimizer_steps()

    def load_optimizer_steps(self, steps: dict[str, float], where: str) -> None:
        self._run.load_optimizer_steps(steps, where)

    def fresh_optimizer(self) -> None:
        self._run.optimizer.clear_states()

    def read_parameter(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        return self._run.read_values(i, dtype=dtype)

    def join_gather(self, i: int) -> None:
        self._run.fetch_and_release(i)

    def io_handle(self) -> IoHandle | None:
        return self._run.io_handle()

    def settled(self, caller: str) -> ContextManager[None]:
        return self._engine.settled(caller)

    def latching_failure(self) -> ContextManager[None]:
        return self._engine.latching_failure()

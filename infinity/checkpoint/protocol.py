"""What checkpoints need of a training engine: the seam the engine implements through its view
(infinity/zero/checkpoint_view.py, `engine.checkpointable`).

[Note: checkpoint sits below zero]  Save, load and save_16bit_model talk only to this protocol, never to
infinity.zero: the engine passes its view, and these names are its public surface for checkpoints.  The
on-disk format does not depend on it (format.py)."""
from __future__ import annotations

from typing import Any, ContextManager, Protocol, Sequence

import torch
from torch import nn

from infinity.config import Config
from infinity.io.handle import IoHandle
from infinity.memory.stream import Part
from infinity.shard import Shard


class RankGroup(Protocol):
    """The ranks of the run (one process: world 1): the collectives a checkpoint takes part in."""

    rank: int
    world: int

    def barrier(self, what: str) -> None: ...

    def low_high(self, value: int, what: str) -> tuple[int, int]: ...


class Stateful(Protocol):
    """A piece of the run with small state (counters, the loss scaler): saved in state.json."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointable(Protocol):
    """A training engine as checkpoints see it.  Parameter i is the i-th parameter the engine holds: trained
    ones and frozen ones (requires_grad=False: in `frozen`, with no optimizer state)."""

    module: nn.Module
    names: list[str]  # the engine's parameters' names, in engine order
    params: list[nn.Parameter]
    shapes: list[torch.Size]  # each parameter's whole shape
    shards: Sequence[Shard]  # this rank's part of each parameter
    frozen: frozenset[int]  # the parameters with no optimizer state (no optimizer_part), by index
    ranks: RankGroup
    rank: int
    world: int
    lr: float
    config: Config | None
    settings: Any  # a dataclass of the engine's settings, saved as text in the manifest

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of parameters on the compute tier (and in model.safetensors)."""

    @property
    def counters(self) -> Stateful:
        """global_steps and micro_steps."""

    @property
    def global_steps(self) -> int: ...

    @property
    def loss_scaler(self) -> Stateful | None:
        """The fp16 loss scaler (None unless fp16)."""

    @property
    def client_scheduler(self) -> Stateful | None:
        """The client's LR scheduler (initialize's lr_scheduler=; None without one)."""

    def param_part(self, i: int) -> Part:
        """Where this rank's part of parameter i rests between uses (what model.safetensors holds)."""

    @property
    def optimizer_states(self) -> tuple[str, ...]:
        """The fp32 vectors the optimizer keeps per parameter: "master", then its own (Adam: "exp_avg",
        "exp_avg_sq")."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's torch-style parameter groups ("params" and hyperparameters)."""

    def optimizer_part(self, i: int, state: str) -> Part:
        """Where this rank's optimizer state (one of optimizer_states) of trained parameter i rests."""

    def optimizer_steps(self) -> dict[str, float]:
        """The optimizer's step counter of each trained parameter's sub-group, by parameter name."""

    def load_optimizer_steps(self, steps: dict[str, float], where: str) -> None:
        """Sets each sub-group's step counter from steps (a CheckpointError naming where when a sub-group's
        parameters disagree)."""

    def fresh_optimizer(self) -> None:
        """The optimizer's own states (all but "master") zeroed and every sub-group's step count 0, as a new
        engine's (a load without the optimizer's states)."""

    def settled(self, caller: str) -> ContextManager[None]:
        """A block in which parameters can be read one at a time (no reads ahead compete for buffers); a
        UsageError naming caller when a forward is open."""

    def read_parameter(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """Parameter i whole, in dtype, as a copy in host memory (with several ranks: an all-gather)."""

    def join_gather(self, i: int) -> None:
        """This rank's part in another rank's read_parameter(i): fetches and releases, keeping nothing."""

    def latching_failure(self) -> ContextManager[None]:
        """A block whose errors leave the run failed (every later call raises EngineFailed)."""

    def io_handle(self) -> IoHandle | None:
        """The run's own async-IO handle, or None when nothing of the run is on NVMe."""

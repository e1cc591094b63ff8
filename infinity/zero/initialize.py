"""`infinity.initialize`: DeepSpeed's entry point, so that switching is a change of import.

    engine, optimizer, _, lr_scheduler = infinity.initialize(model=model,
                                                             model_parameters=model.parameters(),
                                                             config="nvme-local")
    loss = engine(batch); engine.backward(loss); engine.step()

The optimizer and the learning-rate schedule are the config's (`optimizer`, `scheduler`); the engine
runs them over the offloaded states and steps the schedule itself, as DeepSpeed's engine does.  The
objects returned for them are views for code that reads `param_groups[0]["lr"]` or calls
`get_last_lr()`.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from infinity.config import Config
from infinity.config.auto import TrainingArgs
from infinity.config.config import ConfigSource
from infinity.errors import InfinityError, UsageError
from infinity.exporter import from_config
from infinity.zero.engine import Engine
from infinity.zero.from_config import settings_from_config
from infinity.zero.ranks import init_distributed

log = logging.getLogger("infinity.zero")


def initialize(args: Any = None, model: nn.Module | None = None, optimizer: Any = None,
               model_parameters: Iterable[Any] | None = None, training_data: Any = None,
               lr_scheduler: Any = None, config: ConfigSource | Config | None = None,
               config_params: ConfigSource | None = None, collate_fn: Any = None,
               training_args: TrainingArgs | None = None, rank: int = 0,
               **ignored: Any) -> tuple[Engine, "OptimizerView", Any, "LrSchedulerView | None"]:
    """(engine, optimizer, training_dataloader or None, lr_scheduler or None), as DeepSpeed returns them.

    config: a path, a JSON string, a dict or an infinity.Config (DeepSpeed's config_params and
    args.deepspeed_config are read too).  training_args fills "auto" values.  DeepSpeed's
    distributed keywords (mpu, dist_init_required, ...) are accepted and ignored.
    Under torchrun (WORLD_SIZE > 1) the process group is started here unless the script started it
    (infinity.init_distributed), and the parameters are partitioned over its ranks; rank is then the
    process group's.  With the config's prometheus block enabled, metrics are served on
    prometheus.port + LOCAL_RANK (labelled rank=rank, or $RANK) until engine.close(); a port in use is a
    MetricsPortInUse.
    """
    if model is None:
        raise UsageError("initialize needs model=, the torch.nn.Module to train")
    _refuse_client_parts(optimizer, lr_scheduler)
    loaded = _load(config, config_params, args, training_args)
    _check_parameters(model, model_parameters)
    if ignored:
        log.debug("initialize: ignored keywords %s", sorted(ignored))
    ranks = init_distributed(device=next((p.device for p in model.parameters()), None))
    rank = ranks.rank if ranks.several else rank
    exporter = from_config(loaded.prometheus, rank=rank)  # first: the engine's own set-up writes are counted
    try:
        engine = Engine(model, settings_from_config(loaded, rank=rank), config=loaded, exporter=exporter)
    except BaseException as err:
        if isinstance(err, InfinityError):
            ranks.tell_failure(err)  # the other ranks, waiting in a collective, name this one and its error
        if exporter is not None:
            exporter.stop()
        raise
    loader = None
    if training_data is not None:
        loader = torch.utils.data.DataLoader(training_data, batch_size=int(loaded.train_micro_batch_size_per_gpu),
                                             shuffle=True, collate_fn=collate_fn)
    scheduler = LrSchedulerView(engine) if engine.settings.schedule is not None else None
    return engine, OptimizerView(engine), loader, scheduler


class OptimizerView:
    """What the training loop may read of the engine's optimizer; stepping goes through engine.step()."""

    def __init__(self, engine: Engine):
        self._engine = engine

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        adam = self._engine.settings.adam
        return [{"params": self._engine.run.params, "lr": self._engine.lr, "betas": adam.betas, "eps": adam.eps,
                 "weight_decay": adam.weight_decay}]

    @property
    def loss_scale(self) -> float:
        scaler = self._engine.scaler
        return scaler.scale if scaler is not None else 1.0

    cur_scale = loss_scale  # DeepSpeed's name

    def step(self, *args: Any, **kwargs: Any) -> None:
        raise UsageError("the optimizer's states are offloaded and stepped by the engine: call engine.step()")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients leave the compute tier as they are made; nothing to clear."""


class LrSchedulerView:
    """The config's scheduler.  engine.step() advances it; step() here only reports that."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._warned = False

    @property
    def last_batch_iteration(self) -> int:
        return self._engine.global_steps - 1

    def get_lr(self) -> list[float]:
        return [self._engine.lr]

    get_last_lr = get_lr

    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self._warned:
            log.warning("lr_scheduler.step(): the engine steps the config's scheduler in engine.step(); "
                        "this call changes nothing")
            self._warned = True

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The schedule has no state of its own: it follows engine.global_steps, which engine.load_checkpoint
        restores.  A state at the engine's position is accepted; another is a UsageError."""
        if int(state["last_batch_iteration"]) != self.last_batch_iteration:
            raise UsageError(f"lr_scheduler.load_state_dict: last_batch_iteration {state['last_batch_iteration']} "
                             f"differs from the engine's {self.last_batch_iteration}; the schedule follows the "
                             "engine's optimizer steps: restore them with engine.load_checkpoint")


def _load(config: ConfigSource | Config | None, config_params: ConfigSource | None, args: Any,
          training_args: TrainingArgs | None) -> Config:
    source = config if config is not None else config_params
    if source is None:
        source = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if source is None:
        raise UsageError("initialize needs a config: config= (a path, JSON string, dict or infinity.Config)")
    if isinstance(source, Config):
        return source.resolve(training_args) if training_args is not None else source
    return Config.load(source, args=training_args)


def _refuse_client_parts(optimizer: Any, lr_scheduler: Any) -> None:
    if optimizer is not None:
        raise UsageError("initialize(optimizer=...): infinity keeps the optimizer's states on the offload tier and "
                         "runs its own Adam/AdamW there; name it in the config's optimizer block instead "
                         '(e.g. "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}})')
    if lr_scheduler is not None:
        raise UsageError("initialize(lr_scheduler=...): name the schedule in the config's scheduler block "
                         "(WarmupLR, WarmupDecayLR or WarmupCosineLR); the engine steps it")


def _check_parameters(model: nn.Module, model_parameters: Iterable[Any] | None) -> None:
    """infinity trains every parameter with requires_grad; model_parameters may not name a subset or groups."""
    if model_parameters is None:
        return
    given = list(model_parameters)
    if any(isinstance(p, dict) for p in given):
        raise UsageError("model_parameters: parameter groups (dicts) are not supported yet; pass "
                         "model.parameters() and set per-parameter options in the config")
    mine = {id(p) for p in model.parameters() if p.requires_grad}
    theirs = {id(p) for p in given}
    if theirs - {id(p) for p in model.parameters()}:
        raise UsageError("model_parameters holds tensors that are not parameters of model")
    if mine - theirs:
        raise UsageError("model_parameters leaves out parameters that require grad; infinity trains every "
                         "parameter with requires_grad=True: set requires_grad=False on those to freeze")

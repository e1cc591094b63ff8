"""`infinity.initialize`: DeepSpeed's entry point, so that switching is a change of import.

    engine, optimizer, _, lr_scheduler = infinity.initialize(model=model,
                                                             model_parameters=model.parameters(),
                                                             config="nvme-local")
    loss = engine(batch); engine.backward(loss); engine.step()

The optimizer and the learning-rate schedule are the config's (`optimizer`, `scheduler`), or the client's
(`optimizer=` a torch optimizer instance or class, `lr_scheduler=` a torch scheduler or a callable taking
the optimizer), as DeepSpeed takes them; the engine runs the optimizer over the offloaded states and steps
the schedule itself.  `model_parameters` may be torch-style parameter groups (zero/param_groups.py).  The
optimizer returned is a view whose `param_groups` are the dicts each step reads (a torch scheduler over it
drives the engine's lr); the scheduler returned is the client's, or a view of the config's.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict, defaultdict
from typing import Any, Iterable

import torch
from torch import nn

from infinity.config import Config
from infinity.config.auto import TrainingArgs, hidden_size_of
from infinity.config.config import ConfigSource
from infinity.config.training import OptimizerConfig
from infinity.errors import InfinityError, UsageError
from infinity.exporter import from_config
from infinity.zero.engine import Engine
from infinity.zero.from_config import settings_from_config
from infinity.zero.param_groups import OptimizerSetup, optimizer_setup
from infinity.zero.ranks import init_distributed

log = logging.getLogger("infinity.zero")


def initialize(args: Any = None, model: nn.Module | None = None, optimizer: Any = None,
               model_parameters: Iterable[Any] | None = None, training_data: Any = None,
               lr_scheduler: Any = None, config: ConfigSource | Config | None = None,
               config_params: ConfigSource | None = None, collate_fn: Any = None,
               training_args: Any = None, rank: int = 0,
               **ignored: Any) -> tuple[Engine, "OptimizerView", Any, "LrSchedulerView | None"]:
    """(engine, optimizer, training_dataloader or None, lr_scheduler or None), as DeepSpeed returns them.

    config: a path, a JSON string, a dict or an infinity.Config (DeepSpeed's config_params and
    args.deepspeed_config are read too).  training_args (an infinity.TrainingArgs or a
    transformers.TrainingArguments, with the model's config.hidden_size) fills "auto" values.  DeepSpeed's
    distributed keywords (mpu, dist_init_required, ...) are accepted and ignored.
    Under torchrun (WORLD_SIZE > 1) the process group is started here unless the script started it
    (infinity.init_distributed), and the parameters are partitioned over its ranks; rank is then the
    process group's.  With the config's prometheus block enabled, metrics are served on
    prometheus.port + LOCAL_RANK (labelled rank=rank, or $RANK) until engine.close(); a port in use is a
    MetricsPortInUse.
    optimizer: a torch.optim.Optimizer instance (its param_groups and hyperparameters taken over) or class
    (called with model_parameters); it replaces the config's optimizer block.  lr_scheduler: a torch LR
    scheduler over that optimizer, or a callable given the optimizer initialize returns; it replaces the
    config's scheduler block.  The engine steps it after each applied optimizer step.
    """
    if model is None:
        raise UsageError("initialize needs model=, the torch.nn.Module to train")
    if training_args is not None and not isinstance(training_args, TrainingArgs):  # transformers.TrainingArguments
        training_args = TrainingArgs.from_training_arguments(training_args, hidden_size=hidden_size_of(model))
    loaded = _load(config, config_params, args, training_args)
    if optimizer is not None:
        loaded = _client_optimizer_config(loaded)
    if ignored:
        log.debug("initialize: ignored keywords %s", sorted(ignored))
    ranks = init_distributed(device=next((p.device for p in model.parameters()), None))
    rank = ranks.rank if ranks.several else rank
    exporter = from_config(loaded.prometheus, rank=rank)  # first: the engine's own set-up writes are counted
    try:
        settings = settings_from_config(loaded, rank=rank)
        if lr_scheduler is not None and settings.schedule is not None:
            log.warning("initialize: lr_scheduler= replaces the config's scheduler block, as in DeepSpeed")
            settings = dataclasses.replace(settings, schedule=None)
        setup = optimizer_setup(model, settings, model_parameters, optimizer)
        view = OptimizerView(setup.groups)
        client_scheduler = _client_scheduler(lr_scheduler, setup, view)
        engine = view.engine = Engine(model, settings, config=loaded, exporter=exporter, setup=setup,
                                      client_scheduler=client_scheduler)
    except BaseException as err:
        if isinstance(err, InfinityError):
            ranks.tell_failure(err)  # the other ranks, waiting in a collective, name this one and its error
        if exporter is not None:
            exporter.stop()
        raise
    loader = None
    if training_data is not None:
        loader = torch.utils.data.DataLoader(training_data, batch_size=engine.train_micro_batch_size_per_gpu(),
                                             shuffle=True, collate_fn=collate_fn)
    scheduler = client_scheduler or (LrSchedulerView(engine) if engine.settings.schedule is not None else None)
    engine.lr_scheduler = scheduler
    return engine, view, loader, scheduler


class OptimizerView(torch.optim.Optimizer):
    """The engine's optimizer as a torch optimizer: its param_groups are the dicts each step reads its
    hyperparameters from (zero/param_groups.py), so a torch LR scheduler built over it drives the engine;
    stepping goes through engine.step().  [Note: no Optimizer.__init__]  torch's constructor would copy the
    groups into its own list; the view shares the run's."""

    def __init__(self, param_groups: list[dict[str, Any]]):  # pylint: disable=super-init-not-called
        self.engine: Engine | None = None  # set once the engine is built over these groups
        self.param_groups = param_groups
        first = self.param_groups[0] if self.param_groups else {}
        self.defaults = {k: v for k, v in first.items() if k != "params"}
        self.state: defaultdict[Any, Any] = defaultdict(dict)
        self._optimizer_step_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Any] = OrderedDict()

    @property
    def loss_scale(self) -> float:
        scaler = self.engine.scaler if self.engine is not None else None
        return scaler.scale if scaler is not None else 1.0

    cur_scale = loss_scale  # DeepSpeed's name

    def step(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        raise UsageError("the optimizer's states are offloaded and stepped by the engine: call engine.step()")

    def state_dict(self) -> dict[str, Any]:
        raise UsageError("the optimizer's states are offloaded: save them with engine.save_checkpoint")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise UsageError("the optimizer's states are offloaded: restore them with engine.load_checkpoint")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients leave the compute tier as they are made; nothing to clear."""


class LrSchedulerView:
    """The config's scheduler.  engine.step() advances it; step() here only reports that."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._warned = False

    @property
    def last_batch_iteration(self) -> int:
        """DeepSpeed's scheduler's: -1 before the first step, then one more per applied optimizer step."""
        schedule = self._engine.settings.schedule
        return schedule.iteration(self._engine.applied_steps) if schedule is not None else -1

    def get_lr(self) -> list[float]:
        return self._engine.get_lr()

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


def _client_optimizer_config(loaded: Config) -> Config:
    """With a client optimizer the config's optimizer block is not used (DeepSpeed ignores it too); a config
    without one gets the default block, which only fills settings the client optimizer replaces."""
    if loaded.optimizer is not None:
        log.warning("initialize: optimizer= replaces the config's optimizer block, as in DeepSpeed")
        return loaded
    return dataclasses.replace(loaded, optimizer=OptimizerConfig())


def _client_scheduler(lr_scheduler: Any, setup: OptimizerSetup, view: OptimizerView) -> Any:
    """A scheduler instance, checked to drive the groups the run steps, or the one a callable builds over the
    optimizer view (as DeepSpeed calls it with its optimizer); None without one."""
    if lr_scheduler is None:
        return None
    if isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler) or hasattr(lr_scheduler, "optimizer"):
        drives = getattr(getattr(lr_scheduler, "optimizer", None), "param_groups", None)
        if drives is not setup.groups:
            raise UsageError("initialize(lr_scheduler=...): the scheduler drives an optimizer infinity was not given; "
                             "pass that optimizer as optimizer= too, or pass a callable that builds the scheduler "
                             "from the optimizer (lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10))")
        return lr_scheduler
    if callable(lr_scheduler):
        return lr_scheduler(view)
    raise UsageError(f"initialize(lr_scheduler=...): got {type(lr_scheduler).__name__}; pass a torch LR scheduler "
                     "or a callable that takes the optimizer and returns one")

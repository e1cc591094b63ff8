"""Transformers' Trainer and Seq2SeqTrainer over an infinity engine: parameters and optimizer states where the
DeepSpeed-style config puts them, "auto" filled from the TrainingArguments.

    trainer = InfinityTrainer(model=model, args=TrainingArguments(...), train_dataset=data,
                              infinity_config="ds_config_zero3.json")
    trainer.train()

[Note: where the engine meets Trainer]  Transformers' DeepSpeed route needs the deepspeed package, so these
classes take the same hooks its Trainer offers any subclass, in the places its DeepSpeed route takes them:
- the engine is built once, when Trainer first creates its optimizer (it knows the run's optimizer steps then,
  for "auto" total_num_steps) or first wraps the model for evaluation; `_wrap_model` hands Trainer the engine,
  so Trainer neither wraps the model in DDP nor prepares it with accelerate (the engine reduces gradients);
- accelerator.backward(loss) becomes engine.backward(loss, scale_wrt_gas=False) then engine.step(), after every
  micro-batch, as accelerate drives DeepSpeed's engine (Trainer has already divided the loss for gradient
  accumulation; the engine updates at the window's end);
- the optimizer Trainer steps is an EngineOptimizer, whose step() finds the engine's done; the learning rate follows
  the config's scheduler block when it has one (EngineSchedule), or Trainer's own scheduler (lr_scheduler_type,
  warmup) stepping the EngineOptimizer, as Transformers does for a DeepSpeed config without a scheduler;
- gradient clipping is the engine's (gradient_clipping, filled from max_grad_norm), inside its step; the
  grad_norm Trainer logs is the engine's global norm of that step (engine.get_global_grad_norm());
- save_model writes the model with engine.save_pretrained, streamed from its partitions (a folder plain
  from_pretrained loads), beside Trainer's other files; a checkpoint-N folder holds the engine's checkpoint
  (global_stepN/, latest) beside Trainer's files, and resume_from_checkpoint restores it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterable

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer

from infinity.config import Config
from infinity.config.auto import TrainingArgs, hidden_size_of
from infinity.config.config import ConfigSource, read_source
from infinity.errors import UsageError
from infinity.zero import Engine, initialize
from infinity.zero.init import placed
from infinity.zero.param_groups import set_lr

log = logging.getLogger("infinity.integrations.transformers")

SCHEDULER_NAME = "scheduler.pt"  # Trainer's names in a checkpoint folder: its scheduler's state, its arguments
TRAINING_ARGS_NAME = "training_args.bin"
AUTO_ADAMW = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}


def resolve_config(source: ConfigSource | Config, args: Any, model: Any, max_steps: int | None) -> Config:
    """The config with every "auto" filled from Transformers' TrainingArguments and the hidden size of model (a
    Transformers model or its config), as Transformers fills a DeepSpeed config.  A config without an optimizer
    block gets AdamW with its values from the arguments (Trainer's default optimizer).  Values written out that
    disagree with the arguments are one ConfigError (a ValueError) listing each, as Transformers refuses them.
    from_pretrained needs the config resolved before the model exists:
    resolve_config(config, args, AutoConfig.from_pretrained(dir), max_steps)."""
    filled = TrainingArgs.from_training_arguments(args, hidden_size=hidden_size_of(model), max_steps=max_steps)
    if isinstance(source, Config):
        return source.resolve(filled)
    data, _ = read_source(source)
    if "optimizer" not in data:
        log.info("the config names no optimizer: AdamW with lr, betas, eps and weight_decay from TrainingArguments")
        data["optimizer"] = {"type": AUTO_ADAMW["type"], "params": dict(AUTO_ADAMW["params"])}
    return Config.load(data, args=filled)


class EngineOptimizer(torch.optim.Optimizer):
    """The optimizer Trainer holds: step() is engine.step(), which updates the offloaded states.  Its one
    parameter group carries the learning rate: Trainer's scheduler sets it (config without a scheduler block)
    and step() hands it to the engine, or it follows the engine's own schedule."""

    def __init__(self, engine: Engine, params: Iterable[torch.Tensor]):
        self.engine = engine
        self.follows_trainer = engine.settings.schedule is None
        super().__init__(list(params) or [torch.zeros(0, requires_grad=True)], {"lr": engine.lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Trainer's optimizer step at a window's end: the engine stepped already, in the window's last
        backward ([Note: micro-steps]); what is left is the lr the engine's schedule moved to."""
        if closure is not None:
            raise UsageError("EngineOptimizer.step(closure): the engine steps from the gradients of "
                             "engine.backward; closures are not supported")
        if not self.follows_trainer:
            self.param_groups[0]["lr"] = self.engine.lr

    def lr_to_engine(self) -> None:
        """[Note: the lr Trainer's scheduler set]  With no scheduler block the engine's lr is the config's
        constant; the next step's lr is the group's, which Trainer's scheduler moved after the last step."""
        if self.follows_trainer:
            set_lr(self.engine.run.param_groups, float(self.param_groups[0]["lr"]))  # what the step reads

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients leave the compute tier as they are made; nothing to clear."""


class EngineSchedule:
    """The config's scheduler, which engine.step() advances: what Trainer reads of a scheduler."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def get_last_lr(self) -> list[float]:
        """The lr of the last optimizer step (of the first, before any): Trainer logs it after the step."""
        schedule = self.engine.settings.schedule
        return [schedule.lr(max(self.engine.global_steps - 1, 0)) if schedule is not None else self.engine.lr]

    def step(self, *args: Any, **kwargs: Any) -> None:
        """engine.step() steps the schedule."""

    def state_dict(self) -> dict[str, Any]:
        return {}  # the schedule follows engine.global_steps, which the engine's checkpoint holds

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: see state_dict."""


class InfinityTrainerMixin:
    """What InfinityTrainer and InfinitySeq2SeqTrainer add to Transformers' Trainer (see the module's note)."""

    engine: Engine | None

    def __init__(self, *args: Any, infinity_config: ConfigSource | Config | None = None, **kwargs: Any):
        if infinity_config is None:
            raise UsageError("InfinityTrainer needs infinity_config=: a DeepSpeed-style config (a path, a JSON "
                             "string or a dict), e.g. the guide's ds_config_zero3.json")
        self.infinity_config, self.engine = infinity_config, None
        self._engine_optimizer: EngineOptimizer | None = None
        super().__init__(*args, **kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.accelerator.backward = self._backward  # [Note: where the engine meets Trainer]
        # Gradients are reduced once per window by the engine; accelerate's no_sync would call engine.no_sync(),
        # which ZeRO-3 refuses (as DeepSpeed's does): accelerate skips it for DeepSpeed engines too.
        self.accelerator.no_sync = lambda model=None: contextlib.nullcontext()

    # ---- the engine --------------------------------------------------------------------------
    def build_engine(self, max_steps: int | None) -> Engine:
        """The engine over self.model, built once (max_steps: the run's optimizer steps, for "auto")."""
        if self.engine is None:
            config = resolve_config(self.infinity_config, self.args, self.model, max_steps)
            log.info("infinity config resolved from TrainingArguments:\n%s", config.to_json())
            self.engine, *_ = initialize(model=self.model, config=config)
        return self.engine

    def _planned_steps(self) -> int | None:
        """The optimizer steps train() would run, for an engine built before it (evaluate first)."""
        if self.args.max_steps > 0:
            return int(self.args.max_steps)
        if self.train_dataset is None:
            return None
        return int(self.set_initial_training_values(self.args, self.get_train_dataloader())[-1])

    def _backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        if self.engine is None:
            raise UsageError("InfinityTrainer: a backward before the engine was built; call trainer.train()")
        # [Note: micro-steps]  As accelerate drives DeepSpeed's engine: backward, then engine.step() after every
        # micro-batch; the engine counts micro-steps there and updates at the window's end (DeepSpeed's
        # counters, zero/state.py).  Trainer's own optimizer.step() at the window's end finds it done.
        self.engine.backward(loss, scale_wrt_gas=False)
        if self._engine_optimizer is not None:
            self._engine_optimizer.lr_to_engine()
        self.engine.step()

    # ---- Trainer's hooks -----------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            engine = self.build_engine(self.state.max_steps or self._planned_steps())
            trained = [p for i, p in enumerate(engine.run.params) if i not in engine.run.frozen]
            self._engine_optimizer = EngineOptimizer(engine, trained)
            self.optimizer = self._engine_optimizer
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        if self.lr_scheduler is None and self.engine is not None and self.engine.settings.schedule is not None:
            self.lr_scheduler = EngineSchedule(self.engine)
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer=self._engine_optimizer or optimizer)

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> Any:
        return self.build_engine(self._planned_steps())

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        if any(placed(p) is not None for p in model.parameters()):
            return  # its parameters live in partitions (zero.Init, from_pretrained): the engine places them
        super()._move_model_to_device(model, device)

    def _clip_grad_norm(self, model: Any) -> None:
        return None  # the engine clips at gradient_clipping (max_grad_norm) inside its step

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> None:
        return None  # known after the step: _maybe_log_save_evaluate takes the engine's

    def _maybe_log_save_evaluate(self, tr_loss: torch.Tensor, grad_norm: Any, *args: Any, **kwargs: Any) -> None:
        if self.engine is not None and self.engine.get_global_grad_norm() is not None:
            grad_norm = self.engine.get_global_grad_norm()
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's _save with the weights streamed from their partitions by engine.save_pretrained (every rank
        takes part in the gathers; rank 0 writes), then the processing class and the arguments as Trainer
        writes them."""
        if self.engine is None or state_dict is not None:
            super()._save(output_dir, state_dict=state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.engine.save_pretrained(output_dir)
        if not self.args.should_save:
            return
        saver = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if saver is not None:
            saver.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.engine is None:
            raise UsageError("InfinityTrainer: a checkpoint before the engine was built")
        self.engine.save_checkpoint(output_dir)  # every rank writes its own folder; global_step<N>/, latest
        if self._engine_optimizer is not None and self._engine_optimizer.follows_trainer and self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The engine's checkpoint restores the parameters, in _load_optimizer_and_scheduler."""

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self.engine is None:
            raise UsageError("InfinityTrainer: resuming before the engine was built")
        self.engine.load_checkpoint(checkpoint)
        optimizer = self._engine_optimizer
        if optimizer is not None and optimizer.follows_trainer:
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
            optimizer.param_groups[0]["lr"] = self.lr_scheduler.get_last_lr()[0]  # as optimizer.pt restores it


class InfinityTrainer(InfinityTrainerMixin, Trainer):
    """transformers.Trainer trained through an infinity engine: `InfinityTrainer(model=..., args=
    TrainingArguments(...), train_dataset=..., infinity_config="ds_config_zero3.json")`.  infinity_config is a
    path, a JSON string, a dict or an infinity.Config; "auto" is filled from args and the model."""


class InfinitySeq2SeqTrainer(InfinityTrainerMixin, Seq2SeqTrainer):
    """transformers.Seq2SeqTrainer through an infinity engine (predict_with_generate included); as
    InfinityTrainer."""

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None, **gen_kwargs: Any) -> Any:
        """As Seq2SeqTrainer's, with generate(synced_gpus=True) when the parameters are partitioned over several
        ranks: a rank that finishes first keeps stepping so that every rank enters each all-gather, as
        Transformers does under DeepSpeed ZeRO-3."""
        if self.engine is not None and self.engine.run.world > 1:
            if not gen_kwargs and hasattr(self, "_gen_kwargs"):
                gen_kwargs = self._gen_kwargs.copy()  # what Seq2SeqTrainer would take when none are given
            gen_kwargs.setdefault("synced_gpus", True)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)

"""The engine `infinity.initialize` returns: forward, backward and step with parameters and optimizer
states on the tiers the settings name.  Shaped like DeepSpeed's engine so users switch by an import.

A facade: zero/build.py wires the run's parts, zero/state.py holds the TrainingState and its legal moves,
zero/hooks.py takes the gradients; the engine moves the state along.  Save, load and save_16bit_model
are given the engine's CheckpointView (zero/checkpoint_view.py), which implements their protocol
(infinity/checkpoint/protocol.py)."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from infinity import metrics
from infinity.checkpoint.format import LATEST
from infinity.checkpoint.load import load
from infinity.checkpoint.model_file import save_16bit_model
from infinity.checkpoint.pretrained_folder import save_pretrained
from infinity.checkpoint.restored import Restored
from infinity.checkpoint.save import save
from infinity.config import Config
from infinity.errors import InfinityError, UsageError
from infinity.io.handle import IoStats
from infinity.memory.report import MemoryReport
from infinity.timeline import NO_TIMELINE, Timeline, Track
from infinity.zero.build import Run
from infinity.zero.checkpoint_view import CheckpointView
from infinity.zero.coordinator import EXPECTED_HOOK_WARNING
from infinity.zero.deepspeed_api import DeepSpeedApi
from infinity.zero.hooks import GradientHook
from infinity.zero.nonfinite import FiniteWatch
from infinity.zero.loss_scale import LossScaler
from infinity.zero.param_groups import OptimizerSetup, set_lr, step_client_scheduler
from infinity.zero.settings import EngineSettings, ModelSave, Precision
from infinity.zero.state import Counters, Phase, TrainingState
from infinity.zero.step_report import StepReport

log = logging.getLogger("infinity.zero")
GATHER_KEY = "zero_optimization.stage3_gather_16bit_weights_on_model_save"


class Engine(DeepSpeedApi):
    def __init__(self, model: nn.Module, settings: EngineSettings, config: Config | None = None,
                 exporter: Any = None, setup: OptimizerSetup | None = None, client_scheduler: Any = None):
        """config: the Config settings came from (initialize passes it); exporter: the metrics exporter
        initialize started, which close() stops; setup: the optimizer's rule and parameter groups
        (zero/param_groups.py; None: the config's over one group); client_scheduler: a torch LR scheduler
        over those groups, stepped after each applied optimizer step."""
        self.client_scheduler = client_scheduler
        self.config, self.exporter = config, exporter
        self.counters, self.phase = Counters(), Phase()
        self.scaler = LossScaler(settings.loss_scale) if settings.precision is Precision.FP16 else None
        self.finite = FiniteWatch(settings.nonfinite, self.scaler is not None and self.scaler.dynamic)
        self.timeline: Timeline = NO_TIMELINE  # trace_to() draws the run on one
        self.run = run = Run(model, settings, lambda i, p: self._hook(i, p), setup)
        run.engine = self  # a run rebuilt around new shapes (zero/resize.py) replaces it through rebuild_run
        self._hook = GradientHook(self.phase, run.gradients, self._takes_gradients, self._fail)
        self._grad_norm: float | None = None  # get_global_grad_norm()
        self._step_applied, self._no_sync = False, False
        self.lr_scheduler: Any = None  # initialize() sets its scheduler here, as DeepSpeed's engine holds it
        # The run's other parts are engine.run's (names, shards, homes, coordinator, ranks, ...); checkpoints
        # see the engine through self.checkpointable, the protocol's view (zero/checkpoint_view.py).
        self.module, self.settings, self.optimizer = model, run.settings, run.optimizer
        self.checkpointable = CheckpointView(self)
        self._follow_schedule()

    @property
    def global_steps(self) -> int:
        return self.counters.global_steps

    @property
    def micro_steps(self) -> int:
        return self.counters.micro_steps

    # ---- the DeepSpeed-shaped API -----------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check_usable()
        if torch.is_grad_enabled() and self.run.trains:  # a model frozen whole has no backward of its own to await
            self.phase.to(TrainingState.FORWARD)
        with self.timeline.span("forward", Track.COMPUTE), self.latching_failure(half_done=False), \
                self.run.external.watching():  # zero/external.py
            return self.module(*args, **kwargs)

    forward = __call__

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backward of loss (scaled for fp16, divided by gradient_accumulation_steps unless scale_wrt_gas is
        False, as DeepSpeed's: Transformers' Trainer divides the loss itself)."""
        self._check_usable()
        self._check_trains("backward")
        gas = self.settings.gradient_accumulation_steps if scale_wrt_gas else 1
        scaled = loss.float() / gas
        self.finite.saw_loss(loss)
        if self.scaler is not None:
            scaled = scaled * self.scaler.scale
        before = self.phase.state
        self.phase.to(TrainingState.BACKWARD)
        boundary = self.is_gradient_accumulation_boundary()
        with warnings.catch_warnings(), self.latching_failure(boundary):
            warnings.filterwarnings("ignore", message=EXPECTED_HOOK_WARNING, category=UserWarning)
            try:
                if boundary and not self._no_sync:  # the step follows: its first reads go beside backward
                    self.run.read_ahead_of_step()
                with self.timeline.span("backward", Track.COMPUTE), self.run.external.explaining():
                    scaled.backward()
                    self.run.coordinator.release_all()
            except BaseException:
                if self.phase.state is TrainingState.BACKWARD:
                    self.phase.to(before)  # no gradient reached the optimizer: as if it had not run
                raise
        self.phase.backwards += 1
        self.phase.to(TrainingState.ACCUMULATING)
        return loss

    def step(self, lr_kwargs: dict[str, Any] | None = None) -> None:
        """The optimizer step, at the end of each gradient-accumulation window.  As DeepSpeed's, every call
        counts a micro-step, and global_steps counts every window's step, skipped fp16 steps included."""
        self._check_usable()
        self._check_trains("step")
        if self._no_sync:
            raise UsageError("step() was called inside engine.no_sync(); call it after the block (DeepSpeed refuses "
                             "it there too)")
        if not self.phase.backwards:
            raise UsageError("step() was called without a backward() since the last step; call "
                             "engine.backward(loss) first")
        after = TrainingState.FORWARD if self.phase.forward_open else TrainingState.IDLE
        self.phase.to(TrainingState.STEPPING)
        self.phase.backwards = 0
        boundary = self.is_gradient_accumulation_boundary()
        self.counters.micro_steps += 1
        self._step_applied = False
        if not boundary:  # inside the window
            self.run.coordinator.read_ahead_of_next_step()
            self.phase.to(after if after is TrainingState.FORWARD else TrainingState.ACCUMULATING)
            return
        started, waited = time.perf_counter(), self.optimizer.io_wait_s
        step_scale = self.scaler.scale if self.scaler is not None else 1.0  # the scale this step's grads carry
        with self.latching_failure(True), self.timeline.span("optimizer step", Track.OPTIMIZER):
            overflow = self.run.step_optimizer(self._unscale)
        self.counters.count_step(overflow, self.train_batch_size())
        window = self.global_steps  # every window's step, skipped ones included (DeepSpeed's count)
        self.finite.judge(self.run.reporter.clock, window, self.run.gradients.sumsq, step_scale)
        self._step_applied = not overflow
        if not overflow:
            step_client_scheduler(self.client_scheduler)
        report = self.run.finish_step(self.global_steps, started, waited)
        metrics.record_step(report)
        self.timeline.mark(f"step {self.global_steps}", **report.to_dict())
        self.run.after_step()
        self.run.gradients.reset()
        self._follow_schedule()
        self.phase.to(after)
        self.finite.check(report, window)  # stop_on_nonfinite: the step is over; the run stops here

    def train(self, mode: bool = True) -> "Engine":
        self.module.train(mode)
        return self

    def eval(self) -> "Engine":
        return self.train(False)

    def get_lr(self) -> list[float]:
        """Each parameter group's lr, as DeepSpeed's engine returns it."""
        return [float(group["lr"]) for group in self.run.param_groups]

    def gradient_accumulation_steps(self) -> int:
        return self.settings.gradient_accumulation_steps

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the next step() ends the accumulation window (micro_steps counts step() calls, as
        DeepSpeed's: between backward and step of the window's last micro-batch this is True)."""
        return (self.micro_steps + 1) % self.settings.gradient_accumulation_steps == 0

    def step_report(self) -> StepReport | None:
        """The last optimizer step's breakdown (None before the first step)."""
        return self.run.reporter.last

    def trace_to(self, timeline: Timeline) -> None:
        """Records compute, wait, optimizer and I/O spans on timeline from now on (infinity-train --trace)."""
        self.timeline = timeline
        self.run.trace_to(timeline)

    def parameter_values(self) -> dict[str, torch.Tensor]:
        """Every parameter's current values by name (frozen ones too), as fp32 copies in host memory (read
        one at a time from wherever they live, inside settled())."""
        with self.settled("parameter_values()"):
            return {name: self.run.read_values(i, dtype=torch.float32).clone()
                    for i, name in enumerate(self.run.names)}

    def save_16bit_model(self, save_dir: str | os.PathLike[str], save_filename: str = "pytorch_model.safetensors",
                         exclude_frozen_parameters: bool = False) -> bool:
        """Writes the whole model's weights in the compute dtype, and its buffers, to save_dir/save_filename
        as one safetensors file (infinity.checkpoint.model_file); False, with a warning, when
        stage3_gather_16bit_weights_on_model_save is off, as DeepSpeed does.  With several ranks every
        rank must call it (parameters are gathered); rank 0 writes."""
        path = Path(save_dir) / save_filename
        if self.settings.model_save is ModelSave.SKIP:
            log.warning("save_16bit_model: nothing written to %s because %s is false (the weights are partitioned "
                        "and are not gathered, as DeepSpeed does); set it to true to write the model", path, GATHER_KEY)
            return False
        return save_16bit_model(self.checkpointable, Path(save_dir), save_filename, exclude_frozen_parameters)

    def save_pretrained(self, save_directory: str | os.PathLike[str], max_shard_size: int | str = "50GB") -> None:
        """Writes a folder that Transformers' plain from_pretrained loads: safetensors shards of at most
        max_shard_size, the model's config.json and generation_config.json, one parameter in host memory at a
        time (infinity/checkpoint/pretrained_folder.py).  With several ranks every rank must call it; rank 0
        writes."""
        self._between_steps("save_pretrained")
        save_pretrained(self.checkpointable, Path(save_directory), max_shard_size)

    def __getattr__(self, name: str) -> Any:
        """What the engine lacks is the module's (engine.generate, engine.num_parameters), as DeepSpeed's
        engine forwards it."""
        module = self.__dict__.get("module")
        if module is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(module, name)

    def save_checkpoint(self, save_dir: str, tag: str | None = None,
                        client_state: dict[str, Any] | None = None) -> bool:
        """Writes this rank's folder save_dir/tag/rank_<r> (tag: global_step<N>) durably, streaming NVMe-resident
        state through the async-IO engine, then `latest` once every rank has (infinity/checkpoint/save.py).
        client_state must load with torch.load(weights_only=True).  Call it after step()."""
        self._between_steps("save_checkpoint")
        with self.settled("save_checkpoint()"):
            save(self.checkpointable, save_dir, tag, client_state)
        return True

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Any = None) -> tuple[str | None, Any]:
        """Restores what save_checkpoint wrote for this rank (tag None: the one `latest` names), after checking
        sizes, checksums, the world size and the model; returns (the tag's folder, client_state).  With no
        `latest` file (tag None) or no folder for the tag: a warning and (None, None), as DeepSpeed.
        load_optimizer_states=False: a fresh optimizer (moments zero, step counts 0) over the loaded weights;
        load_lr_scheduler_states=False: the schedule keeps its position and a client scheduler its state;
        load_module_only=True: the weights alone (infinity/checkpoint/restored.py; docs/engine.md)."""
        self._between_steps("load_checkpoint")
        if custom_load_fn is not None:
            raise UsageError("load_checkpoint(custom_load_fn=...): infinity loads the module's weights into their "
                             "partitions itself (there is no whole state dict to hand the function); load the "
                             "weights with load_module_only=True, or change the model through "
                             "infinity.zero.GatheredParameters after loading")
        if not load_module_strict:
            log.warning("load_checkpoint(load_module_strict=False): infinity always checks that the checkpoint "
                        "holds this model's parameters exactly")
        missing = _missing_checkpoint(Path(load_dir), tag)
        if missing:
            log.warning("load_checkpoint: %s; nothing was loaded (None, None), as DeepSpeed returns", missing)
            return None, None
        restored = Restored.of(load_optimizer_states, load_lr_scheduler_states, load_module_only)
        with self.settled("load_checkpoint()"):
            loaded = load(self.checkpointable, load_dir, tag, restored=restored)
        self._follow_schedule()
        return loaded

    def zero_grad(self) -> None:
        """Gradients leave the compute tier as they are made; nothing to clear."""

    def io_stats(self) -> IoStats:
        """Bytes and requests the engine's async-IO handles have moved since initialize (all NVMe paths)."""
        return self.run.io_stats()

    def memory_report(self) -> MemoryReport:
        return self.run.memory_report()

    def close(self) -> None:
        """Removes hooks and this run's swap files, and stops the metrics exporter initialize started."""
        exporter, self.exporter = self.exporter, None
        try:
            self.run.close()
        finally:
            if exporter is not None:
                exporter.stop()

    def rebuild_run(self) -> Run:
        """A new run over the model, after the old one closed (zero/resize.py: a parameter's shape changed)."""
        old = self.run
        setup = old.setup.rebind({id(p): n for n, p in zip(old.names, old.params)}, self.module)
        self.run = run = Run(self.module, self.settings, lambda i, p: self._hook(i, p), setup)
        run.engine = self
        self._hook = GradientHook(self.phase, run.gradients, self._takes_gradients, self._fail)
        self.optimizer, self.checkpointable = run.optimizer, CheckpointView(self)
        if self.timeline.enabled:
            run.trace_to(self.timeline)
        return run

    # ---- phases the checkpoint view (zero/checkpoint_view.py) shares -----------------------
    @contextlib.contextmanager
    def settled(self, caller: str) -> Iterator[None]:
        """Reads the coordinator started ahead are given up for the block and restarted after, so that
        fetching parameters one at a time never competes with them for staging buffers."""
        self._check_usable()
        if self.phase.forward_open or self.run.coordinator.gathered():
            raise UsageError(f"{caller} was called between a forward and its backward (the step's parameters "
                             "are gathered or being read); call it after backward() or step()")
        self.run.coordinator.settle()
        try:
            yield
        except BaseException:
            with contextlib.suppress(InfinityError):  # a failure latched in the block: its error is the one raised
                self.run.coordinator.read_ahead_of_next_step()
            raise
        self.run.coordinator.read_ahead_of_next_step()

    @contextlib.contextmanager
    def latching_failure(self, half_done: bool = True) -> Iterator[None]:
        """An error that stops a step, or a backward sending gradients, midway leaves the optimizer's state
        half updated: the run is latched failed (every later call raises EngineFailed naming it)."""
        try:
            yield
        except BaseException as err:
            if half_done:
                self._fail(err)
            if isinstance(err, InfinityError):  # the other ranks name this one and its error (zero/ranks.py)
                self.run.ranks.tell_failure(err)
            raise

    # ---- inside ----------------------------------------------------------------------
    def _fail(self, err: BaseException) -> None:
        self.phase.fail(err)
        self.run.fail(err)

    def _check_usable(self) -> None:
        self.phase.check()
        self.run.check_usable()

    def _check_trains(self, what: str) -> None:
        """A model frozen whole (a reference model) has no optimizer: backward and step are refused, as
        DeepSpeed's engine refuses backward without an optimizer."""
        if not self.run.trains:
            raise UsageError(f"{what}() was called on an engine whose model has no trainable parameters (every "
                             "parameter has requires_grad=False), so it has no optimizer; run it forward only, "
                             "under torch.no_grad(), as a reference model, or set requires_grad=True on the "
                             "parameters to train before infinity.initialize")

    def _between_steps(self, what: str) -> None:
        self._check_usable()
        if self.phase.state is not TrainingState.IDLE or self.phase.backwards or self.run.coordinator.gathered() or \
                self.micro_steps % self.settings.gradient_accumulation_steps:
            raise UsageError(f"{what}() was called with a step half done (a forward, backward or gradient "
                             f"accumulation window not finished by step()); call it after engine.step()")

    @property
    def lr(self) -> float:
        """The next step's lr: the first parameter group's (what the step reads; the schedule, a client
        scheduler or Trainer sets the groups), the config's with no groups."""
        return float(self.run.param_groups[0]["lr"]) if self.run.param_groups else self.settings.adam.lr

    @property
    def applied_steps(self) -> int:
        """The schedule's position: the optimizer steps that changed the parameters (DeepSpeed does not step its
        scheduler on a skipped step), global_steps - skipped_steps unless a load_checkpoint with
        load_lr_scheduler_states=False kept the engine's own."""
        return self.counters.schedule_steps

    def _follow_schedule(self) -> None:
        """The next step's lr, and OneCycle's betas (set on the optimizer, as DeepSpeed's scheduler does)."""
        schedule = self.settings.schedule
        if schedule is not None:
            set_lr(self.run.param_groups, schedule.lr(self.applied_steps))
        betas = schedule.betas(self.applied_steps) if schedule is not None else None
        if betas is not None:
            for group in self.run.param_groups:  # every group's, as DeepSpeed's OneCycle sets them
                if "betas" in group:
                    group["betas"] = betas

    def _unscale(self, overflow: bool) -> float:
        """Given the step's overflow verdict: updates the loss scale and returns what the gradients are divided
        by (zero/loss_scale.py's note), and keeps the step's gradient norm for get_global_grad_norm()."""
        scaler = self.scaler
        step_scale = scaler.scale if scaler is not None else 1.0
        if scaler is not None:
            scaler.update(overflow)
        divide_by = scaler.unscale_by(step_scale) if scaler is not None else 1.0
        self._grad_norm = math.inf if overflow else math.sqrt(self.run.gradients.sumsq) / divide_by
        return divide_by

    def _takes_gradients(self) -> bool:
        """Whether the gradient hook sends gradients on now: at the window's end, outside no_sync()."""
        return self.is_gradient_accumulation_boundary() and not self._no_sync


def _missing_checkpoint(load_dir: Path, tag: str | None) -> str | None:
    """Why there is nothing to load (DeepSpeed then warns and returns (None, None)), or None."""
    if tag is None and not (load_dir / LATEST).is_file():
        return f"no {LATEST!r} file in {load_dir} (pass tag= to load a particular checkpoint)"
    if tag is not None and not (load_dir / tag).exists():
        return f"no checkpoint {tag!r} in {load_dir}"
    return None

"""The engine `infinity.initialize` returns: forward, backward and step with parameters and optimizer
states on the tiers the settings name.  Shaped like DeepSpeed's engine so users switch by an import."""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from infinity import metrics
from infinity.config import Config
from infinity.errors import EngineFailed, UsageError
from infinity.io.handle import IoStats
from infinity.memory.report import MemoryReport
from infinity.memory.stream import Part
from infinity.swap.params import AfterWrite
from infinity.zero.build import Run
from infinity.zero.coordinator import EXPECTED_HOOK_WARNING
from infinity.zero.loss_scale import LossScaler
from infinity.timeline import NO_TIMELINE, Timeline, Track
from infinity.zero.settings import EngineSettings, Precision
from infinity.zero.step_report import StepReport, Wait

log = logging.getLogger("infinity.zero")


class Engine:
    def __init__(self, model: nn.Module, settings: EngineSettings):
        self.global_steps = self.micro_steps = 0
        self.scaler = LossScaler(settings.loss_scale) if settings.precision is Precision.FP16 else None
        self._pending_backward = False  # a backward since the last step
        self._forward_open = False  # a forward that builds a graph ran, and its backward has not
        self._param_names = {id(p): n for n, p in model.named_parameters()}  # to catch later changes
        self._failure: BaseException | None = None  # a step or backward stopped midway
        self.timeline: Timeline = NO_TIMELINE  # trace_to() draws the run on one
        self.run = run = Run(model, settings, self._on_grad)
        self.ranks, self.world, self.rank, self.module, self.settings = run.ranks, run.world, run.rank, model, run.settings
        self.names, self.params, self.device, self.shapes, self.shards = run.names, run.params, run.device, run.shapes, run.shards
        self.budgets, self.persistent, self.groups, self.optimizer = run.budgets, run.persistent, run.groups, run.optimizer
        self.reporter, self.gradients, self.homes, self.offloaded = run.reporter, run.gradients, run.homes, run.offloaded
        self.coordinator, self._managers = run.coordinator, run._managers
        self._param_pool, self._slice = getattr(run, "_param_pool", None), run._slice
        self._gather, self._read_values = run._gather, run._read_values
        self._hold: frozenset[int] = frozenset()  # parameters whose new values the optimizer step holds
        self.lr = self._lr()
        self.config: Config | None = None  # set by infinity.initialize
        self.exporter: Any = None  # the metrics exporter infinity.initialize started; close() stops it

    # ---- the DeepSpeed-shaped API -----------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check_usable()
        self._forward_open = self._forward_open or torch.is_grad_enabled()
        with self.timeline.span("forward", Track.COMPUTE):
            return self.module(*args, **kwargs)

    forward = __call__

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward of loss (scaled for fp16, divided by gradient_accumulation_steps)."""
        self._check_usable()
        gas = self.settings.gradient_accumulation_steps
        self._boundary = (self.micro_steps + 1) % gas == 0
        scaled = loss.float() / gas
        if self.scaler is not None:
            scaled = scaled * self.scaler.scale
        with warnings.catch_warnings(), self._failing_on_error(self._boundary):
            warnings.filterwarnings("ignore", message=EXPECTED_HOOK_WARNING, category=UserWarning)
            with self.timeline.span("backward", Track.COMPUTE):
                scaled.backward()
                self.coordinator.release_all()
        self.micro_steps += 1
        self._forward_open = False
        self._pending_backward = True
        return loss

    def step(self) -> None:
        """The optimizer step, at the end of each gradient-accumulation window."""
        self._check_usable()
        if not self._pending_backward:
            raise UsageError("step() was called without a backward() since the last step; call "
                             "engine.backward(loss) first")
        self._pending_backward = False
        if not self._boundary:
            self.coordinator.read_ahead_of_next_step()
            return
        started, waited = time.perf_counter(), self.optimizer.io_wait_s
        with self._failing_on_error(True), self.timeline.span("optimizer step", Track.OPTIMIZER):
            overflow = self.gradients.agree()
            self._hold = frozenset() if overflow else frozenset(self.coordinator.first_reads(self.run._holdable()))
            if not overflow:
                self.optimizer.step(self.lr, self._grad_coef(), self._write_param, self.run._flush_params)
                self.global_steps += 1
            else:
                self.optimizer.discard_grads()
            with self.reporter.clock.waiting(Wait.OPTIMIZER_IO):
                self.run._flush_params(None)  # the step's parameter writes are all on NVMe when it returns
        self.reporter.clock.optimizer_s += time.perf_counter() - started
        self.reporter.clock.add_wait(Wait.OPTIMIZER_IO, self.optimizer.io_wait_s - waited)
        moved = self.io_stats()
        report = self.reporter.finish(self.global_steps, moved.bytes_read, moved.bytes_written,
                                      self.coordinator.cursor.invalidations)
        metrics.record_step(report)
        self.timeline.mark(f"step {self.global_steps}", **report.to_dict())
        held = tuple(i for i in sorted(self._hold) if self.homes[i].read_ready(i))
        self._hold = frozenset()
        self.coordinator.read_ahead_of_next_step(held)
        for m in self._managers.values():
            m.store.warn_if_deleted()
        if self.scaler is not None:
            self.scaler.update(overflow)
        self.gradients.reset()
        self.lr = self._lr()

    def train(self, mode: bool = True) -> "Engine":
        self.module.train(mode)
        return self

    def eval(self) -> "Engine":
        return self.train(False)

    def get_lr(self) -> list[float]:
        return [self.lr]

    def gradient_accumulation_steps(self) -> int:
        return self.settings.gradient_accumulation_steps

    def train_micro_batch_size_per_gpu(self) -> int:
        return int(self.config.train_micro_batch_size_per_gpu) if self.config is not None else 1

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.settings.gradient_accumulation_steps == 0

    def step_report(self) -> StepReport | None:
        """The last optimizer step's breakdown (None before the first step)."""
        return self.reporter.last

    def trace_to(self, timeline: Timeline) -> None:
        """Records compute, wait, optimizer and I/O spans on timeline from now on (infinity-train --trace)."""
        self.timeline = self.coordinator.timeline = self.optimizer.timeline = timeline
        for m in self._managers.values():
            m.handle.timeline = timeline

    def parameter_values(self) -> dict[str, torch.Tensor]:
        """Every parameter's current values by name, as fp32 copies in host memory (read one at a time
        from wherever they live; reads the coordinator started ahead are given up first and restarted
        after, so the copies never compete with them for staging buffers)."""
        with self._settled("parameter_values()"):
            return {name: self._read_values(i).clone() for i, name in enumerate(self.names)}

    def save_16bit_model(self, save_dir: str | os.PathLike[str], save_filename: str = "pytorch_model.safetensors",
                         exclude_frozen_parameters: bool = False) -> bool:
        """Writes the whole model's weights in the compute dtype, and its buffers, to save_dir/save_filename
        as one safetensors file (infinity.checkpoint.model_file); False, with a warning, when
        stage3_gather_16bit_weights_on_model_save is off, as DeepSpeed does.  With several ranks every
        rank must call it (parameters are gathered); rank 0 writes."""
        from infinity.checkpoint.model_file import save_16bit_model

        return save_16bit_model(self, Path(save_dir), save_filename, exclude_frozen_parameters)

    def save_checkpoint(self, save_dir: str, tag: str | None = None,
                        client_state: dict[str, Any] | None = None) -> bool:
        """Writes this rank's folder save_dir/tag/rank_<r> (tag: global_step<N>) durably, streaming NVMe-resident
        state through the async-IO engine, then `latest` once every rank has (infinity/checkpoint/save.py).
        client_state must load with torch.load(weights_only=True).  Call it after step()."""
        from infinity.checkpoint.save import save

        self._between_steps("save_checkpoint")
        with self._settled("save_checkpoint()"):
            save(self, save_dir, tag, client_state)
        return True

    def load_checkpoint(self, load_dir: str, tag: str | None = None) -> tuple[str, Any]:
        """Restores everything save_checkpoint wrote for this rank (tag None: the one `latest` names), after
        checking sizes, checksums, the world size and the model; returns (the tag's folder, client_state)."""
        from infinity.checkpoint.load import load

        self._between_steps("load_checkpoint")
        with self._settled("load_checkpoint()"):
            loaded = load(self, load_dir, tag)
        self.lr = self._lr()
        return loaded

    def _between_steps(self, what: str) -> None:
        self._check_usable()
        if self._forward_open or self._pending_backward or self.coordinator.gathered() or \
                self.micro_steps % self.settings.gradient_accumulation_steps:
            raise UsageError(f"{what}() was called with a step half done (a forward, backward or gradient "
                             f"accumulation window not finished by step()); call it after engine.step()")

    def _param_part(self, i: int) -> Part:
        """Where this rank's part of parameter i (engine.shards[i]) rests between uses: what checkpoints save
        and load.  [Note: one place]  With a world of one rank the part is the whole parameter."""
        return self.homes[i].part(i)

    def zero_grad(self) -> None:
        """Gradients leave the compute tier as they are made; nothing to clear."""

    def io_stats(self) -> IoStats:
        return self.run.io_stats()

    def memory_report(self) -> MemoryReport:
        return self.run.memory_report()

    def close(self) -> None:
        """Removes hooks and this run's swap files, and stops the metrics exporter initialize started."""
        exporter, self.exporter = self.exporter, None
        try:
            self.coordinator.remove()
            for m in self._managers.values():
                m.close()
            self._managers.clear()
        finally:
            if exporter is not None:
                exporter.stop()

    # ---- gradients --------------------------------------------------------------
    def _on_grad(self, i: int, p: torch.Tensor) -> None:
        if self._boundary and p.grad is not None:  # accumulating: torch keeps adding into p.grad
            self.gradients.take(i, p)

    def _grad_coef(self) -> float:
        return self.gradients.coef(self.scaler.scale if self.scaler is not None else 1.0,
                                   self.settings.gradient_clipping)

    def _write_param(self, s: Any, values: torch.Tensor) -> set[str]:
        after = AfterWrite.HOLD if s.index in self._hold else AfterWrite.DROP
        return self.homes[s.index].write(s.index, values, after)

    def _lr(self) -> float:
        schedule = self.settings.schedule
        return schedule.lr(self.global_steps) if schedule else self.settings.adam.lr

    @contextlib.contextmanager
    def _settled(self, caller: str) -> Iterator[None]:
        """Reads the coordinator started ahead are given up for the block and restarted after, so that
        fetching parameters one at a time never competes with them for staging buffers."""
        self._check_usable()
        if self._forward_open or self.coordinator.gathered():
            raise UsageError(f"{caller} was called between a forward and its backward (the step's parameters "
                             "are gathered or being read); call it after backward() or step()")
        self.coordinator.settle()
        try:
            yield
        finally:
            self.coordinator.read_ahead_of_next_step()


    def _check_usable(self) -> None:
        if self._failure is not None:
            raise EngineFailed.of(self._failure)
        for m in self._managers.values():
            m.check_healthy()
        now = {id(p): n for n, p in self.module.named_parameters()}
        if now.keys() != self._param_names.keys():
            added = [n for i, n in now.items() if i not in self._param_names]
            gone = [n for i, n in self._param_names.items() if i not in now]
            changes = {"replaced": [n for n in added if n in gone], "added": [n for n in added if n not in gone],
                       "removed": [n for n in gone if n not in added]}
            what = "; ".join(f"{how} after infinity.initialize: {', '.join(names)}"
                             for how, names in changes.items() if names)
            raise UsageError(f"the model's parameters changed ({what}); the engine trains the Parameter objects it "
                             f"was given: build the whole model first, then call initialize, and assign no new "
                             f"Parameters after")

    @contextlib.contextmanager
    def _failing_on_error(self, half_done: bool) -> Iterator[None]:
        """An error that stops a step, or a backward sending gradients, midway leaves the optimizer's state
        half updated: the run is latched failed (every later call raises EngineFailed naming it)."""
        try:
            yield
        except BaseException as err:
            if half_done:
                self._failure = self._failure or err
                for m in self._managers.values():
                    m.fail(err)
            raise


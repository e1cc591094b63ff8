"""The engine `infinity.initialize` returns: forward, backward and step with parameters and optimizer
states on the tiers the settings name.  Shaped like DeepSpeed's engine so users switch by an import."""
from __future__ import annotations

import contextlib
import dataclasses
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
from infinity.memory.host_buffer import PinPolicy
from infinity.memory.manager import MemoryManager
from infinity.memory.pool import BufferPool
from infinity.memory.report import MemoryReport
from infinity.memory.stream import Part
from infinity.swap.layout import plan_groups
from infinity.swap.optimizer import HostOptimizer, NvmeOptimizer
from infinity.schedule import persistent_set
from infinity.swap.params import AfterWrite, ComputeHome, HostHome, NvmeHome, ParamHome, Tier
from infinity.zero.coordinator import EXPECTED_HOOK_WARNING, Coordinator
from infinity.zero.init import placed
from infinity.zero.loss_scale import LossScaler
from infinity.zero.placement import check_placement, open_manager, optimizer_pool, param_pool
from infinity.timeline import NO_TIMELINE, Timeline, Track
from infinity.zero.settings import EngineSettings, Precision, budgets_of, dtype_of
from infinity.zero.gather import ShardedHome, piece_of
from infinity.zero.gradients import Gradients
from infinity.zero.ranks import current
from infinity.zero.shard import Shard, shard_of
from infinity.zero.step_report import StepReport, StepReporter, Wait

log = logging.getLogger("infinity.zero")


class Engine:
    def __init__(self, model: nn.Module, settings: EngineSettings):
        self.ranks = current()  # torch.distributed's (one process: world 1)
        self.world, self.rank = self.ranks.world, self.ranks.rank
        if self.ranks.several and settings.rank != self.rank:
            settings = dataclasses.replace(settings, rank=self.rank)  # swap files in this rank's own folder
        self.module, self.settings = model, settings
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.global_steps = self.micro_steps = 0
        self.scaler = LossScaler(settings.loss_scale) if settings.precision is Precision.FP16 else None
        self._managers: dict[str, MemoryManager] = {}
        self._pending_backward = False  # a backward since the last step
        self._forward_open = False  # a forward that builds a graph ran, and its backward has not
        self._param_names = {id(p): n for n, p in model.named_parameters()}  # to catch later changes
        self._failure: BaseException | None = None  # a step or backward stopped midway
        self.timeline: Timeline = NO_TIMELINE  # trace_to() draws the run on one
        self.shapes = [_shape_of(p) for p in self.params]
        self.budgets = budgets_of(settings)  # the stage-3 schedule's: persistence here, the rest in the coordinator
        built_under_init = {i for i, p in enumerate(self.params) if placed(p) is not None}
        self.persistent = persistent_set(((i, shape.numel()) for i, shape in enumerate(self.shapes)
                                          if i not in built_under_init), self.budgets)
        self.shards: list[Shard] = [shard_of(n, s, self.world, self.rank, replicated=i in self.persistent)
                                    for i, (n, s) in enumerate(zip(self.names, self.shapes))]
        check_placement(settings, self.shards, bool(self.params))
        self._adopted = self._adopt_init()
        self._agree_on_initial_values()
        self.groups = plan_groups([(sh.name, sh.length) for sh in self.shards], settings.sub_group_size)
        self.optimizer = self._build_optimizer()
        self.reporter = StepReporter(settings.report_every, self.rank)
        self.gradients = Gradients(self.shards, self.ranks, self.optimizer, self._slice, self.reporter.clock,
                                   self.device)
        self.homes, self.offloaded = self._build_param_homes()
        for m in self._managers.values():
            m.store.reserve()  # before any transfer: whole-block reads of zero.Init's partitions need the room
        self.optimizer.set_master(self._initial_values)
        self._place_params()
        self.coordinator = Coordinator(model, self.params, self.homes, self.offloaded, self._on_grad,
                                       [shape.numel() for shape in self.shapes], self.budgets, self.reporter.clock)
        try:
            self.coordinator.install()
        except BaseException:
            self.coordinator.remove()
            for m in self._managers.values():
                m.close()  # a refused config leaves no swap files behind
            raise
        self._lend_staging_buffers()
        self._hold: frozenset[int] = frozenset()  # parameters whose new values the optimizer step holds
        moved = self.io_stats()
        self.reporter.start(moved.bytes_read, moved.bytes_written)
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
            self._hold = frozenset() if overflow else frozenset(self.coordinator.first_reads(self._holdable()))
            if not overflow:
                self.optimizer.step(self.lr, self._grad_coef(), self._write_param, self._flush_params)
                self.global_steps += 1
            else:
                self.optimizer.discard_grads()
            with self.reporter.clock.waiting(Wait.OPTIMIZER_IO):
                self._flush_params(None)  # the step's parameter writes are all on NVMe when it returns
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
        """Bytes and requests the engine's async-IO handles have moved since initialize (all NVMe paths)."""
        stats = [m.handle.stats for m in self._managers.values()]
        return IoStats(*(sum(getattr(s, f.name) for s in stats) for f in dataclasses.fields(IoStats)))

    def memory_report(self) -> MemoryReport:
        reports = [m.ledger.report() for m in self._managers.values()]
        pools = sum(p.buffer_count * p.buffer_bytes for p in self._pools())
        fields = [sum(getattr(r, f) for r in reports) for f in
                  ("compute_bytes", "host_bytes", "nvme_bytes", "peak_compute_bytes", "peak_host_bytes",
                   "peak_nvme_bytes")]
        return MemoryReport(*fields, host_pool_bytes=pools)

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

    def _holdable(self) -> int:
        """How many parameters' new values the optimizer step may hold in staging buffers for the next
        step's first modules (AfterWrite.HOLD).  [Note: half the pool]  The step's other parameter writes
        are staged through the same pool: holding more buffers leaves them fewer to keep in flight."""
        if self.world > 1:
            return 0  # which held values count as arrived depends on write timing: ranks could differ (gather.py)
        pool = getattr(self, "_param_pool", None)
        return pool.buffer_count // 2 if pool is not None else 0

    def _lend_staging_buffers(self) -> None:
        """On a CPU compute tier, a parameter's staging buffer is its compute copy while it is gathered,
        keeping as many buffers for reads as one module gathers (infinity/memory/compute_tier.py)."""
        pool = getattr(self, "_param_pool", None)
        if pool is not None:
            self._manager(str(self.settings.param_nvme_path)).lend_to_compute(pool, self.coordinator.largest_gather())

    def _flush_params(self, keys: set[str] | None) -> None:
        """Completes parameter writes (of keys, or all) in every manager: the parameters' swap files may
        be under another nvme_path than the optimizer's."""
        for m in self._managers.values():
            m.flush(keys)

    def _lr(self) -> float:
        schedule = self.settings.schedule
        return schedule.lr(self.global_steps) if schedule else self.settings.adam.lr

    # ---- construction -----------------------------------------------------------
    def _manager(self, path: str) -> MemoryManager:
        if path not in self._managers:
            self._managers[path] = open_manager(self.settings, path, self.device)
        return self._managers[path]

    def _adopt_init(self) -> dict[int, str]:
        """Parameters built under zero.Init are on NVMe already: take over their swap store."""
        records = {i: r for i, r in ((i, placed(p)) for i, p in enumerate(self.params)) if r is not None}
        runs = {id(r.run): r.run for r in records.values()}
        if not records:
            return {}
        if len(runs) > 1:
            raise UsageError("the model's parameters come from more than one zero.Init; build the whole model "
                             "under one zero.Init context")
        run = next(iter(runs.values()))
        if (run.ranks.world, run.ranks.rank) != (self.world, self.rank):
            raise UsageError(f"the model was built under zero.Init as rank {run.ranks.rank} of {run.ranks.world}, "
                             f"but initialize runs as rank {self.rank} of {self.world}: start the process group "
                             f"(torchrun, or infinity.init_distributed) before zero.Init, or let zero.Init start it")
        if self.settings.param_tier is not Tier.NVME:
            raise UsageError("the model was built under zero.Init with offload_param nvme, but initialize's config "
                             f"puts parameters on {self.settings.param_tier.value}; pass the same config to both")
        manager = run.take(self.settings)
        manager.device = self.device
        self._managers[str(self.settings.param_nvme_path)] = manager
        return {i: r.key for i, r in records.items()}

    def _initial_values(self, s: Any) -> torch.Tensor:
        """A parameter's values for the fp32 master (this rank's piece with several ranks): its own, or for
        one built under zero.Init, read back (zero.Init wrote only this rank's piece)."""
        i = s.index
        if i in self._adopted:
            home = self.homes[i]
            return self._read_values(i, home.inner if isinstance(home, ShardedHome) else home)
        values = self.params[i].detach().float()
        return piece_of(values, self.shards[i]) if self.world > 1 else values

    def _agree_on_initial_values(self) -> None:
        """[Note: rank 0's initial values]  With several ranks, every parameter and buffer not written by
        zero.Init (which broadcast its own) takes rank 0's values, as DeepSpeed's engine does: ranks that
        seeded differently would otherwise start replicated parameters apart and never meet again."""
        if not self.ranks.several:
            return
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if i not in self._adopted:
                    self.ranks.broadcast(p.data, f"initial values of parameter {self.names[i]!r}")
            for name, b in self.module.named_buffers():
                self.ranks.broadcast(b.data, f"initial values of buffer {name!r}")

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

    def _gather(self, i: int) -> None:
        """Fetches and releases parameter i, keeping nothing: a rank's part in another rank's _read_values of
        it (with several ranks each fetch is an all-gather that every rank enters, in the same order)."""
        self.homes[i].fetch(i)
        self.homes[i].release(i)

    def _read_values(self, i: int, home: ParamHome | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Parameter i whole and shaped from its home (or the home given), in dtype in host memory, as a copy.

        [Note: a copy, so no view outlives the release]  On a CPU compute tier the fetched values may be a
        staging buffer lent to the compute tier; a view of it still alive at the release would make the
        pool replace the buffer (BufferPool.replace).  The copy is made from a temporary view, so none is."""
        home = home if home is not None else self.homes[i]
        values = home.fetch(i).detach().to("cpu", dtype, copy=True)  # a fetch that fails has nothing to release
        home.release(i)
        return values

    def _build_optimizer(self) -> HostOptimizer | NvmeOptimizer:
        s = self.settings
        self._slice = {sl.index: sl for g in self.groups for sl in g.slices}
        if s.optimizer_tier is not Tier.NVME:
            return HostOptimizer(self.groups, s.adam)
        self._optimizer_pool = optimizer_pool(s, self.groups, self._pin())
        return NvmeOptimizer(self._manager(str(s.optimizer_nvme_path)), self.groups, self._optimizer_pool, s.adam,
                             s.pipeline)

    def _build_param_homes(self) -> tuple[list[ParamHome], set[int]]:
        """The home of each parameter, and which are offloaded (gathered for each use by the coordinator).

        [Note: with several ranks every parameter not persistent is a shard]  Then even offload_param none
        keeps only the rank's pieces (on the compute tier itself, in a HostHome whose storage is there) and
        gathers the whole parameter for each use: that is ZeRO stage 3's partitioning; the tier only says
        where the pieces rest.  Persistent parameters stay whole on every rank (replicated)."""
        s = self.settings
        dtype = dtype_of(s.precision)
        sharded = self.world > 1  # [Note: with several ranks every parameter not persistent is a shard]
        offloaded = {i for i in range(len(self.params))
                     if (s.param_tier is not Tier.COMPUTE or sharded) and i not in self.persistent}
        homes: list[ParamHome] = [ComputeHome(self.params)] * len(self.params)
        shapes = {i: torch.Size([self.shards[i].length]) if sharded else self.shapes[i] for i in offloaded}
        if offloaded and s.param_tier is not Tier.NVME:  # host memory, or the compute tier's own (sharded)
            pin = s.param_tier is Tier.HOST and self._pin() is not PinPolicy.PAGEABLE and torch.cuda.is_available()
            device = self.device if s.param_tier is Tier.COMPUTE else torch.device("cpu")
            home: ParamHome = HostHome(shapes, dtype, self.device, pin=pin, where=device)
        elif offloaded:
            self._param_pool = param_pool(s, max(shape.numel() for shape in shapes.values()), dtype, self._pin())
            home = NvmeHome(self._manager(str(s.param_nvme_path)), self._param_pool,
                            {i: self.names[i] for i in offloaded}, shapes, dtype, adopted=self._adopted,
                            max_in_cpu=s.param_max_in_cpu)
        if offloaded and sharded:
            home = ShardedHome(home, {i: self.shards[i] for i in offloaded}, self.ranks, dtype, self.device)
        for i in offloaded:
            homes[i] = home
        return homes, offloaded

    def _place_params(self) -> None:
        dtype = dtype_of(self.settings.precision)
        for i, p in enumerate(self.params):
            if i in self._adopted:
                continue
            if i in self.offloaded:
                self.homes[i].put(i, p.detach())  # type: ignore[attr-defined]
                p.data = torch.empty(0, dtype=dtype, device=self.device)
            elif p.dtype != dtype:
                p.data = p.data.to(dtype)

    def _pin(self) -> PinPolicy:
        return PinPolicy.AUTO if self.settings.pin_memory else PinPolicy.PAGEABLE

    def _pools(self) -> list[BufferPool]:
        return [p for p in (getattr(self, "_param_pool", None), getattr(self, "_optimizer_pool", None)) if p]

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


def _shape_of(p: nn.Parameter) -> torch.Size:
    """The parameter's shape, or for one built under zero.Init (its storage emptied), the shape it had."""
    record = placed(p)
    return record.shape if record is not None else p.shape

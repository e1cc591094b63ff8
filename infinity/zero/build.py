"""Wiring one run: the engine's parts (ranks, shards, parameter homes, the optimizer, the coordinator, the
memory managers) built from the model and the settings, and the operations on those parts alone.
The Engine (engine.py) is the facade over a Run: its training phases and the DeepSpeed-shaped API."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable

import torch
from torch import nn

from infinity.errors import CheckpointError, InfinityError, UsageError
from infinity.io.handle import IoHandle, IoStats
from infinity.memory.host_buffer import PinPolicy
from infinity.memory.manager import MemoryManager
from infinity.memory.pool import BufferPool
from infinity.memory.report import MemoryReport
from infinity.swap.layout import Slice, plan_groups
from infinity.swap.optimizer import HostOptimizer, NvmeOptimizer
from infinity.zero.param_groups import OptimizerSetup, optimizer_setup
from infinity.schedule import persistent_set
from infinity.memory.policy import Origin
from infinity.swap.params import AfterWrite, ComputeHome, HostHome, NvmeHome, ParamHome, Tier
from infinity.zero.coordinator import Coordinator
from infinity.zero.init import placed
from infinity.zero.placeholders import guard_state_dict, mark_partitioned
from infinity.zero.placement import check_placement, open_manager, optimizer_pool, param_pool
from infinity.zero.settings import EngineSettings, budgets_of, dtype_of, warn_slow_half_precision
from infinity.zero.gather import ShardedHome, piece_of
from infinity.zero.gathered import claim
from infinity.zero.external import ExternalParameters, check_placeholders
from infinity.zero.frozen import check_frozen, frozen_of, held
from infinity.zero.gradients import Gradients
from infinity.zero.ranks import current
from infinity.shard import Shard, shard_of
from infinity.timeline import Timeline
from infinity.zero.step_report import StepReport, StepReporter, Wait


PARAM_PATH = "zero_optimization.offload_param.nvme_path"
OPTIMIZER_PATH = "zero_optimization.offload_optimizer.nvme_path"

class Run:
    """The wired parts of one run (what Engine.__init__ built before).  on_grad(i, p) is called by the
    coordinator's hooks as each parameter's gradient is made.  setup: the optimizer's rule and parameter groups
    (zero/param_groups.py; None: the config's optimizer over one group of every parameter)."""

    def __init__(self, model: nn.Module, settings: EngineSettings, on_grad: Callable[[int, torch.Tensor], None],
                 setup: OptimizerSetup | None = None):
        self.ranks = current()  # torch.distributed's (one process: world 1)
        self.world, self.rank = self.ranks.world, self.ranks.rank
        if self.ranks.several and settings.rank != self.rank:
            settings = dataclasses.replace(settings, rank=self.rank)  # swap files in this rank's own folder
        self.module, self.settings = model, settings
        named = [(n, p) for n, p in model.named_parameters() if held(p)]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.frozen = frozen_of(self.params)  # [Note: frozen parameters] (zero/frozen.py)
        self.device = self.params[0].device if self.params else torch.device("cpu")
        warn_slow_half_precision(settings.precision, self.device)
        self._managers: dict[str, MemoryManager] = {}
        self._param_pool: BufferPool | None = None  # built with the homes when parameters are on NVMe
        self._nvme_home: NvmeHome | None = None  # the home of the parameters on NVMe, when they are
        self._optimizer_pool: BufferPool | None = None  # built with the optimizer when its states are
        self._param_names = {id(p): n for n, p in model.named_parameters()}  # to catch later changes
        self._hold: frozenset[int] = frozenset()  # parameters whose new values the optimizer step holds
        self.shapes = [_shape_of(p) for p in self.params]
        self.budgets = budgets_of(settings)  # the stage-3 schedule's: persistence here, the rest in the coordinator
        built_under_init = {i for i, p in enumerate(self.params) if placed(p) is not None}
        self.persistent = persistent_set(((i, shape.numel()) for i, shape in enumerate(self.shapes)
                                          if i not in built_under_init), self.budgets)
        self.shards: list[Shard] = [shard_of(n, s, self.world, self.rank, replicated=i in self.persistent)
                                    for i, (n, s) in enumerate(zip(self.names, self.shapes))]
        check_placement(settings, self.shards, bool(self.params))
        try:
            self._wire(model, on_grad, setup)
        except BaseException:
            for m in self._managers.values():
                m.close()  # a run refused part way (a full drive, say) leaves no swap files behind
            raise

    def _wire(self, model: nn.Module, on_grad: Callable[[int, torch.Tensor], None],
              setup: OptimizerSetup | None) -> None:
        """The parts that open swap stores (zero.Init's, taken over, included); __init__ closes them on error."""
        settings = self.settings
        self._adopted = self._adopt_init()
        self._agree_on_initial_values()
        self.setup = setup if setup is not None else optimizer_setup(model, settings)
        self.param_groups = self.setup.groups  # torch-style dicts whose hyperparameters each step reads
        self.groups = plan_groups([(sh.name, sh.length) for sh in self.shards], settings.sub_group_size,
                                  self.setup.group_of(self.params))  # frozen parameters: in no sub-group
        self.optimizer = self._build_optimizer()
        self.reporter = StepReporter(settings.report_every, self.rank,
                                     sum(sh.real for i, sh in enumerate(self.shards) if i not in self.frozen))
        self.gradients = Gradients(self.shards, self.ranks, self.optimizer, self._slice, self.reporter.clock,
                                   self.device)
        self.homes, self.offloaded = self._build_param_homes()
        for m in self._managers.values():
            m.store.reserve()  # before any transfer: whole-block reads of zero.Init's partitions need the room
        self.optimizer.set_master(self._initial_values)
        if self._nvme_home is not None:
            self._nvme_home.share_masters()  # zero.Init's partitions: into the master, which now holds them
        self._place_params()
        for i in self.offloaded:  # [Note: the whole size] (zero/placeholders.py)
            mark_partitioned(self.params[i], self.shapes[i])
        guard_state_dict(model)
        self.coordinator = Coordinator(model, self.params, self.homes, self.offloaded, on_grad,
                                       [shape.numel() for shape in self.shapes], self.budgets, self.reporter.clock)
        try:
            self.coordinator.install()
        except BaseException:
            self.coordinator.remove()
            raise
        self._lend_staging_buffers()
        claim(self)  # GatheredParameters finds a parameter's run through it
        self.external = ExternalParameters(model, self.coordinator, self.names, self.shapes)
        moved = self.io_stats()
        self.reporter.start(moved.bytes_read, moved.bytes_written)

    @property
    def trains(self) -> bool:
        """Whether any parameter is trained (a model frozen whole, a reference model, has no optimizer)."""
        return len(self.frozen) < len(self.params)

    @property
    def managers(self) -> list[MemoryManager]:
        """The run's memory managers, one per nvme_path (none when nothing is on NVMe)."""
        return list(self._managers.values())

    @property
    def param_pool(self) -> BufferPool | None:
        """The staging buffers of parameters on NVMe (None when none are)."""
        return self._param_pool

    @property
    def slices(self) -> dict[int, Slice]:
        """Each trained parameter's slice of its optimizer sub-group, by parameter index."""
        return self._slice

    def io_handle(self) -> IoHandle | None:
        """The run's own async-IO handle (its first manager's), or None when nothing is on NVMe."""
        managers = self.managers
        return managers[0].handle if managers else None

    def trace_to(self, timeline: Timeline) -> None:
        """The coordinator, the optimizer and every async-IO handle record their spans on timeline."""
        self.coordinator.timeline = self.optimizer.timeline = timeline
        for m in self._managers.values():
            m.handle.timeline = timeline

    # ---- the optimizer step ----------------------------------------------------------
    def read_ahead_of_step(self) -> None:
        """The backward before a window's step is starting: the optimizer starts its first reads now
        ([Note: the step's I/O beside backward and the next forward] in swap/optimizer.py); waiting for the
        last step's writes to make room counts as the optimizer's I/O wait."""
        with self.reporter.clock.waiting(Wait.OPTIMIZER_IO):
            self.optimizer.read_ahead()

    def step_optimizer(self, unscale: Callable[[bool], float]) -> bool:
        """The optimizer step at a window's end (the caller latches its failures); True on an fp16 overflow
        (the step skipped).  unscale, given the overflow verdict, returns the loss scale the gradients are
        divided by (the engine updates its scaler there, as DeepSpeed does before it unscales).  The step's
        parameter writes are all on NVMe when it returns."""
        overflow = self.gradients.agree()
        loss_scale = unscale(overflow)
        self._hold = frozenset() if overflow else frozenset(self.coordinator.first_reads(self._holdable()))
        if not overflow:
            self.optimizer.step(self.gradients.coef(loss_scale, self.settings.gradient_clipping),
                                self._write_param, self._flush_params)
        else:
            self.optimizer.discard_grads()
        with self.reporter.clock.waiting(Wait.OPTIMIZER_IO):
            self._flush_params(None)
        return overflow

    def _write_param(self, s: Any, values: torch.Tensor) -> set[str]:
        after = AfterWrite.HOLD if s.index in self._hold else AfterWrite.DROP
        home = self._nvme_home
        if home is not None and s.index in home.shared:  # the master write is its write
            return home.updated(s.index, values, after)
        if home is not None and s.index in home.following:  # the master's values: it may read them from there
            return home.write(s.index, values, after, Origin.FOLLOWED)
        return self.homes[s.index].write(s.index, values, after)

    def finish_step(self, global_steps: int, started: float, waited: float) -> StepReport:
        """The step's report (started: its perf_counter start; waited: the optimizer's io_wait_s then)."""
        self.reporter.clock.optimizer_s += time.perf_counter() - started
        self.reporter.clock.add_wait(Wait.OPTIMIZER_IO, self.optimizer.io_wait_s - waited)
        moved = self.io_stats()
        return self.reporter.finish(global_steps, moved.bytes_read, moved.bytes_written,
                                    self.coordinator.cursor.invalidations)

    def after_step(self) -> None:
        """The next step's first reads start (the held ones that arrived count as read)."""
        held = tuple(i for i in sorted(self._hold) if self.homes[i].ready(i))
        self._hold = frozenset()
        self.coordinator.read_ahead_of_next_step(held)
        for m in self._managers.values():
            m.store.warn_if_deleted()

    def optimizer_steps(self) -> dict[str, float]:
        """The optimizer's step counter of each parameter's sub-group, by parameter name."""
        steps = self.optimizer.steps
        return {s.name: float(steps[s.group]) for g in self.groups for s in g.slices}

    def load_optimizer_steps(self, saved: dict[str, float], where: str) -> None:
        for g in self.groups:
            values = {saved[s.name] for s in g.slices}
            if len(values) != 1:
                raise CheckpointError(where, f"sub-group {g.index}'s parameters were saved at different optimizer "
                                      f"steps {sorted(values)}", "load with the sub_group_size the run was saved with")
            self.optimizer.steps[g.index].fill_(values.pop())

    # ---- health and the end ----------------------------------------------------------
    def fail(self, err: BaseException) -> None:
        for m in self._managers.values():
            m.fail(err)

    def check_usable(self) -> None:
        """A UsageError when the model's Parameter objects changed since the run was built; the managers'
        latched failures."""
        for m in self._managers.values():
            m.check_healthy()
        check_placeholders(self)
        check_frozen(self.names, self.params, self.frozen)
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

    def close(self) -> None:
        """Removes the hooks and this run's swap files."""
        self.coordinator.remove()
        self.external.remove()
        with contextlib.suppress(InfinityError):  # a latched failure: the managers' close waits for the rest
            self.optimizer.settle()
        for m in self._managers.values():
            m.close()
        self._managers.clear()

    def io_stats(self) -> IoStats:
        """Bytes and requests the engine's async-IO handles have moved since initialize (all NVMe paths)."""
        stats = [m.handle.stats for m in self._managers.values()]
        return IoStats(*(sum(getattr(s, f.name) for s in stats) for f in dataclasses.fields(IoStats)))

    def memory_report(self) -> MemoryReport:
        reports = [m.ledger.report() for m in self._managers.values()]
        pools = sum(p.buffer_count * p.buffer_bytes for p in self.pools())
        fields = [sum(getattr(r, f) for r in reports) for f in
                  ("compute_bytes", "host_bytes", "nvme_bytes", "peak_compute_bytes", "peak_host_bytes",
                   "peak_nvme_bytes")]
        return MemoryReport(*fields, host_pool_bytes=pools)

    def _holdable(self) -> int:
        """How many parameters' new values the optimizer step may hold in staging buffers for the next
        step's first modules (AfterWrite.HOLD).  [Note: half the pool]  The step's other parameter writes
        are staged through the same pool: holding more buffers leaves them fewer to keep in flight."""
        if self.world > 1:
            return 0  # which held values count as arrived depends on write timing: ranks could differ (gather.py)
        return self._param_pool.buffer_count // 2 if self._param_pool is not None else 0

    def _lend_staging_buffers(self) -> None:
        """On a CPU compute tier, a parameter's staging buffer is its compute copy while it is gathered,
        keeping as many buffers for reads as one module gathers (infinity/memory/compute_tier.py)."""
        if self._param_pool is not None:
            self._manager(str(self.settings.param_nvme_path), PARAM_PATH).lend_to_compute(
                self._param_pool, self.coordinator.largest_gather())

    def _flush_params(self, keys: set[str] | None) -> None:
        """Completes parameter writes (of keys, or all) in every manager: the parameters' swap files may
        be under another nvme_path than the optimizer's."""
        for m in self._managers.values():
            m.flush(keys)

    def _manager(self, path: str, key: str) -> MemoryManager:
        """The memory manager of path; key (the config key that named path) is what its errors name."""
        if path not in self._managers:
            self._managers[path] = open_manager(self.settings, path, self.device, key)
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
            return self.read_values(i, home.inner if isinstance(home, ShardedHome) else home)
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

    def fetch_and_release(self, i: int) -> None:
        """Fetches and releases parameter i, keeping nothing: a rank's part in another rank's read_values of
        it (with several ranks each fetch is an all-gather that every rank enters, in the same order)."""
        self.homes[i].fetch(i)
        self.homes[i].release(i)

    def read_values(self, i: int, home: ParamHome | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
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
        if not self.groups:  # nothing trained: no states anywhere, no optimizer swap files
            return HostOptimizer((), self.setup.rule, self.param_groups)
        if s.optimizer_tier is not Tier.NVME:
            return HostOptimizer(self.groups, self.setup.rule, self.param_groups)
        self._optimizer_pool = optimizer_pool(s, self.groups, self._pin())
        return NvmeOptimizer(self._manager(str(s.optimizer_nvme_path), OPTIMIZER_PATH), self.groups,
                             self._optimizer_pool, self.setup.rule, self.param_groups, s.pipeline)

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
            manager = self._manager(str(s.param_nvme_path), PARAM_PATH)
            home = self._nvme_home = NvmeHome(manager, self._param_pool, {i: self.names[i] for i in offloaded},
                                              shapes, dtype, adopted=self._adopted, max_in_cpu=s.param_max_in_cpu,
                                              masters=self._master_ranges(manager, offloaded, shapes))
        if offloaded and sharded:
            home = ShardedHome(home, {i: self.shards[i] for i in offloaded}, self.ranks, dtype, self.device)
        for i in offloaded:
            homes[i] = home
        return homes, offloaded

    def _master_ranges(self, manager: MemoryManager, offloaded: set[int],
                       shapes: dict[int, torch.Size]) -> dict[int, tuple[str, int]]:
        """Where each offloaded parameter's master weights lie, when they are in the parameters' own memory
        manager: an fp32 partition is then that range ([Note: a partition inside another] in memory/views.py),
        a half-precision one follows it ([Note: a follower] there).  Empty with the optimizer elsewhere."""
        opt = self.optimizer
        if not isinstance(opt, NvmeOptimizer) or opt.manager is not manager:
            return {}
        return {i: opt.master_range(self._slice[i]) for i in sorted(offloaded)
                if i in self._slice and self._slice[i].numel == shapes[i].numel()}

    def _place_params(self) -> None:
        dtype = dtype_of(self.settings.precision)
        shared = self._nvme_home.shared if self._nvme_home is not None else set()
        for i, p in enumerate(self.params):
            if i in self._adopted:
                continue
            if i in shared:  # set_master wrote its values: they are its partition's
                p.data = torch.empty(0, dtype=dtype, device=self.device)
                continue
            if i in self.offloaded:
                self.homes[i].put(i, p.detach())  # type: ignore[attr-defined]
                p.data = torch.empty(0, dtype=dtype, device=self.device)
            elif p.dtype != dtype:
                p.data = p.data.to(dtype)

    def _pin(self) -> PinPolicy:
        return PinPolicy.AUTO if self.settings.pin_memory else PinPolicy.PAGEABLE

    def pools(self) -> list[BufferPool]:
        return [p for p in (self._param_pool, self._optimizer_pool) if p is not None]


def _shape_of(p: nn.Parameter) -> torch.Size:
    """The parameter's shape, or for one built under zero.Init (its storage emptied), the shape it had."""
    record = placed(p)
    return record.shape if record is not None else p.shape

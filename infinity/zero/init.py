"""`infinity.zero.Init`: build a model with its parameters sent to NVMe one module at a time.

    with infinity.zero.Init(config="nvme-local"):
        model = MyModel()          # never whole in host memory
    engine, *_ = infinity.initialize(model=model, config="nvme-local")

[Note: when a parameter leaves]  Inside the context every nn.Module subclass's __init__ is wrapped.
When a module's constructor returns, the parameters of its *children* are written to swap files and
their storage freed; the module's own parameters follow when its parent's constructor returns (or
at once, for the outermost module).  The delay of one level is what keeps the initial values equal
to a plain build: constructors commonly re-initialise a child's weight right after making it
(`self.head = nn.Linear(...); nn.init.normal_(self.head.weight)`), and that must happen before the
values leave.  Construction itself is untouched (same device, same random draws in the same order),
so the values written are bit for bit those of a build without the context.  Peak host memory is one
module with its direct children, not the model.  Parameters of at most stage3_param_persistence_threshold
elements are not written: they stay as built, and the engine keeps them on the compute tier.

[Note: initialisation after a parameter left]  Code that touches a parameter after it left, still inside
the context (Transformers' post_init, which initialises every module's weights after the constructors; or
`model.apply(init_fn)` before the context closes), finds its values: every torch function called inside
the context that is given such a parameter (as `init.normal_(w)`, `w.data`, `w.shape` are) first reads it
back whole (zero_init_access.py).  It stays open (whole) until the next torch function that touches another
parameter, a module's constructor returning, or the context's end; then it is written back and emptied.
One that some other tensor still views (`d = w.data; d.normal_()`) stays open until that view is gone, so
no write is lost.  The random draws are the plain build's, in the same order: the values are bit for bit
the plain build's, and host memory holds the parameters one torch function touches (plus those still
viewed), not the model.  A parameter is written a second time if touched after it left.  After the
context, a changed placeholder is an error for the engine to catch (GatheredParameters changes it).

[Note: several ranks]  Under torchrun (WORLD_SIZE above 1) Init starts the process group
(init_distributed) and each rank writes only its piece of each parameter (zero/shard.py), into its own
rank folder, as the engine's sharded homes then read it.  Before a parameter leaves, rank 0's values
are broadcast, as DeepSpeed's zero.Init does: ranks that seeded differently still train one model.  The
broadcast is a collective, so every rank must build the same modules in the same order.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from infinity.config import Config
from infinity.config.config import ConfigSource
from infinity.errors import InfinityError, UsageError
from infinity.io.align import round_up
from infinity.memory.manager import MemoryManager
from infinity.memory.nvme_store import ALIGNMENT
from infinity.memory.pool import BufferPool
from infinity.memory.writes import Staging
from infinity.swap.params import Tier
from infinity.zero.from_config import settings_from_config
from infinity.zero.placement import open_manager
from infinity.zero.ranks import Ranks, init_distributed
from infinity.zero.settings import EngineSettings, dtype_of
from infinity.zero.gather import piece_of
from infinity.zero.zero_init_access import OpenOnUse
from infinity.shard import shard_of

log = logging.getLogger("infinity.zero")

ATTR = "_infinity_placed"
WRITE_BUFFERS = 4  # [Note: writes left in flight]


@dataclass(frozen=True)
class Placed:
    """Where zero.Init put a parameter: a partition of run's memory manager, and the shape it had."""

    run: "InitRun"
    key: str
    shape: torch.Size


def placed(p: torch.Tensor) -> Placed | None:
    return getattr(p, ATTR, None)


class InitRun:
    """The swap store the parameters were written to; the engine takes it over at initialize."""

    def __init__(self, settings: EngineSettings, ranks: Ranks = Ranks()):
        self.settings, self.ranks = settings, ranks
        self.dtype = dtype_of(settings.precision)
        self.manager: MemoryManager | None = open_manager(settings, str(settings.param_nvme_path),
                                                          torch.device("cpu"))
        self._reads: BufferPool | None = None  # whole partitions read back (read_whole), then the engine's pools
        self._writes: BufferPool | None = None  # [Note: writes left in flight]
        self.count = 0

    def place(self, p: nn.Parameter) -> None:
        if placed(p) is not None or self.manager is None:
            return
        if p.numel() <= self.settings.persistence_threshold:
            return  # stays resident (stage3_param_persistence_threshold): the engine keeps it on the compute tier
        key = f"param/init-{self.count}"
        self.count += 1
        values = p.detach().to(self.dtype).reshape(-1)
        if self.ranks.several:  # [Note: several ranks]
            values = values.contiguous()
            self.ranks.broadcast(values, f"zero.Init's parameter {key!r} of shape {tuple(p.shape)}")
            values = piece_of(values, shard_of(key, p.shape, self.ranks.world, self.ranks.rank))
        self.manager.add(key, values.numel(), self.dtype, region="param", pool=self._reads_for(values))
        self._write(key, values)
        setattr(p, ATTR, Placed(self, key, p.shape))
        p.data = torch.empty(0, dtype=self.dtype, device=p.device)

    def owns(self, p: torch.Tensor) -> bool:
        """Whether p is a parameter this run placed (and emptied)."""
        record = placed(p)
        return record is not None and record.run is self and p.data.numel() == 0

    def read_whole(self, p: torch.Tensor) -> torch.Tensor:
        """Placed parameter p's whole values, read back from its partition (with several ranks every rank's
        piece all-gathered: a collective, every rank reads the same parameters in the same order)."""
        record = _placed_here(self, p)
        manager = self._manager()
        manager.flush()  # [Note: writes left in flight]
        piece = manager.fetch(record.key).wait().reshape(-1).clone()
        manager.release(record.key)
        if self.ranks.several:
            shard = shard_of(record.key, record.shape, self.ranks.world, self.ranks.rank)
            whole = piece.new_empty(shard.length * self.ranks.world)
            self.ranks.all_gather_start(whole, piece[:shard.length].contiguous(),
                                        f"zero.Init's parameter {record.key!r}").wait()
            piece = whole
        return piece[: record.shape.numel()].view(record.shape)

    def rewrite(self, p: torch.Tensor, values: torch.Tensor, source: int = 0) -> None:
        """Writes values as placed parameter p's (rank source's values, with several ranks); a new shape
        gets a new partition (the old extent stays unused)."""
        record = _placed_here(self, p)
        manager = self._manager()
        manager.flush()  # [Note: writes left in flight]: the old values' writes complete before new ones start
        values = values.detach().to(self.dtype).contiguous()
        if self.ranks.several:
            self.ranks.broadcast(values, f"zero.Init's parameter {record.key!r}", source)
        flat = values.reshape(-1)
        key = record.key
        if values.shape != record.shape:
            key = f"param/init-{self.count}"
            self.count += 1
        if self.ranks.several:
            flat = piece_of(flat, shard_of(key, values.shape, self.ranks.world, self.ranks.rank))
        if key != record.key:
            manager.add(key, flat.numel(), self.dtype, region="param", pool=self._reads_for(flat))
        self._write(key, flat)
        setattr(p, ATTR, Placed(self, key, values.shape))

    def _manager(self) -> MemoryManager:
        if self.manager is None:
            raise UsageError("these parameters were built under a zero.Init whose swap files were already taken "
                             "by an engine: read or change them through infinity.zero.GatheredParameters")
        return self.manager

    def settle(self) -> None:
        """Completes the writes left in flight ([Note: writes left in flight]); a failed one raises here."""
        if self.manager is not None:
            self.manager.flush()

    def _write(self, key: str, flat: torch.Tensor) -> None:
        """[Note: writes left in flight]  flat, in this run's dtype, into key's partition chunk by chunk
        through the write pool's buffers, each write left in flight (write_part): the caller may reuse flat
        at once, and reading and converting the next parameter overlaps these writes.  A borrow from a
        full pool completes the pool's oldest write first.  On an error, every write in flight is completed
        (its error latched) before the error propagates, so none is left in flight behind it."""
        manager = self._manager()
        pool = self._writes_for(flat.numel() * flat.element_size())
        per_chunk = pool.buffer_bytes // flat.element_size()  # whole blocks: every offset stays aligned
        try:
            for start in range(0, flat.numel(), per_chunk):
                manager.write_part(key, start * flat.element_size(), flat[start:start + per_chunk],
                                   staging=pool, copy=Staging.ALWAYS)
        except BaseException:
            try:
                manager.flush()
            except InfinityError:
                pass  # latched by the manager; the first error propagates
            raise

    def _reads_for(self, values: torch.Tensor) -> BufferPool:
        """One host buffer as large as the largest parameter so far (replaced when a larger one comes), for
        reading a partition back whole; never touched (so never resident) unless one is."""
        nbytes = values.numel() * values.element_size()
        if self._reads is None or self._reads.buffer_bytes < nbytes:
            self._reads = BufferPool("zero.Init reads", 1, round_up(max(nbytes, 1), ALIGNMENT),
                                     "zero_optimization.offload_param.buffer_size")
        return self._reads

    def _writes_for(self, nbytes: int) -> BufferPool:
        """WRITE_BUFFERS buffers that together hold the largest parameter so far; a larger one replaces
        them, after the writes from the old ones complete (so the two sets are never resident together)."""
        chunk = round_up(-(-max(nbytes, 1) // WRITE_BUFFERS), ALIGNMENT)
        if self._writes is None or self._writes.buffer_bytes < chunk:
            self._manager().flush()
            self._writes = BufferPool("zero.Init writes", WRITE_BUFFERS, chunk,
                                      "zero_optimization.offload_param.buffer_size")
        return self._writes

    def take(self, settings: EngineSettings) -> MemoryManager:
        """Hands the manager to the engine, once; its settings must name the same place and dtype."""
        if self.manager is None:
            raise UsageError("these parameters were built under a zero.Init whose swap files were already taken "
                             "by another engine or closed; build the model again under a new zero.Init")
        mine, theirs = self.settings, settings
        if (theirs.param_tier, str(theirs.param_nvme_path), theirs.precision) != \
                (mine.param_tier, str(mine.param_nvme_path), mine.precision):
            raise UsageError(f"the model was built under zero.Init with offload_param nvme at "
                             f"{mine.param_nvme_path!r} in {mine.precision.value}, but initialize was given "
                             f"{theirs.param_tier.value} at {theirs.param_nvme_path!r} in {theirs.precision.value}; "
                             f"pass the same config to both")
        self.settle()  # the engine takes over a store at rest
        manager, self.manager, self._reads, self._writes = self.manager, None, None, None
        return manager

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()  # completes the writes in flight first
            self.manager = None


class Init:
    """Context manager; see the module docstring.  With a config whose offload_param is not nvme it
    changes nothing (the model is built as usual and placed by initialize)."""

    def __init__(self, config: ConfigSource | Config | None = None, *, enabled: bool = True,
                 config_dict_or_path: ConfigSource | None = None, remote_device: str | None = None,
                 pin_memory: bool = False, **deepspeed_keywords: Any):
        """DeepSpeed's keywords are accepted: remote_device and pin_memory (where the parameters go and
        whether host buffers are pinned follow the config's offload_param; a remote_device that differs is
        warned about), module, data_parallel_group, mem_efficient_linear, dtype, mpu and the rest (no effect
        here: the model is placed by initialize, its dtype is the config's precision)."""
        source = config if config is not None else config_dict_or_path
        if source is None and enabled:
            raise UsageError("zero.Init needs config= (a path, JSON string, dict or infinity.Config)")
        self.enabled = enabled
        self.settings = None
        if enabled:
            cfg = source if isinstance(source, Config) else Config.load(source)  # type: ignore[arg-type]
            self.settings = settings_from_config(cfg)
            _check_remote_device(remote_device, cfg)
        if deepspeed_keywords:
            log.info("zero.Init: DeepSpeed keywords with no effect here: %s", sorted(deepspeed_keywords))
        self.run: InitRun | None = None
        self._stack: list[nn.Module] = []
        self._wrapped: list[tuple[type, Callable[..., None]]] = []
        self._subclass_hook: Any = None
        self._opened: OpenOnUse | None = None
        self.reopened_peak_bytes = 0  # the most bytes of parameters read back at once after they left

    def __enter__(self) -> "Init":
        if not self.enabled or self.settings is None or self.settings.param_tier is not Tier.NVME:
            if self.enabled:
                log.info("zero.Init: offload_param is not nvme, the model is built as usual")
            return self
        ranks = init_distributed()  # under torchrun: starts the process group, as initialize would
        self.settings = dataclasses.replace(self.settings, rank=ranks.rank)  # this rank's own swap folder
        self.run = InitRun(self.settings, ranks)
        for cls in _module_classes():
            self._wrap(cls)
        self._subclass_hook = nn.Module.__dict__.get("__init_subclass__")
        nn.Module.__init_subclass__ = classmethod(lambda cls, **kw: self._wrap(cls))  # type: ignore[assignment]
        self._opened = OpenOnUse(self.run)  # [Note: initialisation after a parameter left]
        self._opened.__enter__()
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if self.run is None:
            return
        if self._opened is not None:
            opened, self._opened = self._opened, None
            opened.__exit__(kind, *exc)
            if kind is None:
                opened.close()
            self.reopened_peak_bytes = opened.peak_bytes
        for cls, original in reversed(self._wrapped):
            cls.__init__ = original  # type: ignore[misc]
        self._wrapped.clear()
        if self._subclass_hook is None:
            del nn.Module.__init_subclass__
        else:
            nn.Module.__init_subclass__ = self._subclass_hook  # type: ignore[assignment]
        if kind is not None or self.run.count == 0:
            # the build failed, or every parameter stayed resident: the swap files go, and initialize
            # opens its own store in the same per-run folder
            self.run.close()
        else:
            try:
                self.run.settle()  # the model leaves the context with its writes completed
            except BaseException:
                self.run.close()  # a failed write: the swap files go, as for a failed build
                raise

    # ---- wrapping constructors ----------------------------------------------------
    def _wrap(self, cls: type) -> None:
        original = cls.__dict__.get("__init__")
        if original is None or getattr(original, "_infinity_wrapped", False):
            return

        @functools.wraps(original)
        def init(module: nn.Module, *args: Any, **kwargs: Any) -> None:
            outermost_call = not self._stack or self._stack[-1] is not module
            if outermost_call:
                self._stack.append(module)
            try:
                original(module, *args, **kwargs)
            finally:
                if outermost_call:
                    self._stack.pop()
            if outermost_call:
                self._built(module)

        init._infinity_wrapped = True  # type: ignore[attr-defined]
        try:
            cls.__init__ = init  # type: ignore[misc]
        except (TypeError, AttributeError):  # a class that forbids it (an extension type): built as usual
            return
        self._wrapped.append((cls, original))

    def _built(self, module: nn.Module) -> None:
        run = self.run
        if run is None:
            return
        if self._opened is not None:
            self._opened.flush()
        finished = [module] if not self._stack else list(module.children())
        for m in finished:
            for p in m.parameters():
                run.place(p)


def _placed_here(run: InitRun, p: torch.Tensor) -> Placed:
    record = placed(p)
    if record is None or record.run is not run:
        raise UsageError("this parameter was not placed by this zero.Init")
    return record


def _module_classes() -> list[type]:
    seen: list[type] = []
    stack = [nn.Module]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(c for c in cls.__subclasses__() if c not in seen)
    return seen


def _check_remote_device(remote_device: str | None, config: Config) -> None:
    """DeepSpeed places parameters on remote_device during Init; infinity on offload_param.device, always."""
    device = config.zero_optimization.offload_param.device.value
    if remote_device is not None and str(remote_device).lower() != device:
        log.warning("zero.Init(remote_device=%r): parameters go where zero_optimization.offload_param.device says "
                    "(%s); set it to %r in the config to place them there", remote_device, device, remote_device)

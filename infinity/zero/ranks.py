"""The data-parallel ranks: torch.distributed set-up, and the collectives ZeRO-3 needs, each failing
with a RankFailed that names the operation, the parameter and the rank instead of hanging or raising
from deep inside torch.

Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); initialize
calls init_distributed, which starts the default process group when WORLD_SIZE is above 1: gloo on
CPU, NCCL when the model is on CUDA.  A script may call init_distributed itself first, to choose the
backend or the timeout after which a collective waiting on a dead rank gives up.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from infinity.errors import RankFailed, UsageError

log = logging.getLogger("infinity.zero")

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)  # torch's own default for gloo and NCCL
# torch 2.13 renamed these two (the old names warn); older torch has only the old ones
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Ranks:
    """This process's place in the data-parallel world (world 1: one process, no collectives)."""

    world: int = 1
    rank: int = 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def all_gather_start(self, out: torch.Tensor, piece: torch.Tensor, what: str) -> "Pending":
        """Starts out (world × piece elements) = every rank's piece, in rank order; it runs in the process
        group's own thread until Pending.wait()."""
        work = self._run("all-gather", what, _ALL_GATHER, out, piece, async_op=True)
        return Pending(work, self, "all-gather", what)

    def reduce_scatter_mean(self, out: torch.Tensor, whole: torch.Tensor, what: str) -> None:
        """out = this rank's piece of the mean over ranks of whole (world × out elements)."""
        self._run("reduce-scatter", what, _REDUCE_SCATTER, out, whole)
        out.div_(self.world)

    def all_reduce_mean(self, t: torch.Tensor, what: str) -> None:
        self._run("all-reduce", what, dist.all_reduce, t)
        t.div_(self.world)

    def all_reduce_sum(self, t: torch.Tensor, what: str) -> None:
        self._run("all-reduce", what, dist.all_reduce, t)

    def broadcast(self, t: torch.Tensor, what: str, source: int = 0) -> None:
        """t = rank source's t, on every rank (a host tensor goes through the current CUDA device on NCCL,
        which moves only CUDA tensors)."""
        device = _collective_device()
        if t.device.type == "cpu" and device.type == "cuda":
            on_device = t.to(device)
            self._run("broadcast", what, dist.broadcast, on_device, source)
            t.copy_(on_device)
            return
        self._run("broadcast", what, dist.broadcast, t, source)

    def low_high(self, value: int, what: str) -> tuple[int, int]:
        """(the smallest, the largest) of every rank's value, in one all-reduce of (value, -value) with MIN;
        one process: (value, value).  Values fit in 62 bits."""
        if not self.several:
            return value, value
        both = torch.tensor([value, -value], dtype=torch.int64, device=_collective_device())
        self._run("all-reduce", what, dist.all_reduce, both, op=dist.ReduceOp.MIN)
        return int(both[0]), -int(both[1])

    def barrier(self, what: str) -> None:
        if self.several:
            self._run("barrier", what, dist.barrier)

    def tell_failure(self, err: BaseException) -> None:
        """Leaves this rank's error where the other ranks look when their collective fails (see the note
        on failures below): they then name this rank and its error instead of "another rank died"."""
        store = _store() if self.several else None
        if store is None or isinstance(err, RankFailed):
            return
        text = " ".join(str(err).split())  # one line (a ConfigError lists its problems on lines of their own)
        try:
            store.set(f"{FAILURE_KEY}{self.rank}", f"{type(err).__name__}: {text}"[:2000])
        except (RuntimeError, dist.DistError, ValueError):
            log.debug("rank %d could not leave its failure in the process group's store", self.rank)

    def failures(self) -> str:
        """What the other ranks left with tell_failure: "rank 1 of 2 failed first: AioError: ..." (or "")."""
        store = _store() if self.several else None
        found = []
        for r in range(self.world) if store is not None else ():
            key = f"{FAILURE_KEY}{r}"
            try:
                if r != self.rank and store.check([key]):
                    found.append(f"rank {r} of {self.world} failed first: {store.get(key).decode(errors='replace')}")
            except (RuntimeError, dist.DistError, ValueError):
                break  # the store went with the rank that served it
        return "; ".join(found)

    def _run(self, name: str, what: str, collective: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return collective(*args, **kwargs)
        except (RuntimeError, dist.DistError) as err:  # DistBackendError, gloo's closed connections, timeouts
            raise RankFailed(name, what, self.rank, self.world, err, self.failures()) from err


@dataclass
class Pending:
    """A collective in flight; wait() completes it (a failure raises RankFailed, as a blocking one would)."""

    work: Any
    ranks: Ranks
    op: str
    what: str

    def done(self) -> bool:
        return bool(self.work.is_completed())

    def wait(self) -> None:
        self.ranks._run(self.op, self.what, self.work.wait)


FAILURE_KEY = "infinity/failed/rank"  # + the rank: its first error, for the others (tell_failure)


def _store() -> Any:
    """The default process group's key-value store, or None.

    [Note: failures through the store]  A rank whose run fails (a full drive, a missing nvme_path) leaves
    its error in the store every rank already shares, then exits; the other ranks, whose next collective
    then fails (at once when its connections close, else after the process group's timeout), read it there
    and name that rank and its error.  torch offers the default store only through a private function
    (`distributed_c10d._get_default_store`, stable since torch 1.x); it is looked up, not imported, so a
    torch without it just gives the older message.  Under torchrun the store is the agent's and outlives
    every rank; with a store served by rank 0 (env:// without torchrun), rank 0's own failure cannot be read
    once it has exited."""
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    if get is None or not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return get()
    except (RuntimeError, ValueError):
        return None


def _collective_device() -> torch.device:
    """Where a collective's tensors must be: NCCL moves only CUDA tensors, gloo host ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def current() -> Ranks:
    """The ranks of the default process group, or one process when none is started."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_world_size(), dist.get_rank())
    return Ranks()


def init_distributed(dist_backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT,
                     device: torch.device | None = None) -> Ranks:
    """Starts the default process group from torchrun's environment when WORLD_SIZE > 1 (DeepSpeed's
    deepspeed.init_distributed).  Does nothing when one is started already or for one process."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return current()
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise UsageError(f"WORLD_SIZE is {world} but ${name} is not set: launch with torchrun "
                             f"(torchrun --nproc_per_node {world} script.py) or infinity-train --nproc {world}")
    cuda = device is not None and device.type == "cuda" or (device is None and torch.cuda.is_available())
    backend = dist_backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    dist.init_process_group(backend=backend, timeout=timeout)
    ranks = current()
    log.info("rank %d of %d: process group started (%s, timeout %s)", ranks.rank, ranks.world, backend, timeout)
    return ranks


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise UsageError(f"${name} is {raw!r}, not a whole number (torchrun sets it)") from None

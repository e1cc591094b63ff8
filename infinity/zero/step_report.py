"""The per-step breakdown: where a step's time went, what it moved, and how well prefetch did.

`engine.step_report()` returns the last optimizer step's StepReport.  The StepClock collects it while
the step runs: the coordinator adds read waits and prefetch outcomes, the engine adds write waits and
the optimizer's figures.  other_s is a remainder, not a measurement: what is left of the step once every
wait and the optimizer are taken out (compute, hooks, Python: the time not spent waiting on infinity).
"""
from __future__ import annotations

import dataclasses

import enum
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

log = logging.getLogger("infinity.zero")


class Wait(enum.Enum):
    READ = "read"  # a module waited for its parameters
    WRITE = "write"  # backward waited for gradient writes (a full staging pool, a flush)
    OPTIMIZER_IO = "optimizer_io"  # the optimizer waited for its sub-groups' reads or writes


class Outcome(enum.Enum):
    """How a partition that a module needed had been fetched."""

    HIT = "hit"  # resident, or its read had finished, when the module came
    LATE = "late"  # its read was in flight: the module waited for the rest
    MISS = "miss"  # nobody had asked for it: fetched on demand


def per_param(nbytes: int, params: int) -> float:
    """Bytes per parameter (0.0 with no parameters)."""
    return nbytes / params if params else 0.0


class PerParamBytes:
    """NVMe bytes per parameter, for a record with bytes_read, bytes_written and params (the parameters this
    rank trains: its share of each, all of a replicated one): the step report's and infinity-train's."""

    bytes_read: int
    bytes_written: int
    params: int

    @property
    def bytes_read_per_param(self) -> float:
        """NVMe bytes read per parameter of this rank's share (bytes_read / params; 0.0 with none)."""
        return per_param(self.bytes_read, self.params)

    @property
    def bytes_written_per_param(self) -> float:
        """NVMe bytes written per parameter of this rank's share (bytes_written / params)."""
        return per_param(self.bytes_written, self.params)


@dataclass(frozen=True)
class PrefetchCounts:
    """Uses of offloaded parameters by how they had been fetched: the outcomes of infinity_prefetch_total
    (hit: resident or its read done; late: its read still in flight; miss: fetched on demand).  One step's
    (StepReport.prefetch) or a run's, summed (infinity/train.py)."""

    hits: int
    late: int
    misses: int

    @property
    def uses(self) -> int:
        return self.hits + self.late + self.misses

    @property
    def hit_ratio(self) -> float:
        """Hits / uses; 1.0 with no uses.  Late uses are not hits: late_ratio counts them (as
        infinity_prefetch_total's labels do)."""
        return self.hits / self.uses if self.uses else 1.0

    @property
    def late_ratio(self) -> float:
        """Late / uses: read ahead, but still in flight when the module came; 0.0 with no uses."""
        return self.late / self.uses if self.uses else 0.0

    @property
    def miss_ratio(self) -> float:
        """Misses / uses: nobody read them ahead; 0.0 with no uses."""
        return self.misses / self.uses if self.uses else 0.0

    def shares(self) -> str:
        """"hit 87.0% / late 13.0% / miss 0.0% of 36 uses" (or "no offloaded uses")."""
        if not self.uses:
            return "no offloaded uses"
        return (f"hit {100 * self.hits / self.uses:.1f}% / late {100 * self.late / self.uses:.1f}% / "
                f"miss {100 * self.misses / self.uses:.1f}% of {self.uses} uses")


@dataclass(frozen=True)
class StepReport(PerParamBytes):
    step: int
    step_s: float
    other_s: float  # step_s less the waits and optimizer_s (was compute_s)
    read_wait_s: float
    write_wait_s: float
    optimizer_s: float
    optimizer_io_wait_s: float
    bytes_read: int
    bytes_written: int
    prefetch_hits: int
    prefetch_late: int
    prefetch_misses: int
    peak_live_elements: int
    trace_invalidations: int
    gathered_ahead: int = 0  # all-gathers of the next module's parameters started ahead of their use (ranks > 1)
    rank: int = 0  # the data-parallel rank whose step this is (each rank reports its own bytes and waits)
    loss: float = 0.0  # mean of the step's micro-batch losses on this rank
    grad_norm: float = 0.0  # the gradient's global 2-norm (unscaled), before clipping
    nonfinite: tuple[str, ...] = ()  # which of "loss", "grad_norm" were NaN or infinite (zero/nonfinite.py)
    params: int = 0  # parameters this rank trains: its share of each (all of a replicated one), padding left out

    @property
    def stall_s(self) -> float:
        """Seconds the step waited on I/O (reads, writes, the optimizer's I/O)."""
        return self.read_wait_s + self.write_wait_s + self.optimizer_io_wait_s

    @property
    def stall_ratio(self) -> float:
        return self.stall_s / self.step_s if self.step_s > 0 else 0.0

    @property
    def prefetch(self) -> PrefetchCounts:
        return PrefetchCounts(self.prefetch_hits, self.prefetch_late, self.prefetch_misses)

    @property
    def prefetch_uses(self) -> int:
        return self.prefetch.uses

    @property
    def hit_ratio(self) -> float:
        return self.prefetch.hit_ratio

    @property
    def late_ratio(self) -> float:
        return self.prefetch.late_ratio

    @property
    def miss_ratio(self) -> float:
        return self.prefetch.miss_ratio

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stall_s": self.stall_s, "stall_ratio": self.stall_ratio,
                "hit_ratio": self.hit_ratio, "late_ratio": self.late_ratio, "miss_ratio": self.miss_ratio,
                "bytes_read_per_param": self.bytes_read_per_param,
                "bytes_written_per_param": self.bytes_written_per_param}

    def line(self) -> str:
        who = f"rank {self.rank} " if self.rank else ""
        return (f"{who}step {self.step}: {self.step_s:.3f} s = compute {self.other_s:.3f} + read wait "
                f"{self.read_wait_s:.3f} + write wait {self.write_wait_s:.3f} + optimizer {self.optimizer_s:.3f} "
                f"(of which I/O wait {self.optimizer_io_wait_s:.3f}); stall {100 * self.stall_ratio:.1f}%; "
                f"read {self.bytes_read / 1e9:.3f} GB, written {self.bytes_written / 1e9:.3f} GB ("
                f"{self.bytes_read_per_param:.1f} / {self.bytes_written_per_param:.1f} B per parameter); prefetch "
                f"{self.prefetch_hits} hit / {self.prefetch_late} late / {self.prefetch_misses} miss; peak live "
                f"{self.peak_live_elements} elements" + (f"; NON-FINITE {', '.join(self.nonfinite)}" if self.nonfinite
                                                         else ""))


class StepClock:
    """One step's figures, filled in as it runs (a step: every micro-batch of one accumulation window)."""

    def __init__(self) -> None:
        self.live = 0  # carried across steps: it is what is resident, not a per-step sum
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.waits = {w: 0.0 for w in Wait}
        self.outcomes = {o: 0 for o in Outcome}
        self.gathered_ahead = 0
        self.optimizer_s = 0.0
        self.peak_live = self.live
        self.values: dict[str, Any] = {}  # loss, grad_norm and nonfinite, once judged (zero/nonfinite.py)

    def add_wait(self, kind: Wait, seconds: float) -> None:
        self.waits[kind] += seconds

    @contextmanager
    def waiting(self, kind: Wait) -> Iterator[None]:
        """Counts the time inside the block as a wait of this kind."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add_wait(kind, time.perf_counter() - started)

    def count(self, outcome: Outcome, n: int = 1) -> None:
        self.outcomes[outcome] += n

    def gather_started_ahead(self) -> None:
        """One all-gather began ahead of its parameter's use ([Note: gathering ahead] in coordinator.py)."""
        self.gathered_ahead += 1

    def live_changed(self, delta: int) -> None:
        """Elements of offloaded parameters resident on the compute tier went up or down by delta."""
        self.live += delta
        self.peak_live = max(self.peak_live, self.live)

    def report(self, step: int, bytes_read: int, bytes_written: int, invalidations: int) -> StepReport:
        step_s = time.perf_counter() - self.start
        # The optimizer's I/O waits are part of optimizer_s; compute is what remains of the step.
        busy = self.waits[Wait.READ] + self.waits[Wait.WRITE] + self.optimizer_s
        return StepReport(step=step, step_s=step_s, other_s=max(step_s - busy, 0.0),
                          read_wait_s=self.waits[Wait.READ], write_wait_s=self.waits[Wait.WRITE],
                          optimizer_s=self.optimizer_s, optimizer_io_wait_s=self.waits[Wait.OPTIMIZER_IO],
                          bytes_read=bytes_read, bytes_written=bytes_written,
                          prefetch_hits=self.outcomes[Outcome.HIT], prefetch_late=self.outcomes[Outcome.LATE],
                          prefetch_misses=self.outcomes[Outcome.MISS], peak_live_elements=self.peak_live,
                          trace_invalidations=invalidations, gathered_ahead=self.gathered_ahead, **self.values)


class StepReporter:
    """Turns the clock into one StepReport per optimizer step, and logs every `every` steps."""

    def __init__(self, every: int, rank: int = 0, params: int = 0):
        self.clock = StepClock()
        self.rank, self.params = rank, params  # params: what StepReport.params counts
        self.every = max(every, 1)
        self.last: StepReport | None = None
        self._at_start = (0, 0, 0)

    def start(self, bytes_read: int, bytes_written: int, invalidations: int = 0) -> None:
        """The running counters as the next step begins (what came before is not the step's)."""
        self._at_start = (bytes_read, bytes_written, invalidations)
        self.clock.reset()

    def finish(self, step: int, bytes_read: int, bytes_written: int, invalidations: int) -> StepReport:
        """The step's report from the running counters (bytes moved, trace invalidations) as it ends."""
        read0, written0, invalid0 = self._at_start
        report = dataclasses.replace(self.clock.report(step, bytes_read - read0, bytes_written - written0,
                                                       invalidations - invalid0), rank=self.rank,
                                     params=self.params)
        self.last = report
        if step % self.every == 0:
            log.info("%s", report.line())
        self.start(bytes_read, bytes_written, invalidations)
        return report

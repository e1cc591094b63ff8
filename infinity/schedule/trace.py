"""The order in which modules, and so partitions, are used in a step; and a cursor that follows it.

[Note: divergence]  A later step may not follow the recorded order (data-dependent control flow, a
module skipped).  The cursor notices at the first use that differs, says so once, and from then on
answers "not on the trace" for the rest of that step, so the coordinator fetches on demand; at the end
of a diverged step the trace is dropped and the next step records a new one.  Nothing fails.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Mapping

log = logging.getLogger("infinity.schedule")


class Phase(enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


@dataclass(frozen=True)
class Use:
    """A module about to run in a phase, and the offloaded partitions it needs."""

    module: int
    phase: Phase
    partitions: tuple[int, ...]


@dataclass(frozen=True)
class Trace:
    uses: tuple[Use, ...]
    sizes: Mapping[int, int]  # partition -> elements

    def elements(self, partitions: tuple[int, ...] | frozenset[int]) -> int:
        return sum(self.sizes[p] for p in partitions)

    def __len__(self) -> int:
        return len(self.uses)


@dataclass
class TraceRecorder:
    """Collects the uses of one step."""

    sizes: dict[int, int] = field(default_factory=dict)
    _uses: list[Use] = field(default_factory=list)

    def record(self, module: int, phase: Phase, partitions: Mapping[int, int]) -> None:
        """partitions: the module's partitions with their element counts."""
        self.sizes.update(partitions)
        self._uses.append(Use(module, phase, tuple(partitions)))

    def finish(self) -> Trace:
        return Trace(tuple(self._uses), dict(self.sizes))


class CursorState(enum.Enum):
    RECORDING = "recording"  # no trace yet: this step records one
    FOLLOWING = "following"  # the step follows the trace so far
    DIVERGED = "diverged"  # the step left the trace: on-demand until it ends


class Cursor:
    """Where the current step is on the trace.  One cursor lives for the whole run."""

    def __init__(self) -> None:
        self.trace: Trace | None = None
        self.position = -1  # index of the use now running
        self.state = CursorState.RECORDING
        self.invalidations = 0
        self._recorder = TraceRecorder()
        self._warned = False

    def observe(self, module: int, phase: Phase, partitions: Mapping[int, int]) -> int | None:
        """A module is about to run; returns its position on the trace, or None when off the trace."""
        if self.state is CursorState.RECORDING:
            self._recorder.record(module, phase, partitions)
            return None
        if self.state is CursorState.DIVERGED or self.trace is None:
            return None
        following = self.position + 1
        uses = self.trace.uses
        if following < len(uses) and (uses[following].module, uses[following].phase) == (module, phase):
            self.position = following
            return following
        self._diverge(module, phase, following)
        return None

    def end_step(self) -> None:
        """The step is over: a recording becomes the trace; a diverged or cut-short step re-records."""
        if self.state is CursorState.RECORDING:
            self.trace, self.state, self.position = self._recorder.finish(), CursorState.FOLLOWING, -1
            return
        complete = self.state is CursorState.FOLLOWING and self.trace is not None \
            and self.position == len(self.trace) - 1
        if not complete:
            if self.state is CursorState.FOLLOWING:
                self._diverge(None, None, self.position + 1)  # the step ended before the trace did
            self.trace, self._recorder, self.state = None, TraceRecorder(), CursorState.RECORDING
        self.position = -1

    def _diverge(self, module: int | None, phase: Phase | None, expected: int) -> None:
        self.state = CursorState.DIVERGED
        self.invalidations += 1
        if not self._warned:
            what = f"module {module} ({phase.value})" if module is not None and phase else "the end of the step"
            log.warning("stage 3: the step left the recorded module order at use %d (%s came instead); fetching on "
                        "demand for the rest of this step and recording the order again (logged once)",
                        expected, what)
            self._warned = True

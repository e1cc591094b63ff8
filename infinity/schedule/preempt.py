"""Which read ahead gives its staging buffer up when a read needs one and none is free: pure functions of
the trace, the position on it and the reads in flight.

[Note: nearer reads first]  Reads started ahead hold staging buffers until their module uses them.  A
partition dropped after its use may be needed again before reads already started for later uses (the
last forward module is the first backward one), and a partition nobody read ahead may be needed now
(a miss).  Either way the read ahead whose next use is farthest gives its buffer up: for a read ahead
only if that use is farther than the wanted partition's, for a miss always (otherwise the miss would
wait for a buffer only the caller's own thread can give back).  Ties go to the higher partition; off
the trace (no trace, or no position) the highest partition goes.
"""
from __future__ import annotations

import math
from typing import Iterable

from infinity.schedule.planner import next_use_distance
from infinity.schedule.trace import Trace


def _farthest(trace: Trace | None, position: int | None, reading: Iterable[int],
              beyond: float = -math.inf) -> int | None:
    """The partition of reading whose next use after position is farthest, if farther than beyond."""
    on_trace = trace is not None and position is not None
    distances = [(next_use_distance(trace, position, j) if on_trace else j, j)  # type: ignore[arg-type]
                 for j in reading]
    farthest = max((d for d in distances if d[0] > beyond), default=None)
    return farthest[1] if farthest is not None else None


def preempt_for_read_ahead(trace: Trace, position: int, wanted: int, reading: Iterable[int]) -> int | None:
    """The read ahead (of reading) to give up so that wanted, used sooner, can be read ahead instead; None
    when every read in flight is used before wanted is."""
    return _farthest(trace, position, reading, beyond=next_use_distance(trace, position, wanted))


def preempt_for_miss(trace: Trace | None, position: int | None, reading: Iterable[int]) -> int | None:
    """The read ahead (of reading, the module's own partitions left out) to give up so that a miss finds a
    buffer; None when nothing is being read ahead."""
    return _farthest(trace, position, reading)

"""What to release after a use, what to evict to make room, and what to fetch ahead: pure functions of
the trace, the position on it, what is held, and the budgets.

"Held" means resident on the compute tier or on its way there (in flight).  Persistent partitions
(stage3_param_persistence_threshold) are never offloaded, so they are in no trace and the planner never
sees them.

[Note: distances]  The reuse distance of a partition after use i is the number of elements the uses
between i and its next use bring in (each use's partitions counted each time), as DeepSpeed measures
stage3_max_reuse_distance.  A partition with no later use in the step has an infinite distance: it is
released, and everything is released by the end of the step.
"""
from __future__ import annotations

import math

from infinity.schedule.budget import Budgets
from infinity.schedule.trace import Trace


def next_use_distance(trace: Trace, position: int, partition: int) -> float:
    """Elements brought in between use `position` and the next use of partition (inf if none)."""
    between = 0
    for use in trace.uses[position + 1:]:
        if partition in use.partitions:
            return between
        between += trace.elements(use.partitions)
    return math.inf


def releases_after(trace: Trace, position: int, resident: frozenset[int], budgets: Budgets) -> tuple[int, ...]:
    """After use `position`: the resident partitions not used again within (strictly less than)
    max_reuse_distance elements; so 0 releases everything, as DeepSpeed's 0 does."""
    return tuple(sorted(p for p in resident
                        if next_use_distance(trace, position, p) >= budgets.max_reuse_distance))


def make_room(trace: Trace, position: int, held: frozenset[int], incoming: int, budgets: Budgets,
              needed: frozenset[int] = frozenset()) -> tuple[int, ...]:
    """Partitions to release, farthest next use first, so that held + incoming fits max_live.

    needed (the current use's partitions) are never chosen.  If even releasing every other partition
    cannot make room, all of them are returned and the caller goes over budget for that one use (the
    engine refuses such configs up front: max_live below the largest module)."""
    live = trace.elements(held)
    if live + incoming <= budgets.max_live_elements:
        return ()
    candidates = sorted(held - needed, key=lambda p: -next_use_distance(trace, position, p))
    chosen = []
    for p in candidates:
        if live + incoming <= budgets.max_live_elements:
            break
        chosen.append(p)
        live -= trace.sizes[p]
    return tuple(chosen)


def fetches_from(trace: Trace, position: int, held: frozenset[int], budgets: Budgets) -> tuple[int, ...]:
    """Partitions of the uses after `position` to start fetching now, in order of use: up to
    prefetch_elements in all, and never past max_live counted with what is held."""
    live = trace.elements(held)
    chosen: list[int] = []
    ahead = 0
    for use in trace.uses[position + 1:]:
        for p in use.partitions:
            if p in held or p in chosen:
                continue
            size = trace.sizes[p]
            if ahead + size > budgets.prefetch_elements or live + size > budgets.max_live_elements:
                return tuple(chosen)
            chosen.append(p)
            ahead += size
            live += size
    return tuple(chosen)


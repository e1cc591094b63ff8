"""Pure scheduling logic for stage 3: the trace of module order, persistence, the prefetch plan and the
choice of a read ahead to give up.

No I/O and no torch here: partitions are integers with element counts, modules are integers.  The
coordinator (infinity/zero) feeds it events and carries out its decisions through the memory manager.
"""
from infinity.schedule.budget import Budgets, persistent_set
from infinity.schedule.planner import fetches_from, make_room, next_use_distance, releases_after
from infinity.schedule.preempt import preempt_for_miss, preempt_for_read_ahead
from infinity.schedule.trace import Cursor, Phase, Trace, TraceRecorder, Use

__all__ = ["Budgets", "Cursor", "Phase", "Trace", "TraceRecorder", "Use", "fetches_from", "make_room",
           "next_use_distance", "persistent_set", "preempt_for_miss", "preempt_for_read_ahead", "releases_after"]

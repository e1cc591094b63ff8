"""Pure scheduling logic for stage 3: the trace of module order, persistence, and the prefetch plan.

No I/O and no torch here: partitions are integers with element counts, modules are integers.  The
coordinator (infinity/zero) feeds it events and carries out its decisions through the memory manager.
"""
from infinity.schedule.budget import Budgets, persistent_set
from infinity.schedule.planner import Plan, plan_after, releases_after, fetches_from
from infinity.schedule.trace import Cursor, Phase, Trace, TraceRecorder, Use

__all__ = ["Budgets", "Cursor", "Phase", "Plan", "Trace", "TraceRecorder", "Use", "fetches_from", "persistent_set",
           "plan_after", "releases_after"]

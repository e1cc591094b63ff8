"""The aio tuner behind `infinity-bench`: sweep block_size × queue_depth × threads for sequential
O_DIRECT reads and writes on the NVMe folder, prove from /proc/diskstats that the device (not the
page cache) moved the bytes, compare with fio, and print the best `aio` block.

    plan = SweepPlan("/local_nvme", parse_axes("256K,1M", "8,32", "1,2"), io_size=1 << 30)
    check_plan(plan)
    outcome = run_sweep(plan)
    best = choose_best(outcome.measurements)
"""
import importlib
from typing import Any

from infinity.bench.axes import OpSelection, SweepAxes, parse_axes
from infinity.bench.diskstats import DiskCounters, DiskProbe, parse_diskstats
from infinity.bench.plan import FioPolicy, SweepPlan, check_plan
from infinity.bench.sizes import format_size, parse_size

# [Note: torch on first use]  The sweep and its report need torch, which takes seconds to load (more on a
# busy machine); infinity-bench checks its flags first and refuses a bad one before any of that.
_LAZY = {"Measurement": "sweep", "SweepOutcome": "sweep", "run_sweep": "sweep", "Best": "report",
         "best_block": "report", "choose_best": "report", "table": "report", "to_json": "report",
         "warnings": "report"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"infinity.bench.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'infinity.bench' has no attribute {name!r}")

__all__ = ["Best", "DiskCounters", "DiskProbe", "FioPolicy", "Measurement", "OpSelection", "SweepAxes",
           "SweepOutcome", "SweepPlan", "best_block", "check_plan", "choose_best", "format_size", "parse_axes",
           "parse_diskstats", "parse_size", "run_sweep", "table", "to_json", "warnings"]

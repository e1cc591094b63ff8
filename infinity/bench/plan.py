"""One sweep, described and checked before any byte moves: a bad flag should cost the user a second,
not the two minutes of a sweep that then fails."""
from __future__ import annotations

import enum
import importlib.util
import os
from dataclasses import dataclass

from infinity.io import native_refusal
from infinity.bench.axes import OpSelection, SweepAxes
from infinity.bench.sizes import format_size
from infinity.config.aio import DIRECT_ALIGNMENT
from infinity.errors import CapacityError, ConfigError, NvmePathError, Problem
from infinity.io.files import check_nvme_path, direct_io_refusal

DEFAULT_IO_SIZE = 1 << 30


class FioPolicy(enum.Enum):
    SKIP = "skip"
    COMPARE = "compare"  # run fio with the same settings beside each of ours (when fio is on PATH)


@dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep needs: where, how much per run, which settings and operations, how often."""

    nvme_path: str
    axes: SweepAxes
    io_size: int = DEFAULT_IO_SIZE
    ops: OpSelection = OpSelection.BOTH
    repeat: int = 1
    fio: FioPolicy = FioPolicy.SKIP

    def run_count(self, with_fio: bool) -> int:
        """Timed transfers in the sweep (fio runs once per setting and operation)."""
        per_setting = len(self.ops.ops) * (self.repeat + (1 if with_fio else 0))
        return len(self.axes.settings()) * per_setting


def check_plan(plan: SweepPlan) -> None:
    """Raises ConfigError (naming the flag) or CapacityError for what would make the sweep fail or lie."""
    problems: list[Problem] = []
    if plan.io_size <= 0 or plan.io_size % DIRECT_ALIGNMENT:
        problems.append(Problem("--io_size", f"must be a positive multiple of {DIRECT_ALIGNMENT} (O_DIRECT "
                                f"transfers whole blocks), got {plan.io_size}", "use a size such as 256M or 1G"))
    if plan.repeat < 1:
        problems.append(Problem("--repeat", f"must be at least 1, got {plan.repeat}", "set --repeat to 1 or more"))
    if problems:
        raise ConfigError(problems, source="command line")
    check_nvme_path(plan.nvme_path, need_bytes=plan.io_size, key="--nvme_path")
    refusal = direct_io_refusal(plan.nvme_path)
    if refusal:
        raise NvmePathError(plan.nvme_path, f"cannot be timed without the page cache: {refusal}",
                            "point --nvme_path at a folder on the NVMe drive's file system (ext4, xfs)",
                            key="--nvme_path")
    _check_host_memory(plan.io_size)
    refusal = native_refusal()
    if refusal:
        raise ConfigError([Problem("aio.backend", f"the tuner measures the native libaio engine, but {refusal}",
                                   "install libaio-dev and reinstall infinity")], source="native engine")


def _check_host_memory(io_size: int) -> None:
    """The sweep holds one host buffer of io_size; more than the memory available would swap or be killed."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return
    if io_size > available:
        raise CapacityError(f"host memory for one --io_size buffer ({format_size(io_size)})", io_size, available,
                            "lower --io_size")


def check_output_file(path: str, flag: str) -> None:
    """The folder of an output file exists, so the results are not lost after the sweep."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError([Problem(flag, f"the folder of {path!r} does not exist",
                                   f"create {folder} or give {flag} a path in an existing folder")],
                          source="command line")
    if os.path.isdir(path):
        raise ConfigError([Problem(flag, f"{path!r} is a folder", f"give {flag} a file name")],
                          source="command line")


def check_plot_available() -> None:
    """matplotlib is an optional extra; say how to get it before the sweep, not after."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError([Problem("--plot", "needs matplotlib, which is not installed",
                                   "pip install 'infinity[plot]'")], source="command line")

"""The sweep itself: for each aio setting, time a sequential write and read of io_size bytes through the
native engine with O_DIRECT, count what the device moved, and (when asked) run fio alongside.

    outcome = run_sweep(SweepPlan("/local_nvme", parse_axes()), progress=lambda label: ...)
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch

from infinity.bench.diskstats import DiskProbe, device_bytes
from infinity.bench.fio import FioError, fio_binary, run_fio
from infinity.bench.plan import FioPolicy, SweepPlan
from infinity.bench.sizes import format_size
from infinity.config.aio import AioConfig, Backend
from infinity.bench.bench_file import BenchFile, create_bench_file
from infinity.io import AioFile, DirectPolicy, open_handle
from infinity.io.handle import IoHandle, Op
from infinity.memory.host_buffer import HostBuffer

log = logging.getLogger("infinity.bench")

Progress = Callable[[str], None]
PATTERN_BYTES = 1 << 20


@dataclass(frozen=True)
class Measurement:
    """One setting and operation: median GB/s (1e9 bytes/s) of its runs, and device bytes / requested
    bytes (the lowest of its runs; NaN when the folder has no block device to count)."""

    op: Op
    aio: AioConfig
    gbps: float
    device_bytes_ratio: float
    runs_gbps: tuple[float, ...]
    fio_gbps: float | None = None

    @property
    def opname(self) -> str:
        return self.op.name.lower()


@dataclass(frozen=True)
class SweepOutcome:
    """Every measurement, the device the ratios were counted on, and what the user should be told."""

    measurements: tuple[Measurement, ...]
    probe: DiskProbe
    io_size: int
    notes: tuple[str, ...] = ()
    fio: str | None = None  # the fio binary compared against, if any


@dataclass(frozen=True)
class _Run:
    gbps: float
    ratio: float


def run_sweep(plan: SweepPlan, progress: Progress | None = None) -> SweepOutcome:
    """Runs every setting of plan.axes; the bench file is removed afterwards, also on error or Ctrl-C.
    The plan should have passed check_plan()."""
    probe = DiskProbe.for_path(plan.nvme_path)
    notes: list[str] = [] if probe.device else [probe.reason]
    fio = fio_binary() if plan.fio is FioPolicy.COMPARE else None
    if plan.fio is FioPolicy.COMPARE and fio is None:
        notes.append("fio is not on PATH, so there is no fio column; install fio (apt-get install fio) to compare")
    report = progress or (lambda label: None)
    buffer = HostBuffer(plan.io_size, zero=False)
    bench: BenchFile | None = None
    try:
        fill_pattern(buffer.tensor)
        bench = create_bench_file(plan.nvme_path)
        file = bench.file
        _lay_out(file, buffer, plan)
        measurements: list[Measurement] = []
        for setting in plan.axes.settings():
            measured = _measure_setting(setting, plan, file, buffer, probe, report)
            if fio is not None:
                measured = _with_fio(measured, fio, plan, file, report, notes)
            measurements += measured
    finally:
        if bench is not None:
            bench.close()  # and removes it
        buffer.release()
    return SweepOutcome(tuple(measurements), probe, plan.io_size, tuple(notes), fio)


def fill_pattern(tensor: torch.Tensor) -> None:
    """Fills tensor with 1 MiB of random bytes, repeated.

    [Note: zeros are not a fair payload: some drives and virtual disks compress or deduplicate them, and
    fio writes random bytes by default.  Doubling copies of one random MiB cost little time.]"""
    n = tensor.numel()
    seed = min(n, PATTERN_BYTES)
    tensor[:seed].copy_(torch.frombuffer(bytearray(os.urandom(seed)), dtype=torch.uint8))
    filled = seed
    while filled < n:
        count = min(filled, n - filled)
        tensor[filled:filled + count].copy_(tensor[:count])
        filled += count


def _lay_out(file: AioFile, buffer: HostBuffer, plan: SweepPlan) -> None:
    """Writes the whole file once, untimed, before the first timed run.

    [Note: without this the first setting's write would also allocate the file's blocks and look
    slower than the rest (0.55-0.78 of fio's figure at 256K qd 8 on ext4 here, against about 1 once
    allocated).  Swap files are overwritten in place at every step after the first, so overwrites are
    the figure that matters; a read-only sweep needs the file anyway.]"""
    log.info("writing %s of %s before the sweep", format_size(plan.io_size), file.path)
    with open_handle(AioConfig(backend=Backend.LIBAIO), direct=DirectPolicy.REQUIRE) as handle:
        handle.pwrite(buffer.tensor, file, 0)


def _measure_setting(setting: AioConfig, plan: SweepPlan, file: AioFile, buffer: HostBuffer, probe: DiskProbe,
                     report: Progress) -> list[Measurement]:
    runs: dict[Op, list[_Run]] = {op: [] for op in plan.ops.ops}
    # The bench measures the native engine; the printed block keeps backend "auto", which picks it too.
    with open_handle(replace(setting, backend=Backend.LIBAIO), direct=DirectPolicy.REQUIRE) as handle:
        for _ in range(plan.repeat):
            for op in plan.ops.ops:
                runs[op].append(_timed(handle, op, file, buffer, probe))
                report(f"{op.name.lower():5} {describe(setting)}")
    return [Measurement(op, setting, statistics.median(r.gbps for r in done), _lowest(r.ratio for r in done),
                        tuple(r.gbps for r in done)) for op, done in runs.items()]


def _timed(handle: IoHandle, op: Op, file: AioFile, buffer: HostBuffer, probe: DiskProbe) -> _Run:
    if op is Op.READ:
        # O_DIRECT already bypasses the cache; dropping the file's pages as well means a kernel that
        # quietly fell back to buffered I/O still could not serve the read from memory.
        file.drop_cached_pages()
    before = probe.snapshot()
    start = time.perf_counter()
    moved = handle.pread(buffer.tensor, file, 0) if op is Op.READ else handle.pwrite(buffer.tensor, file, 0)
    elapsed = time.perf_counter() - start
    counted = device_bytes(before, probe.snapshot(), reading=op is Op.READ)
    ratio = math.nan if counted is None else counted / moved
    gbps = moved / elapsed / 1e9
    log.debug("%s %s: %.3f GB/s, device bytes ratio %.3f", op.name.lower(), describe(handle.config), gbps, ratio)
    return _Run(gbps, ratio)


def _with_fio(measured: list[Measurement], fio: str, plan: SweepPlan, file: AioFile, report: Progress,
              notes: list[str]) -> list[Measurement]:
    """The setting's measurements with fio's figure added, fio running in the same order (write first)."""
    out = []
    for m in measured:
        if m.op is Op.READ:
            file.drop_cached_pages()
        try:
            out.append(replace(m, fio_gbps=run_fio(fio, m.aio, m.op, file.path, plan.io_size)))
        except FioError as err:
            notes.append(f"{m.opname} {describe(m.aio)}: {err}")
            out.append(m)
        report(f"fio {m.opname:5} {describe(m.aio)}")
    return out


def describe(setting: AioConfig) -> str:
    """A short label: block 1M qd 32 threads 2 (with ss/oe when they differ from the defaults)."""
    text = f"block {format_size(setting.block_size)} qd {setting.queue_depth} threads {setting.thread_count}"
    if setting.single_submit:
        text += " single_submit"
    if not setting.overlap_events:
        text += " no overlap_events"
    return text


def _lowest(ratios: Iterable[float]) -> float:
    values = list(ratios)
    return math.nan if any(math.isnan(v) for v in values) else min(values)

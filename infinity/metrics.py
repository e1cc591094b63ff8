"""Every metric infinity exports, defined in one place (METRICS), and the counts behind them.

    from infinity import metrics
    if metrics.ACTIVE: ...                       # a call site pays one attribute test while nothing exports
    metrics.record_step(engine.step_report())    # once per optimizer step

The exporter (infinity/exporter.py) serves these over HTTP for Prometheus; docs/metrics.md lists them
with a PromQL example each.  Leaf module: no torch, no other infinity module.

[Note: counting off the hot path]
Nothing here touches a prometheus_client object while bytes move.  The I/O layer and the memory
manager add plain integers to one process-wide tally under one short lock, in the completion path they
already run (a dict increment or two and a bisect into at most 19 bucket bounds: about a microsecond
against the tens of microseconds a 4 KiB request takes).  Gauges (resident bytes, buffers in use, aio
settings) are not counted at all: the collector reads the live objects (ledgers, pools, swap stores,
handles; held weakly) when Prometheus scrapes, so they have one source of truth.  At scrape time
InfinityCollector copies the tally under the lock and builds the text outside it.  Recording happens
only while an exporter runs (ACTIVE); a request counts if it was submitted while ACTIVE, so its
completion, bytes and in-flight count stay consistent when the exporter starts or stops midway.
Counts are per process and never reset, as Prometheus counters must be.
"""
from __future__ import annotations

import bisect
import errno as _errno
import sys
import threading
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

TIERS = ("compute", "host", "nvme")
KINDS = ("param", "grad", "optimizer_state")
OPS = ("read", "write")
RESULTS = ("ok", "error")
# Swap-file regions (NvmeStore labels each file with its region) and the kind of data they hold.
KIND_OF_REGION = {"param": "param", "grad": "grad", "master": "optimizer_state", "exp_avg": "optimizer_state",
                  "exp_avg_sq": "optimizer_state"}
# The tier transfers the engine makes, pre-declared at zero so rate() works from the first one.
TRANSFER_ROUTES = tuple([("nvme", "host", k) for k in KINDS] + [("host", "nvme", k) for k in KINDS]
                        + [("host", "compute", "param")])
STEP_PHASES = ("compute", "read_wait", "write_wait", "optimizer")  # they add up to the step
STALL_PHASES = ("read", "write", "optimizer_io")
PREFETCH_OUTCOMES = ("hit", "late", "miss")
NONFINITE_VALUES = ("loss", "grad_norm")  # infinity_nonfinite_steps_total{value}: zero/nonfinite.py's names

# Latency: 25 µs (a 4 KiB read from a fast drive) to 10 s (1 GiB on a slow one).  Sizes: 4 KiB to 1 GiB,
# powers of 4.  Steps: 50 ms to 1000 s.
LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = tuple(float(4096 * 4 ** i) for i in range(10))
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)


@dataclass(frozen=True)
class Metric:
    name: str  # as exposed: counters end in _total, info metrics in _info
    type: str  # counter, gauge, histogram, info
    help: str
    labels: tuple[str, ...] = ()


_XFER = ("src_tier", "dst_tier", "kind", "result")
METRICS = {m.name: m for m in (
    Metric("infinity_tier_transfer_bytes_total", "counter", "Bytes moved between tiers by the memory manager "
           "(for a failed transfer, the bytes it moved before failing)", _XFER),
    Metric("infinity_tier_transfers_total", "counter", "Transfers between tiers by the memory manager", _XFER),
    Metric("infinity_tier_transfer_duration_seconds", "histogram", "Duration of tier transfers: an NVMe transfer "
           "from submit to the drive's completion, a copy to the compute tier while it runs",
           ("src_tier", "dst_tier")),
    Metric("infinity_io_requests_total", "counter", "Async-IO requests completed", ("op", "result")),
    Metric("infinity_io_bytes_total", "counter", "Bytes moved by async-IO requests", ("op",)),
    Metric("infinity_io_direct_bytes_total", "counter", "Bytes moved through O_DIRECT (bypassing the page cache)",
           ("op",)),
    Metric("infinity_io_request_duration_seconds", "histogram", "Async-IO request latency, submit to completion",
           ("op",)),
    Metric("infinity_io_request_size_bytes", "histogram", "Async-IO request sizes", ("op",)),
    Metric("infinity_io_requests_in_flight", "gauge", "Async-IO requests submitted and not yet completed",
           ("op",)),
    Metric("infinity_io_errors_total", "counter", "Failed async-IO requests, at submit or completion, by errno "
           "(short transfers are EIO)", ("op", "errno")),
    Metric("infinity_io_short_transfers_total", "counter", "Requests that moved fewer bytes than asked", ("op",)),
    Metric("infinity_aio_info", "info", "Settings of the live async-IO handles",
           ("backend", "block_size", "queue_depth", "thread_count", "single_submit", "overlap_events")),
    Metric("infinity_tier_resident_bytes", "gauge", "Bytes of partitions resident on each tier now", ("tier",)),
    Metric("infinity_tier_peak_resident_bytes", "gauge", "Most bytes of partitions resident on each tier so far",
           ("tier",)),
    Metric("infinity_tier_capacity_bytes", "gauge", "Bytes set aside on each tier: swap files on nvme, staging "
           "pools on host, device memory on a CUDA compute tier", ("tier",)),
    Metric("infinity_host_buffers", "gauge", "Staging buffers of each pool, free or used", ("pool", "state", "pinned")),
    Metric("infinity_prefetch_total", "counter", "Partitions a module needed, by how prefetch had fetched them",
           ("outcome",)),
    Metric("infinity_gathered_ahead_total", "counter", "All-gathers of a parameter started ahead of its use, "
           "while the module before it computes (data-parallel ranks > 1)"),
    Metric("infinity_stall_seconds_total", "counter", "Seconds steps waited on I/O, by what waited", ("phase",)),
    Metric("infinity_trace_invalidations_total", "counter", "Times the recorded module trace no longer matched"),
    Metric("infinity_steps_total", "counter", "Optimizer steps recorded"),
    Metric("infinity_step_duration_seconds", "histogram", "Duration of optimizer steps (a whole accumulation window)"),
    Metric("infinity_step_phase_seconds_total", "counter", "Seconds of steps by phase; the phases add up to the "
           "steps' duration", ("phase",)),
    Metric("infinity_step_stall_ratio", "gauge", "Share of the last step the compute tier sat idle waiting on I/O"),
    Metric("infinity_nonfinite_steps_total", "counter", "Optimizer steps whose loss or gradient norm was NaN or "
           "infinite, by which", ("value",)),
    Metric("infinity_step_io_per_param_bytes", "gauge", "NVMe bytes the last step read or wrote per parameter of "
           "this rank's share", ("op",)),
)}
# Series exported at zero before anything happens, so that rate() and dashboards see them from the start.
DECLARED: tuple[tuple[str, tuple[str, ...]], ...] = (
    *[("infinity_tier_transfer_bytes_total", (*r, res)) for r in TRANSFER_ROUTES for res in RESULTS],
    *[("infinity_tier_transfers_total", (*r, res)) for r in TRANSFER_ROUTES for res in RESULTS],
    *[("infinity_io_requests_total", (op, res)) for op in OPS for res in RESULTS],
    *[(name, (op,)) for op in OPS for name in ("infinity_io_bytes_total", "infinity_io_direct_bytes_total",
                                              "infinity_io_requests_in_flight", "infinity_io_short_transfers_total")],
    *[("infinity_prefetch_total", (o,)) for o in PREFETCH_OUTCOMES],
    *[("infinity_stall_seconds_total", (p,)) for p in STALL_PHASES],
    *[("infinity_step_phase_seconds_total", (p,)) for p in STEP_PHASES],
    ("infinity_steps_total", ()), ("infinity_trace_invalidations_total", ()), ("infinity_gathered_ahead_total", ()),
    *[("infinity_nonfinite_steps_total", (v,)) for v in NONFINITE_VALUES],
)
RESERVED_LABELS = frozenset({"rank"} | {label for m in METRICS.values() for label in m.labels} | {"le"})


class Buckets:
    """A histogram as plain integers: a count per bucket (not cumulative, the last one +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: a value on a bound counts in it
        self.sum += value

    def copy(self) -> "Buckets":
        c = Buckets(self.bounds)
        c.counts, c.sum = list(self.counts), self.sum
        return c

    @property
    def count(self) -> int:
        return sum(self.counts)


class Tally:
    """Everything counted so far in this process; change it only under `lock`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: Counter[tuple[str, tuple[str, ...]]] = Counter()  # (metric, label values) -> value
        self.histograms: dict[tuple[str, tuple[str, ...]], Buckets] = {}
        self.gauges: dict[tuple[str, tuple[str, ...]], float] = {}

    def observe(self, metric: str, labels: tuple[str, ...], value: float, bounds: tuple[float, ...]) -> None:
        h = self.histograms.get((metric, labels))
        if h is None:
            h = self.histograms[(metric, labels)] = Buckets(bounds)
        h.observe(value)

    def snapshot(self) -> "Tally":
        with self.lock:
            s = Tally()
            s.counters = Counter(self.counters)
            s.histograms = {k: h.copy() for k, h in self.histograms.items()}
            s.gauges = dict(self.gauges)
        return s


TALLY = Tally()
ACTIVE = False  # True while something exports (exporter.py): call sites test it before counting
_enabled = 0
_enable_lock = threading.Lock()


def enable() -> None:
    """Starts recording (nested: each enable needs a disable)."""
    global ACTIVE, _enabled
    with _enable_lock:
        _enabled += 1
        ACTIVE = True


def disable() -> None:
    global ACTIVE, _enabled
    with _enable_lock:
        _enabled = max(_enabled - 1, 0)
        ACTIVE = _enabled > 0


def errno_name(err: int) -> str:
    return _errno.errorcode.get(err, str(err))


def kind_of_region(region: str) -> str | None:
    return KIND_OF_REGION.get(region)


# ---- recording (call sites test ACTIVE first) --------------------------------------------------
def io_submitted(op: str) -> None:
    with TALLY.lock:
        TALLY.counters[("infinity_io_requests_in_flight", (op,))] += 1


def io_completed(op: str, region: str, requested: int, moved: int, direct: int, seconds: float, err: int = 0,
                 short: bool = False) -> None:
    """One request submitted while ACTIVE has completed; region: its file's label (a swap region or "")."""
    result = "error" if err else "ok"
    kind = KIND_OF_REGION.get(region)
    c = TALLY.counters
    with TALLY.lock:
        c[("infinity_io_requests_in_flight", (op,))] -= 1
        c[("infinity_io_requests_total", (op, result))] += 1
        c[("infinity_io_bytes_total", (op,))] += moved
        c[("infinity_io_direct_bytes_total", (op,))] += direct
        TALLY.observe("infinity_io_request_duration_seconds", (op,), seconds, LATENCY_BUCKETS)
        TALLY.observe("infinity_io_request_size_bytes", (op,), requested, SIZE_BUCKETS)
        if err:
            c[("infinity_io_errors_total", (op, errno_name(err)))] += 1
            if short:
                c[("infinity_io_short_transfers_total", (op,))] += 1
        if kind is not None:
            route = ("nvme", "host") if op == "read" else ("host", "nvme")
            _transfer(route, kind, moved, seconds, result)


def io_submit_failed(op: str, err: int) -> None:
    """A request refused before it reached the engine (alignment, a closed or deleted file, io_submit)."""
    with TALLY.lock:
        TALLY.counters[("infinity_io_errors_total", (op, errno_name(err)))] += 1


def transfer(src: str, dst: str, kind: str, nbytes: int, seconds: float, ok: bool = True) -> None:
    """A tier transfer that is not an I/O request (a copy to the compute tier)."""
    with TALLY.lock:
        _transfer((src, dst), kind, nbytes, seconds, "ok" if ok else "error")


def _transfer(route: tuple[str, str], kind: str, nbytes: int, seconds: float, result: str) -> None:
    labels = (*route, kind, result)
    TALLY.counters[("infinity_tier_transfer_bytes_total", labels)] += nbytes
    TALLY.counters[("infinity_tier_transfers_total", labels)] += 1
    TALLY.observe("infinity_tier_transfer_duration_seconds", route, seconds, LATENCY_BUCKETS)


def record_step(report: Any) -> None:
    """One optimizer step's StepReport (infinity/zero/step_report.py; per-step figures, not running totals)."""
    if not ACTIVE:
        return
    c = TALLY.counters
    phases = {"compute": report.other_s, "read_wait": report.read_wait_s, "write_wait": report.write_wait_s,
              "optimizer": report.optimizer_s}
    stalls = {"read": report.read_wait_s, "write": report.write_wait_s, "optimizer_io": report.optimizer_io_wait_s}
    outcomes = {"hit": report.prefetch_hits, "late": report.prefetch_late, "miss": report.prefetch_misses}
    with TALLY.lock:
        c[("infinity_steps_total", ())] += 1
        TALLY.observe("infinity_step_duration_seconds", (), report.step_s, STEP_BUCKETS)
        for phase, seconds in phases.items():
            c[("infinity_step_phase_seconds_total", (phase,))] += seconds
        for phase, seconds in stalls.items():
            c[("infinity_stall_seconds_total", (phase,))] += seconds
        for outcome, n in outcomes.items():
            c[("infinity_prefetch_total", (outcome,))] += n
        c[("infinity_trace_invalidations_total", ())] += report.trace_invalidations
        c[("infinity_gathered_ahead_total", ())] += report.gathered_ahead
        TALLY.gauges[("infinity_step_stall_ratio", ())] = report.stall_ratio
        for value in report.nonfinite:
            c[("infinity_nonfinite_steps_total", (value,))] += 1
        TALLY.gauges[("infinity_step_io_per_param_bytes", ("read",))] = report.bytes_read_per_param
        TALLY.gauges[("infinity_step_io_per_param_bytes", ("write",))] = report.bytes_written_per_param


# ---- live objects, read at scrape time ----------------------------------------------------------
Reader = Callable[[Any], Iterable[tuple[str, tuple[str, ...], float]]]
_watched: "weakref.WeakKeyDictionary[Any, Reader]" = weakref.WeakKeyDictionary()
_watch_lock = threading.Lock()


def watch(obj: Any, reader: Reader) -> None:
    """Reads (metric, label values, value) gauge samples from obj at each scrape, while obj lives."""
    with _watch_lock:
        _watched[obj] = reader


def unwatch(obj: Any) -> None:
    with _watch_lock:
        _watched.pop(obj, None)


def read_ledger(ledger: Any) -> Iterator[tuple[str, tuple[str, ...], float]]:
    r = ledger.report()
    for tier in TIERS:
        yield "infinity_tier_resident_bytes", (tier,), getattr(r, f"{tier}_bytes")
        yield "infinity_tier_peak_resident_bytes", (tier,), getattr(r, f"peak_{tier}_bytes")


def read_pool(pool: Any) -> Iterator[tuple[str, tuple[str, ...], float]]:
    used, pinned = pool.in_use, str(bool(pool.pinned)).lower()
    yield "infinity_host_buffers", (pool.name, "used", pinned), used
    yield "infinity_host_buffers", (pool.name, "free", pinned), pool.buffer_count - used
    yield "infinity_tier_capacity_bytes", ("host",), pool.buffer_count * pool.buffer_bytes


def read_store(store: Any) -> Iterator[tuple[str, tuple[str, ...], float]]:
    yield "infinity_tier_capacity_bytes", ("nvme",), store.planned_bytes


def aio_reader(backend: str, config: Any) -> Reader:
    labels = (backend, str(config.block_size), str(config.queue_depth), str(config.thread_count),
              str(bool(config.single_submit)).lower(), str(bool(config.overlap_events)).lower())
    return lambda handle: [("infinity_aio_info", labels, 1)]


def live_gauges() -> dict[tuple[str, tuple[str, ...]], float]:
    """Gauge samples of every watched object, summed over objects with the same labels."""
    with _watch_lock:
        items = list(_watched.items())
    out: dict[tuple[str, tuple[str, ...]], float] = {}
    for obj, reader in items:
        for name, labels, value in reader(obj):
            out[(name, labels)] = 1 if METRICS[name].type == "info" else out.get((name, labels), 0) + value
    cuda = sys.modules.get("torch.cuda")  # never imports torch; reads the device only if torch started CUDA
    if cuda is not None and cuda.is_initialized():
        device = cuda.get_device_properties(cuda.current_device())
        out[("infinity_tier_capacity_bytes", ("compute",))] = device.total_memory
    return out

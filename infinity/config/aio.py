"""The `aio` block: settings of the async-IO engine."""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from infinity.config._values import Problems, as_bool, as_count, did_you_mean
from infinity.errors import ConfigError, Problem

log = logging.getLogger("infinity.config")

DIRECT_ALIGNMENT = 4096

# [Note: upper bounds]  Each worker thread of the native engine owns a libaio context of queue_depth events,
# and the kernel grants at most /proc/sys/fs/aio-max-nr events to the whole machine: a handle of 100000
# threads takes nearly all of them (every other program's io_setup then fails with EAGAIN) and minutes of
# system time to start and stop.  So the settings are bounded up front, before any thread starts: these
# ceilings by aio's own rules (check_values), the events by what the machine has free (events_problem).
MAX_THREADS = 64  # intra_op_parallelism: one thread and io context each; drives saturate far below
MAX_QUEUE_DEPTH = 4096  # events per thread; NVMe drives queue at most a few thousand commands
MAX_BLOCK_SIZE = 1 << 30  # bytes per request; the kernel moves at most 2 GiB - 4 KiB in one
AIO_MAX_NR, AIO_NR = "/proc/sys/fs/aio-max-nr", "/proc/sys/fs/aio-nr"
# Older or tool-written spellings of intra_op_parallelism: the Transformers guide writes
# thread_count; DeepSpeed's own NVMe tuner prints num_threads (which DeepSpeed then ignores).
THREAD_ALIASES = ("thread_count", "num_threads")


class Backend(enum.Enum):
    """Which engine moves the bytes."""

    AUTO = "auto"  # libaio when it loads and nvme_path takes O_DIRECT, else posix (with a warning)
    LIBAIO = "libaio"
    POSIX = "posix"  # thread pool over preadv/pwritev through the page cache
    IO_URING = "io_uring"  # only when this build ships infinity/io/io_uring.py; see io_uring_refusal()


def io_uring_refusal() -> str:
    """Why the io_uring backend cannot be chosen here, or "" when it can.

    [Note: config is a leaf and must not import infinity.io, so presence is judged by the
    module file the io layer would ship, not by importing it.  Until that module exists,
    choose_backend() has no io_uring branch, and letting the value through would quietly
    run another engine.]
    """
    module = Path(__file__).resolve().parent.parent / "io" / "io_uring.py"
    return "" if module.is_file() else "this build of infinity has no io_uring backend"


@dataclass(frozen=True)
class AioConfig:
    """Settings of one async-IO handle, validated on construction."""

    block_size: int = 1048576
    queue_depth: int = 8
    intra_op_parallelism: int = 1
    single_submit: bool = False
    overlap_events: bool = True
    use_gds: bool = False
    backend: Backend = Backend.AUTO

    def __post_init__(self) -> None:
        problems = Problems()
        check_values({f.name: getattr(self, f.name) for f in fields(self)}, problems, "aio")
        if problems:
            raise ConfigError(problems.items, source="aio")

    @property
    def thread_count(self) -> int:
        return self.intra_op_parallelism

    def to_dict(self) -> dict[str, Any]:
        """The block as DeepSpeed's config takes it (backend only when not auto)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("backend", "use_gds")}
        if self.backend is not Backend.AUTO:
            out["backend"] = self.backend.value
        return out

    @classmethod
    def from_dict(cls, block: Mapping[str, Any], prefix: str = "aio") -> "AioConfig":
        problems = Problems()
        config = parse_aio(block, problems, prefix)
        if problems or config is None:
            raise ConfigError(problems.items, source=prefix)
        return config


def check_values(values: Mapping[str, Any], problems: Problems, prefix: str) -> None:
    """Range checks of a complete set of aio values (defaults filled in)."""
    bs = values["block_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0 or bs % DIRECT_ALIGNMENT:
        problems.add(f"{prefix}.block_size", f"must be a positive multiple of {DIRECT_ALIGNMENT}, got {bs!r}",
                     "use a size such as 262144 (256K) or 1048576 (1M)")
    elif bs > MAX_BLOCK_SIZE:
        problems.add(f"{prefix}.block_size", f"must be at most {MAX_BLOCK_SIZE} (1G; the kernel moves at most "
                     f"2 GiB - 4 KiB per request), got {bs!r}", "use a size such as 1048576 (1M) or 4194304 (4M)")
    for name, most in (("queue_depth", MAX_QUEUE_DEPTH), ("intra_op_parallelism", MAX_THREADS)):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.add(f"{prefix}.{name}", f"must be an integer of at least 1, got {value!r}",
                         f"set {prefix}.{name} to 1 or more")
        elif value > most:
            problems.add(f"{prefix}.{name}", f"must be at most {most}, got {value!r}",
                         f"set {prefix}.{name} to {most} or less (1 to 8 is what NVMe drives need; infinity-bench "
                         "finds the best)")
    if not isinstance(values["backend"], Backend):
        problems.add(f"{prefix}.backend", f"must be a Backend, got {values['backend']!r}",
                     f"one of {', '.join(b.value for b in Backend)}")
    elif values["backend"] is Backend.IO_URING and io_uring_refusal():
        problems.add(f"{prefix}.backend", f"io_uring was asked for but {io_uring_refusal()}",
                     "set aio.backend to auto, libaio or posix")
    if values["use_gds"]:
        problems.add(f"{prefix}.use_gds", "GPUDirect Storage is not supported by infinity",
                     f"set {prefix}.use_gds to false")


def aio_events() -> tuple[int, int] | None:
    """(aio-max-nr, aio-nr): the machine's limit on libaio events and those taken now; None where /proc
    does not say (not Linux)."""
    try:
        with open(AIO_MAX_NR) as limit, open(AIO_NR) as taken:
            return int(limit.read()), int(taken.read())
    except (OSError, ValueError):
        return None


def events_problem(config: AioConfig, prefix: str = "aio") -> Problem | None:
    """A problem when config's engine would take more libaio events (intra_op_parallelism × queue_depth,
    as io_setup counts them) than the machine has free now; None when it fits, uses no libaio (posix), or
    the machine does not say."""
    counts = aio_events()
    if counts is None or config.backend is Backend.POSIX:
        return None
    limit, taken = counts
    need, free = config.intra_op_parallelism * config.queue_depth, max(0, limit - taken)
    if need <= free:
        return None
    raise_to = -(-(taken + need) // 65536) * 65536
    return Problem(f"{prefix}.intra_op_parallelism × {prefix}.queue_depth",
                   f"{config.intra_op_parallelism} × {config.queue_depth} = {need} libaio events, but this machine "
                   f"has {free} free ({AIO_MAX_NR} {limit} minus {AIO_NR} {taken} taken by running programs)",
                   f"lower them until their product is at most {free}, or raise the machine's limit (as root: "
                   f"sysctl -w fs.aio-max-nr={raise_to})")


def parse_aio(block: Mapping[str, Any], problems: Problems, prefix: str = "aio") -> AioConfig | None:
    """Reads an `aio` block, adding every problem found to `problems`."""
    if not isinstance(block, Mapping):
        problems.add(prefix, f"must be an object, got {type(block).__name__}", "write it as {...}")
        return None
    known = [f.name for f in fields(AioConfig)]
    before = len(problems.items)  # problems may already hold those of other blocks
    values: dict[str, Any] = {}
    for key, value in block.items():
        path = f"{prefix}.{key}"
        name = key
        if key in THREAD_ALIASES:
            log.warning("%s is the older name of %s.intra_op_parallelism; it was taken as that", path, prefix)
            if "intra_op_parallelism" in block or any(a in block for a in THREAD_ALIASES if a != key):
                problems.add(path, "given together with another spelling of intra_op_parallelism",
                             "keep only intra_op_parallelism")
                continue
            name = "intra_op_parallelism"
        if name not in known:
            problems.add(path, "unknown key", did_you_mean(key, known + list(THREAD_ALIASES)))
            continue
        parsed = _parse_field(name, value, path, problems)
        if parsed is not None:
            values[name] = parsed
    defaults = {f.name: f.default for f in fields(AioConfig)}
    check_values({**defaults, **values}, problems, prefix)
    return None if len(problems.items) > before else AioConfig(**values)


def _parse_field(name: str, value: Any, path: str, problems: Problems) -> Any:
    if name in ("single_submit", "overlap_events", "use_gds"):
        return as_bool(value, path, problems)
    if name == "backend":
        try:
            return Backend(str(value).lower())
        except ValueError:
            problems.add(path, f"unknown backend {value!r}", f"one of {', '.join(b.value for b in Backend)}")
            return None
    # Ranges are checked once, by AioConfig itself.
    return as_count(value, path, problems)

"""What a sweep covers: the axes of aio settings, the operations, and the checks made before any byte moves.

Axis values arrive as the comma lists users type (`--block_size 256K,1M`); every problem with them is
reported at once, naming the flag and the aio key it sets.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import Callable, TypeVar

from infinity.bench.sizes import parse_size
from infinity.config.aio import AioConfig, Backend, events_problem
from infinity.config import Problems
from infinity.errors import ConfigError
from infinity.io.handle import Op

T = TypeVar("T")

# The flag that sets each aio key, so that AioConfig's own problems can name what the user typed.
FLAG_OF_KEY = {"aio.block_size": "--block_size", "aio.queue_depth": "--queue_depth",
               "aio.intra_op_parallelism": "--thread_count"}
DEFAULT_BLOCK_SIZES = "256K,1M,4M"
DEFAULT_QUEUE_DEPTHS = "8,32,64"
DEFAULT_THREAD_COUNTS = "1,2"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class OpSelection(enum.Enum):
    """Which operations each setting is timed for."""

    BOTH = "both"
    READ_ONLY = "read"
    WRITE_ONLY = "write"

    @property
    def ops(self) -> tuple[Op, ...]:
        """In run order: a setting's write comes first, so that its read finds a freshly written file."""
        return {OpSelection.BOTH: (Op.WRITE, Op.READ), OpSelection.READ_ONLY: (Op.READ,),
                OpSelection.WRITE_ONLY: (Op.WRITE,)}[self]


@dataclass(frozen=True)
class SweepAxes:
    """The values of each swept aio setting; the sweep is their cross product."""

    block_sizes: tuple[int, ...]
    queue_depths: tuple[int, ...]
    thread_counts: tuple[int, ...]
    single_submits: tuple[bool, ...] = (False,)
    overlap_events: tuple[bool, ...] = (True,)

    def settings(self) -> tuple[AioConfig, ...]:
        """Every combination as a validated AioConfig, block size varying slowest."""
        return tuple(AioConfig(block_size=b, queue_depth=q, intra_op_parallelism=t, single_submit=s,
                               overlap_events=o)
                     for b, q, t, s, o in itertools.product(self.block_sizes, self.queue_depths,
                                                            self.thread_counts, self.single_submits,
                                                            self.overlap_events))


def parse_axes(block_size: str = DEFAULT_BLOCK_SIZES, queue_depth: str = DEFAULT_QUEUE_DEPTHS,
               thread_count: str = DEFAULT_THREAD_COUNTS, single_submit: str = "false",
               overlap_events: str = "true") -> SweepAxes:
    """SweepAxes from comma lists; a ConfigError lists every bad value with its flag."""
    problems = Problems()
    axes = SweepAxes(
        block_sizes=_parse_list(block_size, "--block_size", problems, lambda v: parse_size(v, "--block_size")),
        queue_depths=_parse_list(queue_depth, "--queue_depth", problems, _whole),
        thread_counts=_parse_list(thread_count, "--thread_count", problems, _whole),
        single_submits=_parse_list(single_submit, "--single_submit", problems, _boolean),
        overlap_events=_parse_list(overlap_events, "--overlap_events", problems, _boolean))
    for name, values in (("block_size", axes.block_sizes), ("queue_depth", axes.queue_depths),
                         ("intra_op_parallelism", axes.thread_counts)):
        for value in values:
            _check_with_aio_config(name, value, problems)
    if not problems:
        _check_events(axes, problems)
    if problems:
        raise ConfigError(problems.items, source="command line")
    return axes


def _check_events(axes: SweepAxes, problems: Problems) -> None:
    """The largest setting's libaio events against what the machine has free (aio.events_problem), so a
    sweep never starts a setting that would fail, or starve every other program, part way."""
    largest = AioConfig(queue_depth=max(axes.queue_depths), intra_op_parallelism=max(axes.thread_counts),
                        backend=Backend.LIBAIO)
    problem = events_problem(largest, prefix="aio")
    if problem is not None:
        problems.add("--thread_count × --queue_depth", problem.message,
                     problem.fix.replace("lower them", "lower the largest --thread_count and --queue_depth"))


def _check_with_aio_config(name: str, value: int, problems: Problems) -> None:
    """AioConfig is the one judge of a value; its problems are renamed after the flag."""
    try:
        AioConfig(**{name: value})
    except ConfigError as err:
        for p in err.problems:
            flag = FLAG_OF_KEY.get(p.key)
            if flag is None:
                problems.add(p.key, p.message, p.fix)
            else:
                problems.add(f"{flag} ({p.key})", p.message, p.fix.replace(p.key, flag))


def _parse_list(text: str, flag: str, problems: Problems, parse: Callable[[str], T]) -> tuple[T, ...]:
    """The distinct values of a comma list, in the order given."""
    items = [item.strip() for item in text.split(",")]
    if not any(items) or not all(items):
        problems.add(flag, f"{text!r} has an empty item", f"write {flag} as a comma list without gaps: {_FIX[flag]}")
        return ()
    values: list[T] = []
    for item in items:
        try:
            value = parse(item)
        except ConfigError as err:
            problems.items.extend(err.problems)
            continue
        except ValueError:
            problems.add(flag, f"cannot read {item!r}", _FIX[flag])
            continue
        if value not in values:
            values.append(value)
    return tuple(values)


_FIX = {"--block_size": "give sizes that are multiples of 4K, such as 256K,1M,4M",
        "--queue_depth": "give whole numbers of at least 1, such as 8,32,64",
        "--thread_count": "give whole numbers of at least 1, such as 1,2",
        "--single_submit": "give true, false or both (false,true)",
        "--overlap_events": "give true, false or both (true,false)"}


def _whole(text: str) -> int:
    return int(text, 10)


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE or lowered in _FALSE:
        return lowered in _TRUE
    raise ValueError(text)

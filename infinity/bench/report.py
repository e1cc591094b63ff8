"""What a sweep found, for people (a table, warnings, the best block) and for tools (JSON)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from infinity.bench.sizes import format_size
from infinity.bench.sweep import Measurement, SweepOutcome, describe
from infinity.config.aio import AioConfig
from infinity.io.handle import Op

LOW_RATIO = 0.9  # below this, part of a run did not reach the device


@dataclass(frozen=True)
class Best:
    """The setting to use and why, and the fastest setting of each operation that ran."""

    aio: AioConfig
    score_gbps: float
    basis: str  # "the geometric mean of read and write GB/s", or the one operation that ran
    by_op: tuple[Measurement, ...]


def choose_best(measurements: tuple[Measurement, ...] | list[Measurement]) -> Best | None:
    """Highest geometric mean of read and write GB/s where a setting has both, else the best single op."""
    if not measurements:
        return None
    by_op = tuple(max((m for m in measurements if m.op is op), key=lambda m: m.gbps)
                  for op in (Op.WRITE, Op.READ) if any(m.op is op for m in measurements))
    pairs: dict[AioConfig, dict[Op, float]] = {}
    for m in measurements:
        pairs.setdefault(m.aio, {})[m.op] = m.gbps
    both = {aio: math.sqrt(g[Op.READ] * g[Op.WRITE]) for aio, g in pairs.items() if len(g) == 2}
    if both:
        aio = max(both, key=lambda a: both[a])
        return Best(aio, both[aio], "the geometric mean of read and write GB/s", by_op)
    top = by_op[0]
    return Best(top.aio, top.gbps, f"{top.opname} GB/s (only {top.opname} ran)", by_op)


def best_block(best: Best) -> dict[str, Any]:
    """{"aio": {...}}, ready to paste into a DeepSpeed-style config."""
    return {"aio": best.aio.to_dict()}


def _ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


MARK_HEADER = "best"
LEGEND = ('best: "chosen" = the setting whose aio block is printed below; "fastest <op>" = the highest GB/s '
          'of that operation')


def marks(m: Measurement, best: Best | None) -> str:
    """What the table's last column says of m: "chosen" (its setting's aio block is the one printed),
    "fastest <op>" (the top GB/s of its operation), both, or nothing."""
    if best is None:
        return ""
    words = ["chosen"] if m.aio == best.aio else []
    words += [f"fastest {m.opname}" for top in best.by_op if top is m]
    return ", ".join(words)


def table(outcome: SweepOutcome, best: Best | None) -> str:
    """One row per setting and operation; the last column marks the chosen setting and each operation's
    fastest row, and a legend line under the table says what the marks mean."""
    ms = outcome.measurements
    show_ss = len({m.aio.single_submit for m in ms}) > 1
    show_oe = len({m.aio.overlap_events for m in ms}) > 1
    fio = any(m.fio_gbps is not None for m in ms)
    head = ["op", "block", "qd", "threads"] + (["single_submit"] if show_ss else []) + \
        (["overlap_events"] if show_oe else []) + ["GB/s", "device/requested"] + \
        (["fio GB/s", "ours/fio"] if fio else []) + ([MARK_HEADER] if best else [])
    rows = []
    for m in ms:
        row = [m.opname, format_size(m.aio.block_size), str(m.aio.queue_depth), str(m.aio.thread_count)]
        row += [str(m.aio.single_submit).lower()] if show_ss else []
        row += [str(m.aio.overlap_events).lower()] if show_oe else []
        row += [f"{m.gbps:.2f}", _ratio(m.device_bytes_ratio)]
        if fio:
            row += ["-", "-"] if m.fio_gbps is None else [f"{m.fio_gbps:.2f}", f"{m.gbps / m.fio_gbps:.2f}"]
        row += [marks(m, best)] if best else []
        rows.append(row)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    last = len(head) - 1 if best else -1  # the marks are words: left-aligned
    lines = ["  ".join(c.ljust(w) if i in (0, last) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             .rstrip() for r in [head] + rows]
    width = max(len(line) for line in lines)
    return "\n".join([lines[0], "-" * width, *lines[1:]] + ([LEGEND] if best else []))


def summary(outcome: SweepOutcome, best: Best | None) -> str:
    """The best per operation, the overall choice and the block to paste."""
    if best is None:
        return "no results"
    lines = [f"best {m.opname}: {m.gbps:.2f} GB/s with {describe(m.aio)}" for m in best.by_op]
    lines.append(f"best overall by {best.basis}: {best.score_gbps:.2f} GB/s with {describe(best.aio)} "
                 "(\"chosen\" in the table)")
    lines.append("aio block to paste into your DeepSpeed config:")
    lines.append(json.dumps(best_block(best), indent=2))
    return "\n".join(lines)


def warnings(outcome: SweepOutcome) -> list[str]:
    """Lines the user must see: runs that did not reach the device, and the notes of the sweep."""
    out = list(outcome.notes)
    low = [m for m in outcome.measurements if m.device_bytes_ratio < LOW_RATIO]  # NaN compares False
    for m in low:
        out.append(f"{m.opname} {describe(m.aio)}: the device ({outcome.probe.device}) moved only "
                   f"{m.device_bytes_ratio:.2f} of the requested bytes, so part of the run was served by "
                   "memory (the page cache) and its GB/s is not the drive's")
    return out


def to_json(outcome: SweepOutcome, best: Best | None) -> dict[str, Any]:
    """Every result in plain JSON types (NaN becomes null) and the best block."""
    return {
        "io_size": outcome.io_size,
        "device": outcome.probe.device,
        "results": [_result(m) for m in outcome.measurements],
        "best": {} if best is None else {
            **best_block(best), "score_gbps": best.score_gbps, "basis": best.basis,
            **{m.opname: {"aio": m.aio.to_dict(), "gbps": m.gbps} for m in best.by_op}},
        "warnings": warnings(outcome),
    }


def _result(m: Measurement) -> dict[str, Any]:
    return {"op": m.opname, "block_size": m.aio.block_size, "queue_depth": m.aio.queue_depth,
            "thread_count": m.aio.thread_count, "single_submit": m.aio.single_submit,
            "overlap_events": m.aio.overlap_events, "gbps": m.gbps,
            "device_bytes_ratio": None if math.isnan(m.device_bytes_ratio) else m.device_bytes_ratio,
            "fio_gbps": m.fio_gbps, "runs_gbps": list(m.runs_gbps)}

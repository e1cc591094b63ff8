"""Draws Chrome trace events (infinity.timeline, infinity-train --trace) as an SVG picture: one band per
row (a track kind on one thread, named by the trace's "thread_name" metadata), nested spans stacked, I/O
requests packed into lanes per operation, a millisecond axis.  No plotting library needed.

    svg = render(json.loads(Path("step.json").read_text())["traceEvents"], title="step.json")

`infinity-timeline TRACE.json OUT.svg` (infinity/cli/timeline.py) is the command.  Leaf module: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Any

COLORS = {"compute": "#4e79a7", "wait": "#e15759", "optimizer": "#59a14f", "read": "#f28e2b", "write": "#b07aa1"}
WIDTH, LEFT, LANE, GAP = 1400, 170, 14, 8


@dataclass(frozen=True)
class Bar:
    row: str
    depth: int
    start: float  # µs
    end: float
    name: str
    color: str


def row_names(events: list[dict[str, Any]]) -> dict[tuple[Any, Any], str]:
    """(pid, tid) -> the row's name from "thread_name" metadata (the tid itself where none names it)."""
    return {(e["pid"], e["tid"]): str(e["args"]["name"]) for e in events
            if e["ph"] == "M" and e["name"] == "thread_name"}


def row_order(events: list[dict[str, Any]]) -> dict[str, int]:
    """Row name -> its "thread_sort_index" (rows without one sort after, by name)."""
    names = row_names(events)
    return {names[(e["pid"], e["tid"])]: int(e["args"]["sort_index"]) for e in events
            if e["ph"] == "M" and e["name"] == "thread_sort_index" and (e["pid"], e["tid"]) in names}


def bars(events: list[dict[str, Any]]) -> list[Bar]:
    names = row_names(events)
    out = _thread_bars([e for e in events if e["ph"] == "X"], names)
    begins = {(e["pid"], e["id"]): e for e in events if e["ph"] == "b"}
    requests = sorted(((begins[(e["pid"], e["id"])], e) for e in events
                       if e["ph"] == "e" and (e["pid"], e["id"]) in begins), key=lambda pair: pair[0]["ts"])
    lanes: dict[str, list[float]] = {}
    for b, e in requests:
        op = b["name"].split()[0]
        ends = lanes.setdefault(op, [])
        lane = next((k for k, free_at in enumerate(ends) if free_at <= b["ts"]), len(ends))
        if lane == len(ends):
            ends.append(0.0)
        ends[lane] = e["ts"]
        out.append(Bar(f"I/O {op}s", lane, b["ts"], e["ts"], b["name"], COLORS.get(op, "#999")))
    return out


def _thread_bars(spans: list[dict[str, Any]], names: dict[tuple[Any, Any], str]) -> list[Bar]:
    out, open_ends = [], {}  # row -> ends of the spans enclosing the current one
    for e in sorted(spans, key=lambda e: (e["ts"], -e["dur"])):
        row = names.get((e["pid"], e["tid"]), str(e["tid"]))
        stack = [end for end in open_ends.get(row, []) if end > e["ts"]]
        out.append(Bar(row, len(stack), e["ts"], e["ts"] + e["dur"], e["name"], COLORS.get(e.get("cat"), "#999")))
        open_ends[row] = stack + [e["ts"] + e["dur"]]
    return out


def render(events: list[dict[str, Any]], title: str = "") -> str:
    """The SVG document of the trace events."""
    drawn = bars(events)
    if not drawn:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="400" height="40"><text x="8" y="24">no spans</text></svg>'
    t0, t1 = min(b.start for b in drawn), max(b.end for b in drawn)
    scale = (WIDTH - LEFT - 10) / max(t1 - t0, 1.0)
    sort = row_order(events)
    order = sorted({b.row for b in drawn}, key=lambda r: (r.startswith("I/O"), sort.get(r, 1 << 30), r))
    tops, y = {}, 40
    for row in order:
        tops[row] = y
        y += (max(b.depth for b in drawn if b.row == row) + 1) * LANE + GAP
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{y + 30}" font-family="sans-serif" '
             f'font-size="10"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="8" y="16" font-size="13">{escape(title)}</text>']
    for row in order:
        parts.append(f'<text x="8" y="{tops[row] + 11}">{escape(row)}</text>')
    for b in drawn:
        x, w = LEFT + (b.start - t0) * scale, max((b.end - b.start) * scale, 0.5)
        top = tops[b.row] + b.depth * LANE
        parts.append(f'<rect x="{x:.1f}" y="{top}" width="{w:.1f}" height="{LANE - 2}" fill="{b.color}" '
                     f'stroke="white" stroke-width="0.3"><title>{escape(b.name)} {(b.end - b.start) / 1e3:.2f} ms'
                     f'</title></rect>')
        if w > 6 * len(b.name):
            parts.append(f'<text x="{x + 2:.1f}" y="{top + 10}" fill="white">{escape(b.name)}</text>')
    parts += _axis(t1 - t0, scale, y)
    parts.append("</svg>")
    return "\n".join(parts)


def _axis(span_us: float, scale: float, y: int) -> list[str]:
    step = _tick(span_us / 1e3)
    return [f'<line x1="{LEFT + k * step * 1e3 * scale:.1f}" y1="{y}" x2="{LEFT + k * step * 1e3 * scale:.1f}" '
            f'y2="{y + 5}" stroke="black"/><text x="{LEFT + k * step * 1e3 * scale + 2:.1f}" y="{y + 16}">'
            f'{k * step:g} ms</text>' for k in range(int(span_us / 1e3 / step) + 1)]


def _tick(total_ms: float) -> float:
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000):
        if total_ms / step <= 12:
            return step
    return 10000

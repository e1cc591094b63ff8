"""A timeline of spans (compute, I/O, optimizer) per thread, written as Chrome/Perfetto trace events.

    timeline = Timeline()
    with timeline.span("forward blocks.0", Track.COMPUTE):
        ...
    token = timeline.begin("read param/blocks.0.up.weight", Track.IO)   # an async span: ends elsewhere
    timeline.end(token)
    timeline.interval("read param", Track.IO, start_ns, done_ns)      # times taken elsewhere (monotonic ns)
    timeline.write("step.json")     # open in ui.perfetto.dev or chrome://tracing; infinity-timeline draws it

A disabled timeline (`Timeline(enabled=False)`, or NO_TIMELINE) costs one attribute test per call.
Leaf module: no torch, no I/O until `write`.

[Note: the trace's shape]  The Trace Event Format (and Perfetto, which follows it) draws the duration
events ("X") of one (pid, tid) as one track whose slices must nest strictly: two slices that partially
overlap are reported as errors or moved to an overflow track.  So every (track kind, thread) pair is its
own row with its own numeric tid, named by a "thread_name" metadata event ("compute MainThread"), and
sorted by kind with "thread_sort_index".  A row's spans come from one thread's nested `with` blocks or
from spans that close exactly where the next begins (`complete(..., end_us=)`).  Timestamps are written
as whole microseconds, each span's start and end rounded on their own (dur = end - start after
rounding): rounding keeps order, so nested spans stay nested and back-to-back spans stay back to back,
whereas fractional microseconds are turned into nanoseconds by readers with their own float rounding.
Async I/O requests ("b"/"e", one id each) are process-scoped and may overlap freely.
"""
from __future__ import annotations

import enum
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from infinity.outputs import write_output


class Track(enum.Enum):
    """Which row a span is drawn on (one per kind and thread; async I/O gets its own rows)."""

    COMPUTE = "compute"
    WAIT = "wait"
    OPTIMIZER = "optimizer"
    IO = "io"


MARKS_ROW = "steps"  # the row of instant events (step boundaries)
_SORT = {**{t.value: k for k, t in enumerate(Track)}, MARKS_ROW: len(Track)}


@dataclass(frozen=True)
class Token:
    name: str
    track: Track
    start_us: float
    ident: int


class Timeline:
    def __init__(self, enabled: bool = True, process_name: str = "infinity"):
        self.enabled = enabled
        self.process_name = process_name
        self._events: list[dict[str, Any]] = []
        self._rows: dict[str, int] = {}  # row name ("compute MainThread") -> its numeric tid
        self._lock = threading.Lock()
        self._next_id = 0
        self._origin_ns = time.monotonic_ns()
        self._pid = os.getpid()

    # [Note: one clock]  Every timestamp is CLOCK_MONOTONIC (time.monotonic_ns), the clock the native
    # async-IO engine stamps completions with, so a request's span lines up with the compute around it.
    def now_us(self) -> float:
        return self.us(time.monotonic_ns())

    def us(self, monotonic_ns: int) -> float:
        """A time.monotonic_ns() reading as microseconds on this timeline."""
        return (monotonic_ns - self._origin_ns) / 1e3

    @contextmanager
    def span(self, name: str, track: Track, **args: Any) -> Iterator[None]:
        """A span on the calling thread's row of track."""
        if not self.enabled:
            yield
            return
        start = self.now_us()
        try:
            yield
        finally:
            self.complete(name, track, start, **args)

    def begin(self, name: str, track: Track) -> Token | None:
        """Starts an async span (an I/O request in flight) that `end` closes, from any thread."""
        if not self.enabled:
            return None
        return Token(name, track, self.now_us(), self._new_id())

    def end(self, token: Token | None, **args: Any) -> None:
        if token is None:
            return
        self._async(token.name, token.track, token.ident, token.start_us, self.now_us(), args)

    def interval(self, name: str, track: Track, start_ns: int, end_ns: int, **args: Any) -> None:
        """An async span between two time.monotonic_ns() readings taken elsewhere (an I/O request's submit
        and completion, stamped by the engine's threads)."""
        if self.enabled:
            self._async(name, track, self._new_id(), self.us(start_ns), self.us(end_ns), args)

    def complete(self, name: str, track: Track, start_us: float, end_us: float | None = None, **args: Any) -> None:
        """A span on the calling thread's row from start_us to end_us (now_us() readings; end: now)."""
        if not self.enabled:
            return
        end = self.now_us() if end_us is None else end_us
        ts = round(start_us)
        tid = self._row(f"{track.value} {threading.current_thread().name}")
        self._add({"name": name, "cat": track.value, "ph": "X", "ts": ts, "dur": max(round(end) - ts, 0),
                   "pid": self._pid, "tid": tid, "args": args})

    def _async(self, name: str, track: Track, ident: int, start_us: float, end_us: float,
               args: dict[str, Any]) -> None:
        common = {"name": name, "cat": track.value, "id": ident, "pid": self._pid, "tid": self._row(track.value)}
        ts = round(start_us)
        self._add({**common, "ph": "b", "ts": ts})
        self._add({**common, "ph": "e", "ts": max(round(end_us), ts), "args": args})

    def mark(self, name: str, **args: Any) -> None:
        """An instant event (a step boundary, a trace invalidation)."""
        if self.enabled:
            self._add({"name": name, "ph": "i", "s": "p", "ts": round(self.now_us()), "pid": self._pid,
                       "tid": self._row(MARKS_ROW), "args": args})

    def events(self) -> list[dict[str, Any]]:
        """The trace events: a name for the process and each row ("M" metadata), then the spans."""
        with self._lock:
            rows, spans = dict(self._rows), list(self._events)
        meta: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": self._pid, "tid": 0,
                                       "args": {"name": self.process_name}}]
        used = {e["tid"] for e in spans}
        for row, tid in rows.items():
            if tid not in used:
                continue
            meta.append({"name": "thread_name", "ph": "M", "pid": self._pid, "tid": tid, "args": {"name": row}})
            meta.append({"name": "thread_sort_index", "ph": "M", "pid": self._pid, "tid": tid,
                         "args": {"sort_index": _SORT.get(row.split()[0], len(_SORT)) * 1000 + tid}})
        return meta + spans if spans else []

    def clear(self) -> None:
        """Drops the spans recorded so far (rows keep their tids)."""
        with self._lock:
            self._events.clear()

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Writes the Chrome trace event JSON; returns the path."""
        out = Path(path)
        write_output(out, json.dumps({"traceEvents": self.events(), "displayTimeUnit": "ms"}))  # never via a symlink
        return out

    def _row(self, name: str) -> int:
        with self._lock:
            return self._rows.setdefault(name, len(self._rows) + 1)

    def _new_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def _add(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._events.append(event)


NO_TIMELINE = Timeline(enabled=False)

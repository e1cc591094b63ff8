"""A timeline of spans (compute, I/O, optimizer) per thread, written as Chrome/Perfetto trace events.

    timeline = Timeline()
    with timeline.span("forward blocks.0", Track.COMPUTE):
        ...
    token = timeline.begin("read param/blocks.0.up.weight", Track.IO)   # an async span: ends elsewhere
    timeline.end(token)
    timeline.interval("read param", Track.IO, start_ns, done_ns)      # times taken elsewhere (monotonic ns)
    timeline.write("step.json")     # open in ui.perfetto.dev or chrome://tracing

A disabled timeline (`Timeline(enabled=False)`, or NO_TIMELINE) costs one attribute test per call.
Leaf module: no torch, no I/O until `write`.
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


class Track(enum.Enum):
    """Which row a span is drawn on (one per kind and thread; async I/O gets its own rows)."""

    COMPUTE = "compute"
    IO = "io"
    OPTIMIZER = "optimizer"
    WAIT = "wait"


@dataclass(frozen=True)
class Token:
    name: str
    track: Track
    start_us: float
    ident: int


class Timeline:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._next_id = 0
        self._origin_ns = time.monotonic_ns()

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
        with self._lock:
            self._next_id += 1
            ident = self._next_id
        return Token(name, track, self.now_us(), ident)

    def end(self, token: Token | None, **args: Any) -> None:
        if token is None:
            return
        self._async(token.name, token.track, token.ident, token.start_us, self.now_us(), args)

    def interval(self, name: str, track: Track, start_ns: int, end_ns: int, **args: Any) -> None:
        """An async span between two time.monotonic_ns() readings taken elsewhere (an I/O request's submit
        and completion, stamped by the engine's threads)."""
        if not self.enabled:
            return
        with self._lock:
            self._next_id += 1
            ident = self._next_id
        self._async(name, track, ident, self.us(start_ns), self.us(end_ns), args)

    def complete(self, name: str, track: Track, start_us: float, **args: Any) -> None:
        """A span on the calling thread's row from start_us (a now_us() reading) to now."""
        if self.enabled:
            self._add({"name": name, "cat": track.value, "ph": "X", "ts": start_us, "dur": self.now_us() - start_us,
                       "pid": os.getpid(), "tid": f"{track.value} {threading.current_thread().name}",
                       "args": args})

    def _async(self, name: str, track: Track, ident: int, start_us: float, end_us: float,
               args: dict[str, Any]) -> None:
        common = {"name": name, "cat": track.value, "id": ident, "pid": os.getpid(), "tid": track.value}
        self._add({**common, "ph": "b", "ts": start_us})
        self._add({**common, "ph": "e", "ts": end_us, "args": args})

    def mark(self, name: str, **args: Any) -> None:
        """An instant event (a step boundary, a trace invalidation)."""
        if self.enabled:
            self._add({"name": name, "ph": "i", "s": "p", "ts": self.now_us(), "pid": os.getpid(),
                       "tid": "marks", "args": args})

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    def clear(self) -> None:
        with self._lock:
            self._events.clear()

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Writes the Chrome trace event JSON; returns the path."""
        out = Path(path)
        out.write_text(json.dumps({"traceEvents": self.events(), "displayTimeUnit": "ms"}))
        return out

    def _add(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._events.append(event)


NO_TIMELINE = Timeline(enabled=False)

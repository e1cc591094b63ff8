"""A timeline of spans (compute, I/O, optimizer) per thread, written as Chrome/Perfetto trace events.

    timeline = Timeline()
    with timeline.span("forward blocks.0", Track.COMPUTE):
        ...
    token = timeline.begin("read param/blocks.0.up.weight", Track.IO)   # an async span: ends elsewhere
    timeline.end(token)
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
        self._origin = time.perf_counter()

    def now_us(self) -> float:
        return (time.perf_counter() - self._origin) * 1e6

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
            self._add({"name": name, "cat": track.value, "ph": "X", "ts": start, "dur": self.now_us() - start,
                       "pid": os.getpid(), "tid": f"{track.value} {threading.current_thread().name}",
                       "args": args})

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
        common = {"name": token.name, "cat": token.track.value, "id": token.ident, "pid": os.getpid(),
                  "tid": token.track.value}
        self._add({**common, "ph": "b", "ts": token.start_us})
        self._add({**common, "ph": "e", "ts": self.now_us(), "args": args})

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

"""A progress bar for long sweeps, drawn on a stream the caller gives (the CLI gives stderr)."""
from __future__ import annotations

import enum
import time
from typing import TextIO

WIDTH = 30


class Cadence(enum.Enum):
    """How often a bar off a terminal writes a line (on a terminal it redraws at every advance)."""

    TENTHS = "tenths"  # at every tenth of the way: long sweeps
    EVERY = "every"  # at every advance: training steps, each worth reading


class ProgressBar:
    """[#######.......]  7/18  0:09  write block 1M qd 8 threads 2

    On a terminal the line is redrawn in place; elsewhere (a log file, CI) a line is written at
    every tenth of the way, so logs stay readable."""

    def __init__(self, total: int, stream: TextIO, cadence: Cadence = Cadence.TENTHS):
        self.total, self.stream, self.cadence = max(total, 1), stream, cadence
        self.done = 0
        self._start = time.monotonic()
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last_tenth = -1
        self._width = 0

    def advance(self, label: str = "") -> None:
        self.done = min(self.done + 1, self.total)
        line = self._line(label)
        if self._tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = max(self._width, len(line))
        elif self.cadence is Cadence.EVERY or self.done * 10 // self.total != self._last_tenth:
            self._last_tenth = self.done * 10 // self.total
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the bar's line, so what is printed next starts on its own."""
        if self._tty and self.done:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, label: str) -> str:
        filled = WIDTH * self.done // self.total
        elapsed = int(time.monotonic() - self._start)
        return (f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done:>{len(str(self.total))}}/{self.total} "
                f"{elapsed // 60}:{elapsed % 60:02d}  {label}")

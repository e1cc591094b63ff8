"""Ctrl-C that stops a sweep between runs, never inside one.

[Note: why the interrupt is deferred]
A KeyboardInterrupt raised while a future is being waited on is kept by the future as its outcome, so
the native request is never released and the future raises it again when collected (an "Exception
ignored" traceback).  Stopping at the next run boundary costs at most one run (well under a second at
1G on a fast drive), and a second Ctrl-C still stops at once; either way the sweep's finally blocks
close the handle (which waits for transfers in flight) and remove the bench file.
"""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Callable

log = logging.getLogger("infinity.bench")


class DeferredInterrupt:
    """Within `with`, the first SIGINT only sets a flag that check() turns into KeyboardInterrupt;
    the second raises at once.  Outside the main thread it does nothing (signals go to the main thread)."""

    def __init__(self, on_first: Callable[[], None] | None = None):
        self.requested = False
        self._on_first = on_first
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def check(self) -> None:
        """Raises KeyboardInterrupt when Ctrl-C was pressed since entering."""
        if self.requested:
            raise KeyboardInterrupt

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.debug("SIGINT: stopping after the run in progress")
        if self._on_first is not None:
            self._on_first()

"""Ctrl-C (SIGINT) or SIGTERM that stops a sweep between runs, never inside one.

[Note: why the interrupt is deferred]
A KeyboardInterrupt raised while a future is being waited on is kept by the future as its outcome, so
the native request is never released and the future raises it again when collected (an "Exception
ignored" traceback).  Stopping at the next run boundary costs at most one run (well under a second at
1G on a fast drive), and a second signal still stops at once; either way the sweep's finally blocks
close the handle (which waits for transfers in flight) and remove the bench file.  SIGTERM (what
`timeout`, systemd, Kubernetes and Slurm send) is treated as Ctrl-C: without a handler it would end
the process at once and leave the bench file (1 GB at the default --io_size) behind for good.
"""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Callable

from infinity.errors import Interrupted

log = logging.getLogger("infinity.bench")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DeferredInterrupt:
    """Within `with`, the first SIGINT or SIGTERM only records the signal, which check() turns into
    Interrupted (a KeyboardInterrupt); the second raises at once.  Outside the main thread it does nothing
    (signals go to the main thread)."""

    def __init__(self, on_first: Callable[[int], None] | None = None):
        self.signum: int | None = None
        self._on_first = on_first
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def check(self) -> None:
        """Raises Interrupted when a signal came since entering."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        log.debug("%s: stopping after the run in progress", signal.Signals(signum).name)
        if self._on_first is not None:
            self._on_first(signum)

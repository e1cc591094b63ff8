"""SIGINT and SIGTERM in the command line tools: stop, clean up, say so in one line, exit 130 or 143.

    with raise_on_signals(PROG):
        ...                       # the first SIGINT or SIGTERM raises errors.Interrupted here
    # main: except Interrupted as stop: print(one line); return stop.exit_code

[Note: the first signal stops, later ones wait]  The first signal raises Interrupted (a KeyboardInterrupt)
in the main thread, so the same finally blocks run as for Ctrl-C: the engine closes and removes its
swap files, the bench removes its file.  A second signal during that cleanup is ignored (with a line
saying so), since raising again inside a finally block would leave the files half removed; SIGKILL
still ends the process at once, and the next run removes what it left (the run lock says it is dead).
Without a handler SIGTERM, what `timeout`, systemd, Kubernetes and Slurm send, would end the process
with no cleanup at all.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Iterator

from infinity.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def raise_on_signals(prog: str) -> Iterator[None]:
    """Within: the first SIGINT or SIGTERM raises Interrupted; later ones are ignored until the end of the
    block (see the note).  Outside the main thread, changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        if raised:
            print(f"{prog}: {signal.Signals(signum).name} again: still removing this run's files; SIGKILL "
                  "stops at once (the next run removes what is left)", file=sys.stderr)
            return
        raised.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_forwarding_signals(command: list[str]) -> tuple[int, Interrupted | None]:
    """Runs command (torchrun, say) as a child and waits; a SIGINT or SIGTERM sent to this process is sent on
    to the child, which stops its own children and cleans up.  The child's exit status, and the signal that
    stopped it, if one did."""
    child = subprocess.Popen(command)
    stopped: Interrupted | None = None
    while True:
        try:
            with raise_on_signals("infinity-train"):
                return child.wait(), stopped
        except KeyboardInterrupt as stop:
            stopped = as_interrupted(stop)
            child.send_signal(stopped.signum)


def as_interrupted(stop: KeyboardInterrupt) -> Interrupted:
    """stop itself when a signal raised it, else (a KeyboardInterrupt raised some other way) as SIGINT."""
    return stop if isinstance(stop, Interrupted) else Interrupted(signal.SIGINT)


def swap_folders_left(nvme_paths: list[str]) -> list[Path]:
    """This process's run folders still under the given nvme_paths (none once its engines have closed)."""
    return [run for path in nvme_paths for run in Path(path).glob(f"infinity-swap/rank-*/run-{os.getpid()}-*")]


def train_stopped(stop: Interrupted, nvme_paths: list[str]) -> str:
    """infinity-train's one line: what the signal interrupted, and what was removed."""
    left = swap_folders_left(nvme_paths)
    if left:
        removed = (f"its swap folders could not all be removed ({', '.join(map(str, left))}); the next run on that "
                   "nvme_path removes them")
    elif nvme_paths:
        removed = f"its swap files under {', '.join(sorted(set(nvme_paths)))} were removed"
    else:
        removed = "it had no swap files"
    return f"{stop.during or 'the run'} was interrupted by {stop.signal_name}; {removed}"

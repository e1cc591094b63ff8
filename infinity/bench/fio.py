"""fio with the settings of one of ours, as the reference figure beside each result.

[Note: how a setting maps onto fio]
block_size → --bs, queue_depth → --iodepth, thread_count → --numjobs, each job on its own 1/numjobs slice
of the same file (--size and --offset_increment), which is how our engine splits one request over its
threads.  --direct=1 and --ioengine=libaio as ours; iodepth_batch_submit/complete are left at fio's
defaults.  single_submit and overlap_events have no fio equivalent.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess

from infinity.config.aio import DIRECT_ALIGNMENT, AioConfig
from infinity.errors import InfinityError
from infinity.io.align import round_down
from infinity.io.handle import Op

log = logging.getLogger("infinity.bench")

FIO_TIMEOUT_S = 300


class FioError(InfinityError):
    """fio ran but gave no figure; carries the command and what fio said."""

    def __init__(self, command: list[str], message: str):
        self.command = command
        super().__init__(f"fio failed: {message} (command: {' '.join(command)})")


def fio_binary() -> str | None:
    """The fio on PATH, or None."""
    return shutil.which("fio")


def fio_command(fio: str, setting: AioConfig, op: Op, path: str, io_size: int) -> list[str]:
    jobs = setting.thread_count
    share = max(round_down(io_size // jobs, DIRECT_ALIGNMENT), DIRECT_ALIGNMENT)
    return [fio, "--name=infinity-bench", f"--filename={path}", f"--rw={op.name.lower()}",
            f"--bs={setting.block_size}", f"--iodepth={setting.queue_depth}", f"--numjobs={jobs}",
            f"--size={share}", f"--offset_increment={share}", "--direct=1", "--ioengine=libaio",
            "--group_reporting", "--output-format=json"]


def run_fio(fio: str, setting: AioConfig, op: Op, path: str, io_size: int) -> float:
    """fio's GB/s (1e9 bytes per second) for one setting and operation on path."""
    command = fio_command(fio, setting, op, path, io_size)
    log.debug("running %s", " ".join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=FIO_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FioError(command, str(err)) from None
    if done.returncode != 0:
        raise FioError(command, f"exit status {done.returncode}: {_tail(done.stderr or done.stdout)}")
    return parse_fio_json(done.stdout, op, command)


def parse_fio_json(text: str, op: Op, command: list[str] | None = None) -> float:
    """GB/s of `op` in fio's --output-format=json --group_reporting output (one job entry: the group)."""
    start = text.find("{")  # fio may print notes before the JSON
    try:
        report = json.loads(text[start:]) if start >= 0 else None
        bw_bytes = float(report["jobs"][0][op.name.lower()]["bw_bytes"])  # type: ignore[index]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise FioError(command or ["fio"], f"cannot read its JSON ({err!r}): {_tail(text)}") from None
    if bw_bytes <= 0:
        raise FioError(command or ["fio"], f"it reported {bw_bytes} bytes/s")
    return bw_bytes / 1e9


def _tail(text: str, limit: int = 300) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]

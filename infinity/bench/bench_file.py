"""The one file a sweep reads and writes: <nvme_path>/infinity-bench-<pid>-<random>.dat, made new and
locked for the sweep's life.

[Note: never an existing name]  The folder is the user's, and may be shared (a node's /local_nvme).  A
name that can be guessed (the PID) and opened with O_CREAT alone would follow a symlink planted there
and overwrite its target with --io_size random bytes.  So the file gets a random name and is created
with O_EXCL | O_NOFOLLOW (Access.NEW): an existing name is never opened.  It is flock-ed while the sweep
runs, so a later sweep removes the files of sweeps that were killed (SIGKILL, OOM) and leaves those of
live ones alone, whatever their PIDs; only regular files of this user are ever removed.
"""
from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from dataclasses import dataclass

from infinity.errors import AioError
from infinity.io import Access, AioFile, open_file
from infinity.io.lock import Liveness, RunLock, claim

log = logging.getLogger("infinity.bench")

FILE_PREFIX, FILE_SUFFIX = "infinity-bench-", ".dat"
_TRIES = 16


@dataclass
class BenchFile:
    """The open bench file and its lock; close() closes both and removes the file."""

    file: AioFile
    lock: RunLock

    @property
    def path(self) -> str:
        return self.file.path

    def close(self) -> None:
        self.file.close()
        self.lock.release()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("could not remove the bench file %s: %s; remove it by hand", self.path, err)


def create_bench_file(folder: str) -> BenchFile:
    """A new bench file in folder, locked; first removes the files of sweeps that died."""
    remove_dead_bench_files(folder)
    for _ in range(_TRIES):
        path = os.path.join(folder, f"{FILE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{FILE_SUFFIX}")
        try:
            file = open_file(path, Access.NEW)
        except AioError as err:
            if err.errno == errno.EEXIST:  # that name is taken: draw another
                continue
            raise
        lock = RunLock.try_hold_new(os.dup(file.buffered_fd), path)
        if lock is not None:
            return BenchFile(file, lock)
        file.close()  # a clean-up starting now took it; draw another name
    raise AioError(errno.EEXIST, "create", folder, 0, 0,
                   fix=f"{_TRIES} new bench files in a row were taken or removed by other infinity-bench runs "
                       "starting in this folder: run the sweeps one after another")


def remove_dead_bench_files(folder: str) -> list[str]:
    """Removes this user's infinity-bench-*.dat files whose lock nobody holds; returns their paths."""
    removed = []
    for name in sorted(os.listdir(folder)):
        if not (name.startswith(FILE_PREFIX) and name.endswith(FILE_SUFFIX)):
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # another sweep starting now removed it first
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            continue
        liveness, lock = claim(path)
        try:
            if liveness is Liveness.DEAD and _unlink(path):
                log.warning("removed %s, left by an infinity-bench that did not finish", path)
                removed.append(path)
        finally:
            if lock is not None:
                lock.release()
    return removed


def _unlink(path: str) -> bool:
    """Removes path; False when another sweep starting now removed it first."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True

"""A lock held for a run's whole life, which tells live runs from dead ones without trusting PIDs.

    lock = RunLock.create(folder / "lock")       # flock(LOCK_EX) on a new file, held until release()
    liveness, taken = claim(other / "lock")      # LIVE, DEAD (taken: its lock, now ours) or NO_LOCK

[Note: why not the PID]  A PID names a process only while it lives: in a container the trainer is
PID 1 at every restart, two containers sharing one folder have the same PIDs, and a dead run's PID is
soon someone else's.  An flock belongs to an open file, and the kernel drops it when the last
descriptor of that file closes, a SIGKILL or an OOM kill included.  So "someone holds the lock" is
exactly "the run is alive", whatever the PIDs say, and also within one process: a second open of the
file (another engine of the same process) cannot take a lock that the first holds.

Lock files are opened with O_NOFOLLOW and created with O_EXCL: a symlink planted at the name is
never followed.  Descriptors are O_CLOEXEC, so a program the run starts (fio, say) does not keep its
lock alive after the run.
"""
from __future__ import annotations

import enum
import errno
import fcntl
import os

from infinity.errors import InfinityError

LOCK_MODE = 0o600


class Liveness(enum.Enum):
    """What a lock file says of the run it belongs to."""

    LIVE = "live"  # a process holds the lock
    DEAD = "dead"  # the file is there and nobody holds its lock: the run ended without cleaning up
    NO_LOCK = "no lock"  # no lock file (a folder being made, or one of an infinity without locks)


class RunLock:
    """An flock(LOCK_EX) held on an open file until release() (or the end of the process)."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> "RunLock | None":
        """Creates path (mode 0600; an existing name is refused, never followed) and locks it; None when a
        clean-up starting at that moment took the new file first (see the note on made-then-locked)."""
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, LOCK_MODE)
        except OSError as err:
            raise InfinityError(f"cannot create the run lock {path}: {err.strerror}; infinity creates it in a "
                                "folder of its own and never reuses a name") from None
        return cls.try_hold_new(fd, path)

    @classmethod
    def try_hold_new(cls, fd: int, path: str) -> "RunLock | None":
        """The lock of a file just made at path, or None (fd closed) when a clean-up took it first.

        [Note: made, then locked]  Between the open that creates a file and its flock the file is
        unlocked, and a clean-up starting in the same folder at that moment judges it dead: it takes the
        lock (ours then fails) or removes the name (ours then locks a file that has no name any more).
        Either way the name is lost and the caller makes another.  Once the lock is held and the name
        still names the locked file, no clean-up can take it: claim() removes only what it has locked,
        and checks the name after locking.
        """
        lock = cls.try_hold(fd, path)
        if lock is not None and lock.names_this_file():
            return lock
        if lock is not None:
            lock.release()
        return None

    @classmethod
    def try_hold(cls, fd: int, path: str) -> "RunLock | None":
        """Locks fd for the run's life if nobody else holds it; else closes fd and returns None."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as err:
            os.close(fd)
            raise InfinityError(f"cannot lock {path}: {err.strerror}") from None
        return cls(fd, path)

    def names_this_file(self) -> bool:
        """Whether self.path still names the file whose lock is held (not removed, not replaced)."""
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(self.fd)
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def release(self) -> None:
        """Drops the lock and closes the file (idempotent)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)  # closing the last descriptor drops the flock


def claim(path: str | os.PathLike[str]) -> tuple[Liveness, RunLock | None]:
    """Whether the run whose lock file is path lives; for a DEAD one, its lock, now held by the caller (so
    that two processes cleaning up at once never both remove the same folder).  Release it when done."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        return (Liveness.NO_LOCK if err.errno in (errno.ENOENT, errno.ENOTDIR) else Liveness.LIVE), None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EWOULDBLOCK: held by a live run; anything else: not ours to judge, so left alone
        os.close(fd)
        return Liveness.LIVE, None
    lock = RunLock(fd, path)
    if not lock.names_this_file():  # removed (another clean-up) or made anew since our open
        lock.release()
        return Liveness.NO_LOCK, None
    return Liveness.DEAD, lock

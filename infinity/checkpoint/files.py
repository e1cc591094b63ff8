"""Durable file operations: a temporary name, fsync, an atomic rename, and an fsync of the folder.

[Note: why each step]  rename() is atomic, so a reader sees the old file or the new one, never half
of one; fsync of the file before the rename makes sure the name never points at bytes still only in
the page cache (after a power cut a renamed but unsynced file can come back empty); fsync of the
folder makes the rename itself durable.  A process killed at any point leaves at worst a
".<name>.tmp-<pid>" file behind, in the hidden folder a save writes into (saving_dir), which no reader
looks at and the next save of that tag removes whole (remove_leftovers).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from pathlib import Path

from infinity.checkpoint.format import LATEST, FileEntry, new_checksum
from infinity.errors import CheckpointError, ShortTransferError

log = logging.getLogger("infinity.checkpoint")

TEMP_MARK = ".tmp-"


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}")


def commit(temp: Path, final: Path, fd: int) -> None:
    """Makes temp's bytes durable (fd: an open descriptor of it) and renames it to final atomically."""
    os.fsync(fd)
    os.replace(temp, final)


def write_failure(path: Path, err: BaseException, what: str = "save_dir") -> CheckpointError:
    """A failure to write path (an OSError, or torch.save's RuntimeError) as a CheckpointError naming the
    path and the cause, with the fix that fits the cause (a full drive is looked for too: a short write,
    or torch.save's "[enforce fail ...] file write failed", does not say so)."""
    code = getattr(err, "errno", None)
    cause = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})" if code else str(err).splitlines()[0]
    if isinstance(err, ShortTransferError):  # the file system took part: a full drive, or one of its limits
        cause, code = cause + f", a short write: {err.actual} of {err.expected} bytes", errno.ENOSPC
    elif code not in (errno.ENOSPC, errno.EDQUOT) and drive_full(path):
        cause, code = cause + "; its drive is full", errno.ENOSPC
    fixes = {errno.ENOSPC: f"free space on its drive, or choose another {what}",
             errno.EDQUOT: f"raise the disk quota, or choose another {what}",
             errno.EROFS: f"the file system is read-only: choose another {what}",
             errno.EACCES: f"make the folder writable for this user, or choose another {what}",
             errno.EPERM: f"make the folder writable for this user, or choose another {what}"}
    return CheckpointError(str(getattr(err, "path", None) or getattr(err, "filename", None) or path),
                           f"cannot be written: {cause}", fixes.get(code, f"check {what} and its drive"))


def drive_full(path: Path) -> bool:
    """Whether the file system of path's nearest existing folder has no free blocks left."""
    folder = path
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(folder: Path) -> None:
    """Creates folder and its missing parents, each new entry made durable in its parent."""
    missing = []
    path = folder
    while not path.exists():
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)  # another rank may create the shared tag folder at the same time
        fsync_dir(path.parent)


SAVING, OLD = ".saving", ".old"  # suffixes of a rank folder being written, and of one being replaced
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def saving_dir(final: Path) -> Path:
    """Where a save writes final's files before exchange_in puts them at final (hidden: no reader looks)."""
    return final.with_name(f".{final.name}{SAVING}")


def exchange_in(new: Path, final: Path) -> None:
    """Puts the complete folder new at final, durably; a folder already at final (an earlier save of the
    same tag) is replaced and removed.

    [Note: exchanged, not replaced]  rename() cannot replace a folder that holds files, so an earlier
    save's folder is swapped with the new one in one step (renameat2 with RENAME_EXCHANGE: final names
    the old folder or the new one, never nothing) and then removed.  Where the kernel or the file system
    cannot exchange, the old folder is renamed aside first: a kill between the two renames leaves final
    missing and the old folder beside it as `.<name>.old`."""
    if not final.exists():
        os.rename(new, final)
        fsync_dir(final.parent)
        return
    if _exchange(new, final):
        old = new  # which now names the earlier save's folder
    else:
        old = final.with_name(f".{final.name}{OLD}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps the names a and b atomically; False where renameat2's RENAME_EXCHANGE is not to be had."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def remove_leftovers(final: Path) -> None:
    """Removes what an interrupted save of final left beside it (its folder being written or replaced)."""
    for stale in (saving_dir(final), final.with_name(f".{final.name}{OLD}")):
        if stale.exists():
            shutil.rmtree(stale)
            log.info("removed %s, left by a save that did not finish", stale)


def write_bytes(folder: Path, name: str, data: bytes) -> FileEntry:
    """Writes data to folder/name durably (no folder fsync: the caller does it once at the end)."""
    final = folder / name
    temp = temp_path(final)
    temp.unlink(missing_ok=True)  # a killed save's, or a planted symlink: removed, and the new one never follows one
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        commit(temp, final, fd)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    digest = new_checksum()
    digest.update(data)
    return FileEntry(name, len(data), digest.hexdigest())


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """Points CKPT_DIR/latest at tag, durably (the last step of a save)."""
    write_bytes(ckpt_dir, LATEST, f"{tag}\n".encode())
    fsync_dir(ckpt_dir)

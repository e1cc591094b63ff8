"""Durable file operations: a temporary name, fsync, an atomic rename, and an fsync of the folder.

[Note: why each step]  rename() is atomic, so a reader sees the old file or the new one, never half
of one; fsync of the file before the rename makes sure the name never points at bytes still only in
the page cache (after a power cut a renamed but unsynced file can come back empty); fsync of the
folder makes the rename itself durable.  A process killed at any point leaves at worst a
".<name>.tmp-<pid>" file behind, which no reader looks at and the next save of that folder removes.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from infinity.checkpoint.format import LATEST, FileEntry, new_checksum

log = logging.getLogger("infinity.checkpoint")

TEMP_MARK = ".tmp-"


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}")


def commit(temp: Path, final: Path, fd: int) -> None:
    """Makes temp's bytes durable (fd: an open descriptor of it) and renames it to final atomically."""
    os.fsync(fd)
    os.replace(temp, final)


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


def remove_temporaries(folder: Path) -> None:
    """Removes temporary files an earlier, interrupted save left in folder."""
    for stale in folder.glob(f".*{TEMP_MARK}*"):
        stale.unlink(missing_ok=True)
        log.info("removed %s, left by a save that did not finish", stale)


def write_bytes(folder: Path, name: str, data: bytes) -> FileEntry:
    """Writes data to folder/name durably (no folder fsync: the caller does it once at the end)."""
    final = folder / name
    temp = temp_path(final)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
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

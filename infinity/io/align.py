"""Alignment maths for O_DIRECT, in one place."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ALIGNMENT = 4096


def round_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def round_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


def is_aligned(value: int, alignment: int) -> bool:
    return value % alignment == 0


def block_device_name(path: str | os.PathLike[str]) -> str | None:
    """The kernel's name (as in /proc/diskstats) of the block device holding path, if it has one."""
    dev = os.stat(path).st_dev
    link = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    try:
        return link.resolve(strict=True).name  # strict: a file system with no block device has no such link
    except OSError:
        return None


def logical_block_size(path: str | os.PathLike[str] | int) -> int:
    """The logical block size O_DIRECT needs for files under path, or for the open file descriptor path
    (4096 when it cannot be read)."""
    dev = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    # A partition's queue/ lives on its parent disk.
    for queue in (base / "queue", base / ".." / "queue"):
        try:
            size = int((queue / "logical_block_size").read_text())
        except (OSError, ValueError):
            continue
        if size > 0 and size & (size - 1) == 0:
            return size
    return DEFAULT_ALIGNMENT

"""What the block device itself moved, from /proc/diskstats: the proof that a run bypassed the page cache.

[Note: why the tuner reads device counters]
A tuner that times reads served from the page cache reports memory bandwidth, not the drive's, and picks
settings for a disk it never measured; it is the best-known failure of DeepSpeed's aio tuner.  O_DIRECT
should make every requested byte cross the device, so device bytes / requested bytes should be about 1.
Below 1, part of the run came from (or stayed in) memory.  Above 1, something else used the same device.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from infinity.io.align import block_device_name

log = logging.getLogger("infinity.bench")

DISKSTATS = "/proc/diskstats"
SECTOR_BYTES = 512  # /proc/diskstats counts 512-byte sectors whatever the device's block size


@dataclass(frozen=True)
class DiskCounters:
    """Cumulative sectors one device has read and written since boot."""

    sectors_read: int
    sectors_written: int

    @property
    def bytes_read(self) -> int:
        return self.sectors_read * SECTOR_BYTES

    @property
    def bytes_written(self) -> int:
        return self.sectors_written * SECTOR_BYTES


def parse_diskstats(text: str) -> dict[str, DiskCounters]:
    """Counters by device name from the text of /proc/diskstats (fields 3, 6 and 10: name,
    sectors read, sectors written).  Lines too short to hold them are skipped."""
    out: dict[str, DiskCounters] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            out[fields[2]] = DiskCounters(int(fields[5]), int(fields[9]))
        except ValueError:
            log.debug("skipping an unreadable line of %s: %r", DISKSTATS, line)
    return out


@dataclass(frozen=True)
class DiskProbe:
    """The block device under a folder, or why there is none (device is None, reason says why)."""

    device: str | None
    reason: str = ""
    source: str = DISKSTATS

    @classmethod
    def for_path(cls, path: str | os.PathLike[str], source: str = DISKSTATS) -> "DiskProbe":
        name = block_device_name(path)
        try:
            known = parse_diskstats(Path(source).read_text())
        except OSError as err:
            return cls(None, f"{source} cannot be read ({err.strerror})", source)
        # [Note: a file system with no block device (tmpfs, overlay, NFS) gives None; a device that
        # /proc/diskstats does not list (some btrfs subvolume devices) has no counters to read either.]
        if name is None or name not in known:
            return cls(None, f"{os.fspath(path)!r} is on no block device listed in {source} (tmpfs, overlay, "
                             "btrfs or a network file system?), so device bytes cannot be counted and nothing "
                             "shows that the figures are the drive's rather than memory's", source)
        return cls(name, "", source)

    def snapshot(self) -> DiskCounters | None:
        """The device's counters now; None without a device or when they cannot be read."""
        if self.device is None:
            return None
        try:
            return parse_diskstats(Path(self.source).read_text()).get(self.device)
        except OSError as err:
            log.debug("cannot read %s: %s", self.source, err)
            return None


def device_bytes(before: DiskCounters | None, after: DiskCounters | None, reading: bool) -> int | None:
    """Bytes the device read (or wrote) between two snapshots; None when either is missing."""
    if before is None or after is None:
        return None
    return after.bytes_read - before.bytes_read if reading else after.bytes_written - before.bytes_written

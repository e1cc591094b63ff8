"""Swap files on NVMe: key -> aligned extent of a region file, in a per-run, per-rank folder.

Layout: <nvme_path>/infinity-swap/rank-<rank>/run-<pid>/<region>.swp, folders 0700, files 0600.
Each region (say "param" or "optimizer") is one file; extents are laid end to end, each starting on
an ALIGNMENT boundary so every transfer of a whole extent can use O_DIRECT.  The run folder is
removed at close; folders of runs whose process is gone are removed when the next store opens.

[Note: the files stay open for the run]
Each region file is opened once, when its first extent is laid out, and every transfer goes through
that open file (`file`), never through its path again.  So a run whose folder is deleted under it
(rm -rf of nvme_path, or a cleanup from another pid namespace that took it for a dead run) keeps
reading and writing the same inodes, which Linux keeps until the last descriptor closes: training
goes on with correct values, and the space comes back at close.  Reopening by path instead would fail
with ENOENT at best and, with O_CREAT, write into a new empty file whose holes read back as zeros.
`deleted` says which files lost their names, so the engine can say so once.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from infinity import metrics
from infinity.errors import CapacityError, InfinityError
from infinity.io.align import DEFAULT_ALIGNMENT, round_up
from infinity.io.files import Access, AioFile, check_nvme_path, open_file

log = logging.getLogger("infinity.memory")

ALIGNMENT = DEFAULT_ALIGNMENT
SWAP_DIR = "infinity-swap"


@dataclass(frozen=True)
class Extent:
    """nbytes of data at offset in path; capacity is nbytes rounded up to the alignment."""

    path: str
    offset: int
    nbytes: int
    capacity: int


def whole_blocks(nbytes: int) -> int:
    """The bytes nbytes of data take in a swap file, and so in any host buffer that moves them: rounded up
    to whole ALIGNMENT blocks.  [Note: one rule for extents and buffers]  Transfers of an extent move
    its whole blocks (O_DIRECT, and see MemoryManager._host_bytes); a buffer sized from the data alone
    would be a few bytes short for every size that is not a multiple of the block."""
    return round_up(nbytes, ALIGNMENT)


class NvmeStore:
    def __init__(self, nvme_path: str | os.PathLike[str], rank: int = 0, key: str = "nvme_path"):
        root = Path(check_nvme_path(nvme_path, key=key))
        self.rank_dir = root / SWAP_DIR / f"rank-{rank}"
        self.rank_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_dead_runs(self.rank_dir)
        self.folder = self.rank_dir / f"run-{os.getpid()}"
        self.folder.mkdir(mode=0o700)
        self._extents: dict[str, Extent] = {}
        self._ends: dict[str, int] = {}  # region -> bytes laid out so far
        self._files: dict[str, AioFile] = {}  # path -> the open region file (see the note above)
        self.key = key
        self._reported_deleted = False
        metrics.watch(self, metrics.read_store)  # swap bytes laid out: the nvme tier's capacity

    def allocate(self, key: str, nbytes: int, region: str = "param") -> Extent:
        """Lays out an extent for key at the end of region's file (sizes are fixed once allocated)."""
        if key in self._extents:
            raise InfinityError(f"swap extent {key!r} is already allocated")
        path = str(self.folder / f"{region}.swp")
        if region not in self._ends:
            self._files[path] = open_file(path, Access.READ_WRITE)  # created 0600
            self._files[path].label = region  # metrics count its transfers by the kind of data it holds
            self._ends[region] = 0
        extent = Extent(path, self._ends[region], nbytes, whole_blocks(nbytes))
        self._ends[region] += extent.capacity
        self._extents[key] = extent
        return extent

    def extent(self, key: str) -> Extent:
        try:
            return self._extents[key]
        except KeyError:
            raise InfinityError(f"no swap extent for {key!r}; it was never allocated") from None

    def extents(self, region: str) -> list[tuple[str, Extent]]:
        """(key, extent) of region's file, in file order."""
        path = str(self.folder / f"{region}.swp")
        return sorted(((k, e) for k, e in self._extents.items() if e.path == path), key=lambda item: item[1].offset)

    def file(self, extent: Extent) -> AioFile:
        """The open file extent lives in: transfers use it, never the path (see the note above)."""
        return self._files[extent.path]

    def deleted(self) -> list[str]:
        """Region files of this run that no longer have a name (their folder or they were removed)."""
        return [path for path, f in self._files.items() if not f.closed and os.fstat(f.buffered_fd).st_nlink == 0]

    def warn_if_deleted(self) -> bool:
        """Logs once, naming the folder, when this run's swap files were deleted under it; True if they were."""
        gone = self.deleted()
        if gone and not self._reported_deleted:
            self._reported_deleted = True
            log.warning("the swap files of this run under %s were deleted while it runs (%s); training goes on "
                        "with the files it holds open, and their space comes back only when the run ends "
                        "(engine.close() or process exit)", self.folder, ", ".join(os.path.basename(p) for p in gone))
        return bool(gone)

    @property
    def planned_bytes(self) -> int:
        return sum(self._ends.values())

    def reserve(self) -> None:
        """Checks that the drive has room for every extent laid out, then reserves it (fallocate)."""
        st = os.statvfs(self.folder)
        used = sum(os.stat(p).st_blocks * 512 for p in self.folder.iterdir())
        free = st.f_bavail * st.f_frsize + used
        if free < self.planned_bytes:
            raise CapacityError(f"swap files under {str(self.folder)!r}", self.planned_bytes, free,
                                f"free space or point {self.key} at a larger drive")
        for region, end in self._ends.items():
            os.posix_fallocate(self._files[str(self.folder / f"{region}.swp")].buffered_fd, 0, end)

    def close(self) -> None:
        """Closes and removes this run's swap files (already removed ones are fine)."""
        metrics.unwatch(self)
        for f in self._files.values():
            f.close()
        self._files.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        self._extents.clear()
        self._ends.clear()

    def __enter__(self) -> "NvmeStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_dead_runs(rank_dir: Path) -> list[Path]:
    """Removes run-<pid> folders whose process no longer exists; returns what it removed."""
    removed = []
    for run in rank_dir.glob("run-*"):
        try:
            pid = int(run.name.split("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(run, ignore_errors=True)
            log.info("removed swap files of an earlier run that did not exit cleanly: %s", run)
            removed.append(run)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True

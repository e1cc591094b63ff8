"""Swap files on NVMe: key -> aligned extent of a region file, in a per-run, per-rank folder.

Layout: <nvme_path>/infinity-swap/rank-<rank>/run-<pid>-<random>/<region>.swp, folders 0700, files 0600.
Each region (say "param" or "optimizer") is one file; extents are laid end to end, each starting on
an ALIGNMENT boundary so every transfer of a whole extent can use O_DIRECT.  The run folder is
removed at close; folders of dead runs are removed when the next store opens.

[Note: live or dead, by a lock]  Each run folder holds a file `lock` whose flock the store holds for
its life (infinity/io/lock.py): a folder whose lock nobody holds is a dead run's, whatever its PID,
so a restarted container whose trainer is PID 1 again, two containers sharing one nvme_path, and two
engines in one process (a student and a frozen reference model) each get a folder of their own and
never take a live one for dead.  A folder is made under a hidden name (.new-run-...) and renamed to
run-... only once its lock is held, so a scan never sees a live run's folder without its lock.  The
folders infinity makes are fresh (mkdtemp: O_EXCL semantics, 0700) and every file in them is created
with O_EXCL | O_NOFOLLOW; infinity-swap and rank-<rank> must be real folders owned by this user.

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
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from infinity import metrics
from infinity.errors import CapacityError, InfinityError, NvmePathError
from infinity.io.align import DEFAULT_ALIGNMENT, round_up
from infinity.io.files import Access, AioFile, check_nvme_path, open_file, punch_hole
from infinity.io.lock import Liveness, RunLock, claim

log = logging.getLogger("infinity.memory")

ALIGNMENT = DEFAULT_ALIGNMENT
SWAP_DIR = "infinity-swap"
LOCK_FILE = "lock"
_TRIES = 16  # new run folders lost in a row to other runs' clean-up before giving up
RUN_PREFIX, NEW_PREFIX = "run-", ".new-run-"  # a run's folder, and the same while it is being made
_LEGACY_RUN = re.compile(r"run-(\d+)$")  # run-<pid>: the folders of an infinity without run locks


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
        self.rank_dir = own_folder(own_folder(root / SWAP_DIR, key) / f"rank-{rank}", key)
        remove_dead_runs(self.rank_dir)
        self.folder, self._lock = new_run_folder(self.rank_dir)
        self._extents: dict[str, Extent] = {}
        self._ends: dict[str, int] = {}  # region -> bytes laid out so far
        self._files: dict[str, AioFile] = {}  # path -> the open region file (see the note above)
        self._labelled: dict[tuple[str, str], AioFile] = {}  # (path, label) -> the same, labelled otherwise
        self.key = key
        self._reported_deleted = False
        metrics.watch(self, metrics.read_store)  # swap bytes laid out: the nvme tier's capacity

    def allocate(self, key: str, nbytes: int, region: str = "param") -> Extent:
        """Lays out an extent for key at the end of region's file (sizes are fixed once allocated)."""
        if key in self._extents:
            raise InfinityError(f"swap extent {key!r} is already allocated")
        path = str(self.folder / f"{region}.swp")
        if region not in self._ends:
            self._files[path] = open_file(path, Access.NEW)  # created 0600, in this run's own fresh folder
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

    def labelled(self, extent: Extent, label: str) -> AioFile:
        """extent's open file under another metrics label: the same descriptors, for transfers of data of
        another kind than the region's (a parameter's range of the master file, memory/views.py).  The
        store closes the descriptors once, through its own file."""
        f = self.file(extent)
        if f.label == label:
            return f
        if (extent.path, label) not in self._labelled:
            self._labelled[extent.path, label] = f.relabelled(label)
        return self._labelled[extent.path, label]

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

    def give_back(self, extent: Extent) -> bool:
        """Frees the drive blocks of an extent nothing reads any more (a partition that moved into another's,
        memory/views.py) by punching a hole in its file, as `fallocate --punch-hole` does; the file keeps its
        size and the other extents their blocks.  False where the file system cannot punch holes (the
        space then stays taken until the run closes)."""
        err = punch_hole(self.file(extent).buffered_fd, extent.offset, extent.capacity)
        if err:
            log.debug("could not free %d bytes of %s: %s", extent.capacity, extent.path, os.strerror(err))
        return not err

    def close(self) -> None:
        """Closes and removes this run's swap files (already removed ones are fine)."""
        metrics.unwatch(self)
        for f in self._files.values():
            f.close()
        self._files.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        self._lock.release()
        self._extents.clear()
        self._ends.clear()

    def __enter__(self) -> "NvmeStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def own_folder(path: Path, key: str) -> Path:
    """path, made (0700) when missing; refused when it is a symlink, not a folder, or another user's, since
    whoever owns it could swap a run's folders for their own."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as err:
        raise NvmePathError(str(path), f"cannot be created: {err.strerror}",
                            f"fix the permissions of {path.parent} or point {key} at a writable folder",
                            key=key) from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise NvmePathError(str(path), "is a symlink or not a folder; infinity never follows one for its swap files",
                            f"remove {path} (infinity makes it again) or point {key} elsewhere", key=key)
    if st.st_uid != os.geteuid():
        raise NvmePathError(str(path), f"belongs to user {st.st_uid}, not to this run's user {os.geteuid()}, who "
                            "could then change this run's swap files", f"remove {path} (infinity makes it again) "
                            f"or point {key} at a folder of this user", key=key)
    return path


def new_run_folder(rank_dir: Path) -> tuple[Path, RunLock]:
    """A fresh folder run-<pid>-<random> (0700) under rank_dir, and its lock, held (see the note above)."""
    for _ in range(_TRIES):
        making = Path(tempfile.mkdtemp(prefix=f"{NEW_PREFIX}{os.getpid()}-", dir=rank_dir))
        try:
            lock = RunLock.create(making / LOCK_FILE)
        except BaseException:
            shutil.rmtree(making, ignore_errors=True)
            raise
        if lock is None:  # a clean-up starting at that moment took the new folder: make another
            shutil.rmtree(making, ignore_errors=True)
            continue
        folder = rank_dir / making.name[len(NEW_PREFIX) - len(RUN_PREFIX):]
        os.rename(making, folder)  # the flock belongs to the open file and goes with it
        lock.path = str(folder / LOCK_FILE)
        return folder, lock
    raise NvmePathError(str(rank_dir), f"lost {_TRIES} new run folders in a row to other runs' clean-up",
                        "start the runs sharing this folder one after another")


def remove_dead_runs(rank_dir: Path) -> list[Path]:
    """Removes the folders of runs that ended without cleaning up: those whose lock nobody holds, and
    run-<pid> folders of an infinity without locks whose process is gone.  Folders of live runs (of this
    process too), symlinks and other users' entries are left alone.  Returns what it removed."""
    removed = []
    for run in sorted(rank_dir.glob(f"{RUN_PREFIX}*")) + sorted(rank_dir.glob(f"{NEW_PREFIX}*")):
        try:
            st = os.lstat(run)
        except FileNotFoundError:  # another run starting now removed it first
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        liveness, lock = claim(run / LOCK_FILE)
        legacy = _LEGACY_RUN.match(run.name)
        dead = liveness is Liveness.DEAD or (liveness is Liveness.NO_LOCK and legacy is not None and
                                             not _alive(int(legacy.group(1))))
        if dead:
            shutil.rmtree(run, ignore_errors=True)
            log.info("removed swap files of an earlier run that did not exit cleanly: %s", run)
            removed.append(run)
        if lock is not None:
            lock.release()
    return removed


def _alive(pid: int) -> bool:
    """For run-<pid> folders without a lock only: this process never makes one, so its own PID is not alive."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True

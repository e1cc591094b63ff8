"""Files opened for the engine: an O_DIRECT descriptor for the aligned body and a
buffered one for unaligned tails, on the same file."""
from __future__ import annotations

import ctypes
import dataclasses
import enum
import errno
import functools
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from infinity.errors import AioError, CapacityError, NvmePathError
from infinity.io.align import logical_block_size

log = logging.getLogger("infinity.io")

FILE_MODE = 0o600  # swap and benchmark files are private to the run's user


class Access(enum.Enum):
    READ = os.O_RDONLY
    WRITE = os.O_WRONLY | os.O_CREAT  # never truncates: callers write extents of a file
    READ_WRITE = os.O_RDWR | os.O_CREAT
    # A new file, read and written: an existing name, a planted symlink included, is refused (EEXIST) and
    # never followed or overwritten.  Every file infinity creates in a folder a user names uses this.
    NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


@dataclass
class AioFile:
    """An open file: direct_fd is -1 where the file system refuses O_DIRECT."""

    path: str
    access: Access
    buffered_fd: int
    direct_fd: int
    alignment: int
    closed: bool = field(default=False)
    label: str = ""  # what the file holds, for metrics: a swap region ("param", "grad", ...) or ""
    owner: bool = True  # False: another AioFile's descriptors under another label (`relabelled`); never closes

    def relabelled(self, label: str) -> "AioFile":
        """The same open file under another metrics label; closing it (or dropping it) closes nothing."""
        return dataclasses.replace(self, label=label, owner=False)

    def close(self) -> None:
        if self.closed or not self.owner:
            return
        self.closed = True
        for fd in (self.direct_fd, self.buffered_fd):
            if fd >= 0:
                os.close(fd)

    def size(self) -> int:
        return os.fstat(self.buffered_fd).st_size

    def drop_cached_pages(self) -> None:
        """Evicts the file's clean pages from the page cache, so the next read comes from the drive."""
        os.posix_fadvise(self.buffered_fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def __enter__(self) -> "AioFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def open_file(path: str | os.PathLike[str], access: Access = Access.READ_WRITE) -> AioFile:
    """Opens path twice: buffered, and with O_DIRECT where the file system allows it.  With Access.NEW an
    existing name (a file or a symlink) is an AioError (EEXIST) naming it."""
    path = os.fspath(path)
    try:
        buffered = os.open(path, access.value | os.O_CLOEXEC, FILE_MODE)
    except OSError as err:
        raise AioError(err.errno or errno.EIO, "open", path, 0, 0, fix=_open_fix(err.errno, access, path)) from None
    try:
        direct = _reopen_direct(path, buffered, access)
    except OSError as err:
        if err.errno != errno.EINVAL:
            os.close(buffered)
            raise AioError(err.errno or errno.EIO, "open (O_DIRECT)", path, 0, 0) from None
        direct = -1
    return AioFile(path, access, buffered, direct, logical_block_size(buffered))  # the name may be gone


_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02  # fallocate(2)'s FALLOC_FL_KEEP_SIZE and FALLOC_FL_PUNCH_HOLE


@functools.cache
def _fallocate() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    return libc.fallocate


def punch_hole(fd: int, offset: int, length: int) -> int:
    """Frees the blocks of [offset, offset + length) of fd's file, its size kept, as `fallocate --punch-hole`
    does (reads of the range then return zeros); 0, or the errno (EOPNOTSUPP where the file system cannot)."""
    return 0 if _fallocate()(fd, _PUNCH_HOLE | _KEEP_SIZE, offset, length) == 0 else ctypes.get_errno()


def _open_fix(err: int | None, access: Access, path: str) -> str:
    if err == errno.ENOENT:
        return "check the path; reads need an existing file"
    if access is Access.NEW and err in (errno.EEXIST, errno.ELOOP):
        return (f"something (a file or a symlink) already has this name; infinity never follows or overwrites "
                f"it: remove {path} if it is yours, or check who put it there")
    return ""


def _reopen_direct(path: str, fd: int, access: Access) -> int:
    """An O_DIRECT descriptor of the very file fd has open: through /proc/self/fd/N where /proc is mounted,
    so that a rename or a symlink put at path between the two opens cannot send it elsewhere (else path
    itself, not following a symlink when the access says so)."""
    flags = (access.value & ~(os.O_CREAT | os.O_EXCL)) | os.O_DIRECT | os.O_CLOEXEC
    proc = f"/proc/self/fd/{fd}"
    if os.path.exists(proc):
        return os.open(proc, flags & ~os.O_NOFOLLOW)  # the magic link is the point here
    return os.open(path, flags)


def check_nvme_path(folder: str | os.PathLike[str], need_bytes: int = 0, key: str = "nvme_path") -> str:
    """The folder, checked: it exists, is a folder, takes a new file, and has need_bytes free."""
    path = os.fspath(folder)
    if not os.path.exists(path):
        raise NvmePathError(path, "does not exist", f"create it (mkdir -p {path}) or point {key} at a folder "
                            "on the NVMe drive", key=key)
    if not os.path.isdir(path):
        raise NvmePathError(path, "is not a folder", f"point {key} at a folder on the NVMe drive", key=key)
    try:
        fd, probe = tempfile.mkstemp(prefix=".infinity-probe-", dir=path)
    except OSError as err:
        raise NvmePathError(path, f"is not writable ({err.strerror})",
                            f"fix its permissions or point {key} at a writable folder", key=key) from None
    os.close(fd)
    os.unlink(probe)
    if need_bytes > 0:
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
        if free < need_bytes:
            raise CapacityError(f"free space under {path!r} ({key})", need_bytes, free,
                                f"free space there, point {key} at a larger drive, or ask for fewer bytes")
    return path


def direct_io_refusal(folder: str | os.PathLike[str]) -> str | None:
    """None when files in folder take O_DIRECT; else why not (tmpfs, for one, refuses it)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".infinity-odirect-", dir=folder)
    except OSError:
        check_nvme_path(folder)  # says why, as a typed error; callers have usually checked already
        raise
    os.close(fd)
    try:
        os.close(os.open(probe, os.O_RDWR | os.O_DIRECT))
        return None
    except OSError as err:
        return f"the file system under {os.fspath(folder)!r} refuses O_DIRECT ({err.strerror})"
    finally:
        os.unlink(probe)

"""The interface every backend offers: blocking pread/pwrite and submit_read/submit_write
returning futures, over a tensor, array or buffer and a path or open AioFile."""
from __future__ import annotations

import enum
import errno
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Protocol

from infinity import metrics
from infinity.config.aio import AioConfig, Backend
from infinity.errors import AioError, AlignmentError, ShortTransferError
from infinity.io.files import Access, AioFile, open_file
from infinity.io.span import Span, as_span
from infinity.timeline import NO_TIMELINE, Timeline, Track

log = logging.getLogger("infinity.io")


class Op(enum.Enum):
    READ = 0
    WRITE = 1


class DirectPolicy(enum.Enum):
    """What to do when a transfer cannot use O_DIRECT."""

    AUTO = "auto"  # aligned parts bypass the page cache; unaligned ones go through it, with one warning
    REQUIRE = "require"  # an unaligned buffer or offset, or a file system without O_DIRECT, is an error


class IoFuture(Protocol):
    def done(self) -> bool: ...

    def wait(self) -> int: ...


class Transfer:
    """What one request is about, for error messages and for releasing its resources."""

    def __init__(self, op: Op, span: Span, file: AioFile, offset: int, owns_file: bool):
        self.op, self.span, self.file, self.offset, self.owns_file = op, span, file, offset, owns_file
        self.start_ns = 0  # time.monotonic_ns() at submit when metrics or a timeline want it, else 0
        self.counted = False  # whether metrics counted its submit (and so count its completion)

    @property
    def opname(self) -> str:
        return "read" if self.op is Op.READ else "write"

    def finish(self) -> None:
        if self.owns_file:
            self.file.close()

    def short(self, offset: int, expected: int, actual: int) -> ShortTransferError:
        fix = ("the file ends before offset + size; read fewer bytes or check the offset"
               if self.op is Op.READ else "check free space and the file system's limits")
        return ShortTransferError(self.opname, self.file.path, offset, self.span.nbytes, expected, actual, fix)

    def failed(self, err: int, offset: int) -> AioError:
        fix = {errno.ENOSPC: "free space on the drive or choose another nvme_path",
               errno.EINVAL: "check alignment of buffer, offset and aio.block_size"}.get(err, "")
        return AioError(err, self.opname, self.file.path, offset, self.span.nbytes, fix=fix)


@dataclass
class IoStats:
    """What a handle has moved so far.  direct_bytes went through O_DIRECT, bypassing the page cache."""

    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    direct_bytes: int = 0
    errors: int = 0


class IoHandle(ABC):
    """An async-IO handle built from an AioConfig."""

    backend: Backend

    def __init__(self, config: AioConfig, direct: DirectPolicy = DirectPolicy.AUTO):
        self.config = config
        self.direct = direct
        self._warned_unaligned = False
        self._closed = False
        self._stats = IoStats()
        self._stats_lock = threading.Lock()
        self.timeline: Timeline = NO_TIMELINE  # infinity-train --trace draws each request's span on it
        metrics.watch(self, metrics.aio_reader(self.backend.value, config))  # infinity_aio_info while open

    @property
    def stats(self) -> IoStats:
        """A copy of the counters, consistent at the moment of the call."""
        with self._stats_lock:
            return replace(self._stats)

    def _record(self, t: Transfer, nbytes: int, direct_bytes: int, err: int, short: bool, done_ns: int) -> None:
        """A request has completed: nbytes moved (direct_bytes of them through O_DIRECT), err its errno
        or 0, short whether it moved fewer bytes than asked, done_ns time.monotonic_ns() at completion."""
        with self._stats_lock:
            s = self._stats
            s.requests += 1
            s.errors += bool(err)
            s.direct_bytes += direct_bytes
            if t.op is Op.READ:
                s.bytes_read += nbytes
            else:
                s.bytes_written += nbytes
        if t.start_ns and self.timeline.enabled:
            self.timeline.interval(f"{t.opname} {t.file.label}", Track.IO, t.start_ns, done_ns, bytes=nbytes)
        if t.counted:
            metrics.io_completed(t.opname, t.file.label, t.span.nbytes, nbytes, direct_bytes,
                                 max(done_ns - t.start_ns, 0) / 1e9, err, short)

    # ---- public API ------------------------------------------------------
    def pread(self, buffer: Any, file: AioFile | str | os.PathLike[str], offset: int = 0) -> int:
        """Reads len(buffer) bytes of file at offset into buffer; returns the byte count."""
        return self.submit_read(buffer, file, offset).wait()

    def pwrite(self, buffer: Any, file: AioFile | str | os.PathLike[str], offset: int = 0) -> int:
        """Writes buffer into file at offset; returns the byte count."""
        return self.submit_write(buffer, file, offset).wait()

    def submit_read(self, buffer: Any, file: AioFile | str | os.PathLike[str], offset: int = 0) -> IoFuture:
        return self._start(Op.READ, buffer, file, offset)

    def submit_write(self, buffer: Any, file: AioFile | str | os.PathLike[str], offset: int = 0) -> IoFuture:
        return self._start(Op.WRITE, buffer, file, offset)

    def close(self) -> None:
        """Waits for transfers in flight, then frees the engine's threads and contexts."""
        if not self._closed:
            self._closed = True
            metrics.unwatch(self)
            self._close()

    def __enter__(self) -> "IoHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- backend hooks -----------------------------------------------------
    @abstractmethod
    def _submit(self, transfer: Transfer) -> IoFuture: ...

    @abstractmethod
    def _close(self) -> None: ...

    # ---- shared checks -----------------------------------------------------
    def _start(self, op: Op, buffer: Any, file: AioFile | str | os.PathLike[str], offset: int) -> IoFuture:
        if self._closed:
            raise AioError(errno.EBADF, op.name.lower(), str(file), offset, 0, fix="the handle is closed")
        span = as_span(buffer, writable=op is Op.READ)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise AioError(errno.EINVAL, op.name.lower(), str(file), -1, span.nbytes,
                           detail=f"offset must be a non-negative integer, got {offset!r}")
        owns = not isinstance(file, AioFile)
        handle_file = open_file(file, Access.READ if op is Op.READ else Access.WRITE) if owns else file
        transfer = Transfer(op, span, handle_file, offset, owns)
        counted = transfer.counted = metrics.ACTIVE
        try:
            self._check_direct(transfer)
            if counted or self.timeline.enabled:
                transfer.start_ns = time.monotonic_ns()
            future = self._submit(transfer)
        except BaseException as err:
            transfer.finish()
            if counted and isinstance(err, AioError):
                metrics.io_submit_failed(transfer.opname, err.errno or errno.EIO)
            raise
        if counted:
            metrics.io_submitted(transfer.opname)  # before any wait can complete it: the caller has no future yet
        return future

    def _check_direct(self, t: Transfer) -> None:
        align = t.file.alignment
        aligned = t.span.address % align == 0 and t.offset % align == 0
        if self.direct is DirectPolicy.REQUIRE:
            if t.file.direct_fd < 0:
                raise AioError(errno.EINVAL, t.opname, t.file.path, t.offset, t.span.nbytes,
                               detail="the file system refuses O_DIRECT",
                               fix="put nvme_path on a file system that supports O_DIRECT (not tmpfs)")
            if not aligned:  # whatever its size: a small request would otherwise go through the page cache
                raise AlignmentError(t.opname, t.file.path, t.offset, t.span.nbytes, t.span.address, align)
        elif not aligned and t.span.nbytes >= align and not self._warned_unaligned:
            self._warned_unaligned = True
            log.warning("%s of %d bytes at offset %d of %s is not %d-byte aligned (buffer at 0x%x): it goes "
                        "through the page cache; allocate with infinity.memory.HostBuffer for O_DIRECT",
                        t.opname, t.span.nbytes, t.offset, t.file.path, align, t.span.address)


class Once:
    """Runs a completion exactly once, whichever thread asks first, and remembers its outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcome: int | BaseException | None = None

    def get(self, complete: Any) -> int:
        with self._lock:
            if self._outcome is None:
                try:
                    self._outcome = complete()
                except Exception as err:  # kept and raised to every waiter
                    self._outcome = err
                # A KeyboardInterrupt is not an outcome: it propagates, and the next wait completes.
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    @property
    def finished(self) -> bool:
        return self._outcome is not None

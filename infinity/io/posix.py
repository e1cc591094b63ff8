"""The POSIX backend: a thread pool over preadv/pwritev through the page cache.

Used where libaio is missing or the file system refuses O_DIRECT, and as the
test oracle for the native engine.  os.preadv/os.pwritev release the GIL."""
from __future__ import annotations

import errno
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

from infinity.config.aio import AioConfig, Backend
from infinity.io.handle import DirectPolicy, IoHandle, Once, Op, Transfer

MAX_WORKERS = 32


class PosixFuture:
    def __init__(self, handle: IoHandle, parts: list[Future[tuple[int, int, int, int]]], transfer: Transfer):
        self._handle, self._parts, self._transfer = handle, parts, transfer
        self._once = Once()

    def done(self) -> bool:
        return self._once.finished or all(p.done() for p in self._parts)

    def wait(self) -> int:
        return self._once.get(self._complete)

    def _complete(self) -> int:
        t = self._transfer
        try:
            outcomes = [p.result() for p in self._parts]
        finally:
            t.finish()
        moved = sum(max(actual, 0) for _, _, actual, _ in outcomes)
        errs = [-actual for _, _, actual, _ in outcomes if actual < 0]
        short = not errs and any(actual < expected for _, expected, actual, _ in outcomes)
        err = errs[0] if errs else errno.EIO if short else 0
        self._handle._record(t, moved, 0, err, short, max((done for *_, done in outcomes), default=time.monotonic_ns()))
        total = 0
        for offset, expected, actual, _ in outcomes:
            if actual < 0:
                raise t.failed(-actual, offset)
            if actual < expected:
                raise t.short(offset, expected, actual)
            total += actual
        return total


def _move(op: Op, fd: int, view: memoryview, offset: int, block: int) -> tuple[int, int, int, int]:
    """Moves view to or from fd at offset in block-sized calls: (offset, expected, actual or -errno,
    time.monotonic_ns() when done)."""
    done = 0
    try:
        while done < len(view):
            chunk = view[done:done + block]
            n = os.preadv(fd, [chunk], offset + done) if op is Op.READ else os.pwritev(fd, [chunk], offset + done)
            if n == 0:
                break  # end of file
            done += n
    except OSError as err:
        return offset + done, len(view) - done, -(err.errno or errno.EIO), time.monotonic_ns()
    return offset, len(view), done, time.monotonic_ns()


class PosixHandle(IoHandle):
    backend = Backend.POSIX

    def __init__(self, config: AioConfig, direct: DirectPolicy = DirectPolicy.AUTO):
        super().__init__(config, direct)
        workers = min(MAX_WORKERS, config.thread_count * config.queue_depth)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infinity-posix")

    def _submit(self, t: Transfer) -> PosixFuture:
        # Contiguous parts, one per configured thread, as the native engine splits them.
        n, parts = t.span.nbytes, self.config.thread_count
        bounds = sorted({n * i // parts for i in range(parts + 1)})
        futures = [self._pool.submit(_move, t.op, t.file.buffered_fd, t.span.view[a:b], t.offset + a,
                                     self.config.block_size) for a, b in zip(bounds, bounds[1:])]
        return PosixFuture(self, futures, t)

    def _close(self) -> None:
        self._pool.shutdown(wait=True)

"""The native libaio backend: requests go to C worker threads; Python waits with the GIL released."""
from __future__ import annotations

import errno
import logging
from typing import Any

from infinity._native import load
from infinity.config.aio import AioConfig, Backend
from infinity.errors import AioError
from infinity.io.handle import DirectPolicy, IoHandle, Once, Transfer

log = logging.getLogger("infinity.io")

AIO_MAX_NR = "/proc/sys/fs/aio-max-nr"


class LibaioFuture:
    """One request in flight in the native engine."""

    def __init__(self, handle: "LibaioHandle", request: Any, transfer: Transfer):
        self._handle, self._request, self._transfer = handle, request, transfer
        self._ffi, self._lib = handle._ffi, handle._lib
        self._once = Once()

    def done(self) -> bool:
        return self._once.finished or bool(self._lib.inf_aio_done(self._request))

    def wait(self) -> int:
        """Blocks (without the GIL) until the request completes; raises its error if it failed."""
        return self._once.get(self._complete)

    def _complete(self) -> int:
        if self._request is not None:
            result = self._ffi.new("inf_aio_result *")
            try:
                self._lib.inf_aio_wait(self._request, result)  # cffi releases the GIL for the call
            finally:
                # Also after Ctrl-C: release waits for the request itself, so its buffer is free after.
                self._lib.inf_aio_release(self._request)
                self._request = None
                self._result = result
                t = self._transfer
                t.finish()
                self._handle._record(t, int(result.bytes_done), int(result.direct_bytes), -int(result.status),
                                     bool(result.short_transfer), int(result.complete_ns))
        result, t = self._result, self._transfer
        if result.status == 0:
            return int(result.bytes_done)
        if result.short_transfer:
            raise t.short(int(result.fail_offset), int(result.fail_expected), int(result.fail_actual))
        raise t.failed(-int(result.status), int(result.fail_offset))

    def __del__(self) -> None:
        # A dropped future must still finish before its buffer may be freed.
        if getattr(self, "_request", None) is not None:
            try:
                self.wait()
            except AioError as err:
                log.error("a transfer nobody waited for failed: %s", err)


class LibaioHandle(IoHandle):
    backend = Backend.LIBAIO

    def __init__(self, config: AioConfig, direct: DirectPolicy = DirectPolicy.AUTO):
        super().__init__(config, direct)
        self._ffi, self._lib = load()
        params = self._ffi.new("inf_aio_params *", {
            "block_size": config.block_size, "queue_depth": config.queue_depth,
            "thread_count": config.thread_count, "single_submit": int(config.single_submit),
            "overlap_events": int(config.overlap_events)})
        out = self._ffi.new("inf_aio_handle **")
        rc = self._lib.inf_aio_create(params, out)
        if rc < 0:
            raise _setup_error(-rc, config)
        self._handle = out[0]

    def inflight(self) -> int:
        """Pieces in the kernel now, across all worker threads."""
        return int(self._lib.inf_aio_inflight(self._handle)) if not self._closed else 0

    def _submit(self, t: Transfer) -> LibaioFuture:
        out = self._ffi.new("inf_aio_request **")
        # The engine sends the aligned body through direct_fd and the rest through buffered_fd.
        rc = self._lib.inf_aio_submit(self._handle, t.op.value, t.file.direct_fd, t.file.buffered_fd,
                                      t.file.alignment, self._ffi.cast("void *", t.span.address),
                                      t.span.nbytes, t.offset, out)
        if rc < 0:
            raise t.failed(-rc, t.offset)
        return LibaioFuture(self, out[0], t)

    def _close(self) -> None:
        self._lib.inf_aio_destroy(self._handle)
        self._handle = None


def _setup_error(err: int, config: AioConfig) -> AioError:
    if err == errno.EAGAIN:
        try:
            limit = open(AIO_MAX_NR).read().strip()
        except OSError:
            limit = "unknown"
        return AioError(err, "io_setup", AIO_MAX_NR, 0, 0,
                        detail=(f"the kernel's limit of async-IO events ({AIO_MAX_NR} = {limit}) is smaller than "
                                f"thread_count × queue_depth = {config.thread_count * config.queue_depth} "
                                "plus what other processes hold"),
                        fix=f"lower aio.queue_depth or aio.intra_op_parallelism, or raise {AIO_MAX_NR} "
                            f"(sysctl -w fs.aio-max-nr=1048576)")
    return AioError(err, "io_setup", "libaio", 0, 0, fix="check aio.queue_depth and aio.intra_op_parallelism")

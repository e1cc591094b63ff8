"""Async file I/O behind one interface: the native libaio engine and a POSIX fallback.

    handle = infinity.io.open_handle(AioConfig(block_size=1 << 20, queue_depth=32), nvme_path="/local_nvme")
    future = handle.submit_read(tensor, "/local_nvme/x.swp", offset=0)
    ...
    future.wait()
"""
from __future__ import annotations

import logging
import os

from infinity._native import available as native_refusal
from infinity.config.aio import AioConfig, Backend
from infinity.errors import ConfigError, Problem
from infinity.io.files import Access, AioFile, check_nvme_path, direct_io_refusal, open_file
from infinity.io.handle import DirectPolicy, IoFuture, IoHandle, IoStats, Op

log = logging.getLogger("infinity.io")

__all__ = ["Access", "AioFile", "DirectPolicy", "IoFuture", "IoHandle", "IoStats", "Op", "check_nvme_path",
           "choose_backend", "native_refusal", "open_file", "open_handle"]


def choose_backend(requested: Backend, nvme_path: str | os.PathLike[str] | None = None) -> tuple[Backend, str]:
    """The backend to use and why.  auto takes libaio unless it cannot load or nvme_path refuses O_DIRECT."""
    if requested is Backend.POSIX:
        return Backend.POSIX, "aio.backend is posix"
    refusal = native_refusal()
    if requested is Backend.LIBAIO:
        if refusal:
            raise ConfigError([Problem("aio.backend", f"libaio was asked for but {refusal}",
                                       "install libaio-dev and reinstall, or set aio.backend to auto or posix")])
        return Backend.LIBAIO, "aio.backend is libaio"
    if refusal:
        log.warning("using the POSIX backend: %s", refusal)
        return Backend.POSIX, refusal
    if nvme_path is not None:
        refusal = direct_io_refusal(nvme_path)
        if refusal:
            log.warning("using the POSIX backend: %s", refusal)
            return Backend.POSIX, refusal
    return Backend.LIBAIO, "libaio loads and O_DIRECT works"


def open_handle(config: AioConfig | None = None, nvme_path: str | os.PathLike[str] | None = None,
                direct: DirectPolicy = DirectPolicy.AUTO, key: str = "nvme_path") -> IoHandle:
    """A handle for config.backend (auto: see choose_backend), checked against nvme_path when given (key:
    the config key that named it, for the error)."""
    config = config or AioConfig()
    if nvme_path is not None:
        check_nvme_path(nvme_path, key=key)
    backend, _ = choose_backend(config.backend, nvme_path)
    if backend is Backend.POSIX:
        if direct is DirectPolicy.REQUIRE:
            raise ConfigError([Problem("aio.backend", "O_DIRECT is required but the POSIX backend goes through "
                                       "the page cache", "use libaio on a file system that takes O_DIRECT")])
        from infinity.io.posix import PosixHandle

        return PosixHandle(config, direct)
    from infinity.io.libaio import LibaioHandle

    return LibaioHandle(config, direct)

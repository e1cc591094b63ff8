"""Loads the cffi-built native engine and checks that it matches this package."""
from __future__ import annotations

import functools
from typing import Any

from infinity.errors import NativeUnavailable

ABI_VERSION = 2
REBUILD = "reinstall the package (pip install -e .) with Debian's libaio-dev present (apt-get install libaio-dev)"


@functools.lru_cache(maxsize=1)
def load() -> tuple[Any, Any]:
    """(ffi, lib) of the native engine; NativeUnavailable says why it cannot be had."""
    try:
        from infinity._native import _aio  # type: ignore[attr-defined]
    except ImportError as err:
        raise NativeUnavailable(f"the native libaio engine is not built or cannot load ({err}); {REBUILD}") from err
    found = _aio.lib.inf_aio_abi_version()
    if found != ABI_VERSION:
        raise NativeUnavailable(f"native engine ABI {found} does not match the package's {ABI_VERSION}; {REBUILD}")
    return _aio.ffi, _aio.lib


def available() -> str | None:
    """None when the native engine loads, else the reason it does not."""
    try:
        load()
    except NativeUnavailable as err:
        return str(err)
    return None

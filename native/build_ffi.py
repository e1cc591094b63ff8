"""cffi out-of-line API-mode build of infinity's native async-IO engine.

The cdef is read from native/include/infinity_aio.h itself (preprocessor lines
and comments stripped), so the header stays the one description of the ABI.
"""
from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

NATIVE = Path(__file__).resolve().parent
HEADER = NATIVE / "include" / "infinity_aio.h"


def cdef_from_header(text: str) -> str:
    """The header's declarations in the form cffi's cdef accepts."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    cdef = "\n".join(lines)
    # cffi takes integer #defines as `#define NAME VALUE` lines only when the value is literal.
    defines = re.findall(r"^#define\s+(INF_AIO_\w+)\s+(\d+)\s*$", text, flags=re.M)
    return cdef + "\n" + "\n".join(f"#define {name} {value}" for name, value in defines)


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(HEADER.read_text()))
ffibuilder.set_source(
    "infinity._native._aio",
    '#include "infinity_aio.h"',
    sources=[str((NATIVE / "src" / "aio.c").relative_to(NATIVE.parent))],
    include_dirs=[str((NATIVE / "include").relative_to(NATIVE.parent))],
    libraries=["aio", "pthread"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

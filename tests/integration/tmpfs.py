"""A real, size-limited tmpfs for tests of a full drive (tmpfs takes O_DIRECT on kernels >= 6.6)."""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def size_limited_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """folder (created) with a tmpfs of `size` (mount's notation: 1m, 8m) mounted on it for the block;
    skips the test where mounting is not allowed (it needs root)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)

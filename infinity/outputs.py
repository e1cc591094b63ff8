"""Output files a user names (--trace, --json, --plot, a timeline's SVG): written so that a symlink or a
file planted at the name is replaced, never followed.

    with replacing("run.json") as out:
        out.write(data)

[Note: why not open(path, "w")]  open() with O_CREAT follows a symlink at the name: in a shared folder
(/tmp, a node's scratch) anyone can put one at a name a user is likely to give (trace.json) and have
the run overwrite whatever it points at with the run's own rights.  So the bytes go into a new file
beside it (O_EXCL | O_NOFOLLOW, a random name, mode 0666 less the umask as open() would give), which
then takes the name with rename(): rename replaces the symlink itself, and a reader sees the old file
or the whole new one, never half of one.  A failure removes the new file and leaves the name as it was.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import BinaryIO, Iterator

OUTPUT_MODE = 0o666  # less the umask, as open(path, "w") would make it


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A new binary file to write; on leaving the block it takes path's name (see the note)."""
    final = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(final))
    temp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, OUTPUT_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def write_output(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Writes data (text as UTF-8) as the whole new content of path, replacing whatever has that name."""
    with replacing(path) as out:
        out.write(data.encode() if isinstance(data, str) else data)

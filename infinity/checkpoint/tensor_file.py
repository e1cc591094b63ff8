"""One safetensors file written tensor by tensor: the header first (from each tensor's name, dtype and
shape), then every tensor in the header's order, so that at most one tensor is in memory at a time.

    specs = [TensorSpec("w", torch.bfloat16, (4, 8)), TensorSpec("b", torch.bfloat16, (8,))]
    with TensorFileWriter(path, specs) as out:
        for spec in specs:
            out.write(spec.name, values_of(spec.name))   # fetched, written, dropped one by one
    out.checksum  # the file's checksum (format.CHECKSUM), as the checkpoint manifest records it

Durable: the file is written under a temporary name beside `path` (".<name>.tmp-<pid>"), fsynced,
renamed over `path` and the folder fsynced, all in close(); an error or a missing tensor removes the
temporary file and leaves whatever was at `path` untouched.

[Note: the layout]  safetensors is 8 bytes of little-endian header length N, N bytes of JSON, then
the tensors' bytes back to back in the order of their data_offsets, with no gap (readers check that
the offsets tile the data).  The JSON may end in spaces: it is padded so that the data starts on a
multiple of `align` bytes (8 by default, as safetensors' own writer does; a checkpoint asks for 4096
so that O_DIRECT can move tensors straight between files).  A tensor starts `align`-aligned only if
the tensors before it have such sizes; the checkpoint format pads its 1-D tensors for that itself.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Mapping, Sequence

import torch

from infinity.checkpoint import files
from infinity.checkpoint.format import SAFETENSORS_DTYPES, new_checksum
from infinity.errors import CheckpointError
from infinity.io.align import round_up


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the file will hold: name, dtype and shape (the bytes come later, in order)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty(0, dtype=self.dtype).element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorSpec":
        return cls(name, tensor.dtype, tuple(tensor.shape))


@dataclass(frozen=True)
class Layout:
    """Where everything goes: the header's bytes and each tensor's [begin, end) offset in the file."""

    header: bytes  # the 8-byte length and the padded JSON: the file's first len(header) bytes
    offsets: tuple[tuple[int, int], ...]  # per spec, absolute file offsets

    @property
    def size(self) -> int:
        return self.offsets[-1][1] if self.offsets else len(self.header)


def layout(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None, align: int = 8) -> Layout:
    """The header and offsets of a file holding specs in order; a CheckpointError for a repeated name or
    a dtype safetensors cannot hold."""
    entries: dict[str, Any] = {}
    if metadata is not None:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    begin, spans = 0, []
    for spec in specs:
        if spec.name in entries or spec.name == "__metadata__":
            raise CheckpointError(spec.name, "is named twice among the tensors of one file")
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(spec.name, f"dtype {spec.dtype} cannot be stored in safetensors",
                                  f"convert it to one of {', '.join(str(d) for d in SAFETENSORS_DTYPES)}")
        end = begin + spec.nbytes
        entries[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [begin, end]}
        spans.append((begin, end))
        begin = end
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    length = round_up(8 + len(text), align) - 8
    header = struct.pack("<Q", length) + text + b" " * (length - len(text))
    return Layout(header, tuple((len(header) + b, len(header) + e) for b, e in spans))


class TensorFileWriter:
    """Writes specs' tensors, in order, into one safetensors file at path (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike[str], specs: Sequence[TensorSpec],
                 metadata: Mapping[str, str] | None = None, align: int = 8):
        self.path = Path(path)
        self.specs = tuple(specs)
        self.layout = layout(self.specs, metadata, align)
        self._next = 0
        self._digest = new_checksum()
        self.checksum: str | None = None  # set by close(): the file's checksum (format.CHECKSUM), lowercase hex
        self.nbytes = self.layout.size
        self._tmp = files.temp_path(self.path)
        self._file: BinaryIO | None = open(self._tmp, "xb")
        self._put(self.layout.header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor of the file; name, dtype and element count must be the next spec's."""
        if self._file is None:
            raise CheckpointError(str(self.path), f"tensor {name!r} written after the file was closed")
        if self._next >= len(self.specs):
            raise CheckpointError(str(self.path), f"tensor {name!r} is one more than the {len(self.specs)} "
                                  "the header lists")
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tensor.numel() != spec.numel:
            raise CheckpointError(str(self.path), f"tensor {self._next} should be {spec.name!r} ({spec.dtype}, "
                                  f"{spec.numel} elements), got {name!r} ({tensor.dtype}, {tensor.numel()})",
                                  "write the tensors in the order and shapes given to the writer")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._put(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        """Makes the file durable and puts it in place; refuses if a listed tensor was not written."""
        if self._file is None:
            return
        if self._next != len(self.specs):
            missing = self.specs[self._next].name
            self.abort()
            raise CheckpointError(str(self.path), f"closed after {self._next} of {len(self.specs)} tensors "
                                  f"(next: {missing!r}); nothing was written")
        f, self._file = self._file, None
        try:
            try:
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()
            os.replace(self._tmp, self.path)
        except BaseException:  # a full drive shows at the flush: no temporary file is left behind
            self._tmp.unlink(missing_ok=True)
            raise
        files.fsync_dir(self.path.parent)
        self.checksum = self._digest.hexdigest()

    def abort(self) -> None:
        """Drops the temporary file; what was at path stays."""
        f, self._file = self._file, None
        try:
            if f is not None:
                f.close()  # may fail writing its buffer (a full drive): the file goes all the same
        except OSError:
            pass
        finally:
            self._tmp.unlink(missing_ok=True)

    def _put(self, data: bytes | memoryview) -> None:
        if self._file is not None:  # write() checked it
            self._file.write(data)
        self._digest.update(data)

    def __enter__(self) -> "TensorFileWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

"""safetensors files streamed to and from where the values live (swap files or host tensors).

A safetensors file is an 8-byte little-endian header length, a JSON header, then the tensors' raw
bytes laid end to end.  Here the header is padded with spaces so the data starts ALIGNMENT bytes into
the file and every tensor is a whole number of ALIGNMENT bytes (format.py), so each tensor moves
between its file and its swap file with O_DIRECT, through a few staging buffers, never whole in memory.
The checksum is computed over the bytes as they pass, in file order, on a thread beside the copy (checksum.py).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from infinity.checkpoint import files
from infinity.checkpoint.checksum import StreamDigest
from infinity.checkpoint.tensor_file import TensorSpec, layout
from infinity.checkpoint.format import ALIGNMENT, TORCH_DTYPES, FileEntry, check_file, \
    element_size, file_checksum
from infinity.errors import CheckpointError
from infinity.io.align import round_up
from infinity.io.files import Access, open_file
from infinity.io.handle import IoHandle
from infinity.memory.host_buffer import HostBuffer, PinPolicy
from infinity.memory.stream import Part, load_parts, save_parts

HEADER_LIMIT = 100 << 20  # safetensors' own limit on the header


@dataclass(frozen=True)
class StoredTensor:
    """One 1-D tensor of a file: its name, dtype, stored elements (whole ALIGNMENT bytes) and its values."""

    name: str
    dtype: torch.dtype
    numel: int
    part: Part

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


def header(specs: Sequence[StoredTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces to a multiple of ALIGNMENT bytes (the one
    header builder: tensor_file.layout)."""
    return layout([TensorSpec(s.name, s.dtype, (s.numel,)) for s in specs], metadata, ALIGNMENT).header


def write(folder: Path, name: str, specs: Sequence[StoredTensor], handle: IoHandle, staging: Sequence[HostBuffer],
          metadata: dict[str, str] | None = None) -> FileEntry:
    """Writes folder/name durably from the specs' parts; returns its size and checksum."""
    final = folder / name
    temp = files.temp_path(final)
    temp.unlink(missing_ok=True)
    head = header(specs, metadata or {})
    out = open_file(temp, Access.NEW)
    out.label = "checkpoint"
    try:
        with StreamDigest(head) as digest:
            block = HostBuffer(len(head), pin=PinPolicy.PAGEABLE)
            block.tensor.copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
            handle.pwrite(block.tensor, out, 0)
            save_parts(handle, [(s.part, s.nbytes) for s in specs], out, len(head), staging, seen=digest.update)
            checksum = digest.hexdigest()
        pos = len(head) + sum(s.nbytes for s in specs)
        files.commit(temp, final, out.buffered_fd)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        out.close()
    return FileEntry(name, pos, checksum)


def read_header(path: Path) -> tuple[bytes, dict[str, dict]]:
    """The header's bytes (length included) and its tensor entries, checked to be well formed."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(str(path), f"is {len(raw)} bytes: too short for a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > HEADER_LIMIT:
            raise CheckpointError(str(path), f"claims a header of {length} bytes (altered?)")
        text = f.read(length)
    try:
        entries = json.loads(text)
    except ValueError as err:
        raise CheckpointError(str(path), f"its safetensors header is not JSON ({err})") from None
    entries.pop("__metadata__", None)
    return raw + text, entries


def read(path: Path, expected: FileEntry, specs: dict[str, StoredTensor], handle: IoHandle,
         staging: Sequence[HostBuffer], algorithm: str) -> None:
    """Streams every tensor of path into its spec's part, checking dtype and size against the spec and
    the whole file's size and checksum (of algorithm, the manifest's) against expected (a CheckpointError
    naming the file)."""
    size = os.stat(path).st_size
    check_file(path.parent, expected, size, None)
    try:
        head, entries = read_header(path)
        if set(entries) != set(specs):
            raise CheckpointError(str(path), f"holds tensors {sorted(set(entries) ^ set(specs))[:5]} that do not "
                                  f"match its manifest")
    except CheckpointError:
        check_file(path.parent, expected, *file_checksum(path, algorithm), algorithm)  # an altered header: say so
        raise
    parts = in_file_order(path, head, entries, specs)
    source = open_file(path, Access.READ)
    try:
        with StreamDigest(head, algorithm) as digest:
            load_parts(handle, parts, source, len(head), staging, seen=digest.update)
            checksum = digest.hexdigest()
    finally:
        source.close()
    check_file(path.parent, expected, size, checksum, algorithm)


def in_file_order(path: Path, head: bytes, entries: dict[str, dict], specs: dict[str, StoredTensor]) -> list:
    """(part, nbytes) of every tensor in the order the file holds them, each checked against its spec
    (dtype, size) and laid end to end from the data's start (so every one is ALIGNMENT-aligned)."""
    parts, pos = [], 0
    for name, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        spec = specs[name]
        start, end = entry["data_offsets"]
        if TORCH_DTYPES.get(entry["dtype"]) != spec.dtype or end - start != spec.nbytes or start != pos \
                or len(head) % ALIGNMENT:
            raise CheckpointError(str(path), f"tensor {name!r} is {entry['dtype']} of {end - start} bytes at "
                                  f"{start}; expected {spec.dtype} of {spec.nbytes} bytes at {pos}, aligned")
        parts.append((spec.part, spec.nbytes))
        pos = end
    return parts


def staging_buffers(largest: int, chunk_bytes: int, count: int) -> list[HostBuffer]:
    """count aligned buffers of chunk_bytes, or fewer bytes when the largest file's data is smaller."""
    size = max(ALIGNMENT, min(round_up(chunk_bytes, ALIGNMENT), round_up(largest, ALIGNMENT)))
    return [HostBuffer(size, pin=PinPolicy.PAGEABLE, zero=False) for _ in range(count)]

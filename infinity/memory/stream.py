"""Copying a run of bytes between two places through a few staging buffers, chunk by chunk, with the
reads of later chunks in flight while earlier chunks are written (checkpoints: swap file <-> checkpoint
file, host tensor <-> checkpoint file).

[Note: the pipeline]  With n staging buffers, up to max(1, n // 2) reads are in flight ahead of the
chunk being handed on; each chunk, once read, is shown to `seen` (a checksum, in file order) and its
write is submitted at once.  A read waits for a buffer only when every buffer is reading or writing;
then it completes the oldest write.  So at most n chunks of memory are ever used, whatever the size
copied, and the async-IO engine's threads read and write while the caller's thread hashes.  A failed
transfer completes every other one in flight (their buffers must not be reused under them) and raises.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from infinity.io.files import AioFile
from infinity.io.handle import IoFuture, IoHandle
from infinity.memory.host_buffer import HostBuffer

Seen = Callable[[torch.Tensor], None]  # each chunk's bytes (uint8), in order


class End(Protocol):
    """One side of a copy: bytes at positions 0..nbytes of something."""

    def read(self, handle: IoHandle, chunk: torch.Tensor, pos: int) -> IoFuture | None:
        """Starts filling chunk with bytes [pos, pos + len(chunk)); None when already done."""

    def write(self, handle: IoHandle, chunk: torch.Tensor, pos: int) -> IoFuture | None:
        """Starts storing chunk at [pos, pos + len(chunk)); None when already done."""


@dataclass(frozen=True)
class FileEnd:
    """Bytes of an open file from offset on (offset and chunks aligned: O_DIRECT)."""

    file: AioFile
    offset: int

    def read(self, handle: IoHandle, chunk: torch.Tensor, pos: int) -> IoFuture | None:
        return handle.submit_read(chunk, self.file, self.offset + pos)

    def write(self, handle: IoHandle, chunk: torch.Tensor, pos: int) -> IoFuture | None:
        return handle.submit_write(chunk, self.file, self.offset + pos)


@dataclass(frozen=True)
class TensorEnd:
    """A host tensor's bytes; reads past its end give zeros (padding), writes past it are dropped."""

    tensor: torch.Tensor  # contiguous, on the CPU

    def _bytes(self) -> torch.Tensor:
        return self.tensor.reshape(-1).view(torch.uint8)

    def read(self, handle: IoHandle, chunk: torch.Tensor, pos: int) -> IoFuture | None:
        data = self._bytes()[pos:pos + chunk.numel()]
        chunk[:data.numel()].copy_(data)
        chunk[data.numel():].zero_()
        return None

    def write(self, handle: IoHandle, chunk: torch.Tensor, pos: int) -> IoFuture | None:
        data = self._bytes()[pos:pos + chunk.numel()]
        data.copy_(chunk[:data.numel()])
        return None


def copy(handle: IoHandle, source: End, target: End, nbytes: int, staging: Sequence[HostBuffer],
         seen: Seen | None = None) -> None:
    """Copies nbytes from source to target through staging (see the note above)."""
    chunk = min(b.nbytes for b in staging)
    positions = iter(range(0, nbytes, chunk))
    pending = next(positions, None)
    free: deque[int] = deque(range(len(staging)))
    reads: deque[tuple[int, int, IoFuture | None]] = deque()  # (position, buffer, read)
    writes: deque[tuple[int, IoFuture | None]] = deque()  # (buffer, write)
    depth = max(1, len(staging) // 2)
    try:
        while pending is not None or reads:
            while pending is not None and len(reads) < depth:
                if not free:
                    if reads:
                        break  # hand on a chunk first
                    free.append(_complete(writes.popleft()))
                b = free.popleft()
                view = staging[b].tensor[:min(chunk, nbytes - pending)]
                reads.append((pending, b, source.read(handle, view, pending)))
                pending = next(positions, None)
            pos, b, future = reads.popleft()
            if future is not None:
                future.wait()
            view = staging[b].tensor[:min(chunk, nbytes - pos)]
            if seen is not None:
                seen(view)
            writes.append((b, target.write(handle, view, pos)))
            while writes and (writes[0][1] is None or writes[0][1].done()):
                free.append(_complete(writes.popleft()))
        while writes:
            _complete(writes.popleft())
    except BaseException:
        for future in [f for _, _, f in reads] + [f for _, f in writes]:
            if future is not None:
                try:
                    future.wait()
                except Exception:  # the first error is the one raised
                    pass
        raise


def _complete(item: tuple[int, IoFuture | None]) -> int:
    buffer, future = item
    if future is not None:
        future.wait()
    return buffer


# ---- parts: where the bytes of one checkpoint tensor live while the run goes on --------------
@dataclass(frozen=True)
class HostPart:
    """Values in a tensor (host or compute tier): written from it, loaded into it in place."""

    tensor: torch.Tensor

    def save(self, handle: IoHandle, file: AioFile, offset: int, nbytes: int, staging: Sequence[HostBuffer],
             seen: Seen | None = None) -> None:
        values = self.tensor.detach().reshape(-1)
        if values.device.type != "cpu" or not values.is_contiguous():
            values = values.cpu().contiguous()  # a compute-tier (CUDA) parameter: one host copy of it
        copy(handle, TensorEnd(values), FileEnd(file, offset), nbytes, staging, seen)

    def load(self, handle: IoHandle, file: AioFile, offset: int, nbytes: int, staging: Sequence[HostBuffer],
             seen: Seen | None = None) -> None:
        t = self.tensor
        in_place = t.device.type == "cpu" and t.is_contiguous()
        values = t.detach().reshape(-1) if in_place else torch.empty(t.numel(), dtype=t.dtype)
        copy(handle, FileEnd(file, offset), TensorEnd(values), nbytes, staging, seen)
        if not in_place:
            with torch.no_grad():
                t.copy_(values.view(t.shape))


class Swapped(Protocol):
    """The memory manager's side of a SwapPart (see MemoryManager.copy_out / copy_in)."""

    def copy_out(self, key: str, byte_offset: int, nbytes: int, target: AioFile, target_offset: int,
                 staging: Sequence[HostBuffer], seen: Seen | None = None) -> None: ...

    def copy_in(self, key: str, byte_offset: int, nbytes: int, source: AioFile, source_offset: int,
                staging: Sequence[HostBuffer], seen: Seen | None = None) -> None: ...


@dataclass(frozen=True)
class SwapPart:
    """Values in a swap file: bytes from byte_offset of partition key's extent, moved by its manager
    (with the manager's own async-IO handle) without ever being whole in memory."""

    manager: Swapped
    key: str
    byte_offset: int = 0

    def save(self, handle: IoHandle, file: AioFile, offset: int, nbytes: int, staging: Sequence[HostBuffer],
             seen: Seen | None = None) -> None:
        self.manager.copy_out(self.key, self.byte_offset, nbytes, file, offset, staging, seen)

    def load(self, handle: IoHandle, file: AioFile, offset: int, nbytes: int, staging: Sequence[HostBuffer],
             seen: Seen | None = None) -> None:
        self.manager.copy_in(self.key, self.byte_offset, nbytes, file, offset, staging, seen)


Part = HostPart | SwapPart

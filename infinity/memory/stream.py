"""Copying a run of bytes between two places through a few staging buffers, chunk by chunk, with the
reads of later chunks in flight while earlier chunks are written (checkpoints: swap file <-> checkpoint
file, host tensor <-> checkpoint file).

[Note: the pipeline]  With n staging buffers, up to max(1, n // 2) reads are in flight ahead of the
chunk being handed on; each chunk, once read, has its write submitted at once and is then shown to
`seen` (a checksum, in file order), which may hand back a completion (a hash running on another
thread): the chunk's buffer is reused only when its write and that completion are both done.  A read
waits for a buffer only when every buffer is reading or writing; then it completes the oldest write.
So at most n chunks of memory are ever used, whatever the size copied, and the async-IO engine's
threads read and write while the checksum runs.  A failed transfer completes every other one in flight
(their buffers must not be reused under them) and raises.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import torch

from infinity.io.files import AioFile
from infinity.io.handle import IoFuture, IoHandle
from infinity.memory.host_buffer import HostBuffer

# Shown each chunk's bytes (uint8), in order; returns None when done with them, else a completion to wait for.
Seen = Callable[[torch.Tensor], "IoFuture | None"]


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


class Joined:
    """The transfers of one chunk's pieces (a Chain's), or a chunk's write and its checksum, as one future."""

    def __init__(self, futures: list[IoFuture | None]):
        self.futures = [f for f in futures if f is not None]

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> int:
        moved, first = 0, None
        for f in self.futures:  # every piece is waited for, then the first error raised
            try:
                moved += f.wait()
            except Exception as err:
                first = first or err
        if first is not None:
            raise first
        return moved


@dataclass(frozen=True)
class Chain:
    """Several ends laid end to end, (end, nbytes) each: one copy streams them all, so the pipeline
    keeps reads and writes in flight across tensor boundaries instead of draining at each."""

    pieces: tuple[tuple[End, int], ...]
    starts: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        starts, pos = [], 0
        for _, n in self.pieces:
            starts.append(pos)
            pos += n
        object.__setattr__(self, "starts", starts)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.pieces)

    def _split(self, chunk: torch.Tensor, pos: int) -> Iterator[tuple[End, torch.Tensor, int]]:
        end_pos = pos + chunk.numel()
        i = max(0, bisect.bisect_right(self.starts, pos) - 1)
        while i < len(self.pieces) and self.starts[i] < end_pos:
            end, n = self.pieces[i]
            lo, hi = max(pos, self.starts[i]), min(end_pos, self.starts[i] + n)
            if lo < hi:
                yield end, chunk[lo - pos:hi - pos], lo - self.starts[i]
            i += 1

    def read(self, handle: IoHandle, chunk: torch.Tensor, pos: int) -> IoFuture | None:
        return Joined([end.read(handle, piece, at) for end, piece, at in self._split(chunk, pos)])

    def write(self, handle: IoHandle, chunk: torch.Tensor, pos: int) -> IoFuture | None:
        return Joined([end.write(handle, piece, at) for end, piece, at in self._split(chunk, pos)])


def copy(handle: IoHandle, source: End, target: End, nbytes: int, staging: Sequence[HostBuffer],
         seen: Seen | None = None) -> None:
    """Copies nbytes from source to target through staging (see the note above)."""
    _Pipeline(handle, source, target, nbytes, staging).run(seen)


class _Pipeline:
    """One copy's state: chunks not yet read, reads and writes in flight, free buffers."""

    def __init__(self, handle: IoHandle, source: End, target: End, nbytes: int, staging: Sequence[HostBuffer]):
        self.handle, self.source, self.target, self.nbytes, self.staging = handle, source, target, nbytes, staging
        self.chunk = min(b.nbytes for b in staging)
        self.positions = iter(range(0, nbytes, self.chunk))
        self.pending = next(self.positions, None)
        self.free: deque[int] = deque(range(len(staging)))
        self.reads: deque[tuple[int, int, IoFuture | None]] = deque()  # (position, buffer, read)
        self.writes: deque[tuple[int, IoFuture | None]] = deque()  # (buffer, write)
        self.depth = max(1, len(staging) // 2)

    def run(self, seen: Seen | None) -> None:
        """[Note: the write goes before the checksum]  A chunk, once read, is only read from: its write is
        submitted first, reads ahead are topped up with other buffers, and only then is it shown to seen,
        so the async-IO threads move bytes while the checksum runs (on its own thread: checkpoint/checksum.py)."""
        try:
            while self.pending is not None or self.reads:
                self._read_ahead(holding=None)
                pos, b, future = self.reads.popleft()
                if future is not None:
                    future.wait()
                view = self._view(b, pos)
                write = self.target.write(self.handle, view, pos)
                self.writes.append((b, write))
                self._read_ahead(holding=b)  # stops at b's write, so it is still the last one
                if seen is not None:
                    self.writes[-1] = (b, Joined([write, seen(view)]))
            while self.writes:
                _complete(self.writes.popleft())
        except BaseException:
            for future in [f for _, _, f in self.reads] + [f for _, f in self.writes]:
                if future is not None:
                    try:
                        future.wait()
                    except Exception:  # the first error is the one raised
                        pass
            raise

    def _view(self, b: int, pos: int) -> torch.Tensor:
        return self.staging[b].tensor[:min(self.chunk, self.nbytes - pos)]

    def _read_ahead(self, holding: int | None) -> None:
        """Starts reads up to depth ahead, into free buffers or ones whose write is done (never the buffer
        holding, still to be hashed); waits for the oldest write only when nothing else is in flight."""
        while self.pending is not None and len(self.reads) < self.depth:
            while self.writes and self.writes[0][0] != holding and \
                    (self.writes[0][1] is None or self.writes[0][1].done()):
                self.free.append(_complete(self.writes.popleft()))
            if not self.free:
                if self.reads or holding is not None:
                    return  # hand on (or hash) a chunk first
                self.free.append(_complete(self.writes.popleft()))
            b = self.free.popleft()
            self.reads.append((self.pending, b, self.source.read(self.handle, self._view(b, self.pending),
                                                                 self.pending)))
            self.pending = next(self.positions, None)


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

    def source(self) -> torch.Tensor:
        """The values as contiguous host memory (a compute-tier tensor: one host copy of it)."""
        values = self.tensor.detach().reshape(-1)
        return values if values.device.type == "cpu" and values.is_contiguous() else values.cpu().contiguous()

    def target(self) -> torch.Tensor:
        """Host memory to load into: the tensor itself when it is contiguous host memory, else a copy
        that `finish_load` puts in place."""
        t = self.tensor
        if t.device.type == "cpu" and t.is_contiguous():
            return t.detach().reshape(-1)
        return torch.empty(t.numel(), dtype=t.dtype)

    def finish_load(self, loaded: torch.Tensor) -> None:
        if loaded.data_ptr() != self.tensor.data_ptr():
            with torch.no_grad():
                self.tensor.copy_(loaded.view(self.tensor.shape))


@dataclass(frozen=True)
class SwapRange:
    """Bytes [byte_offset, byte_offset + nbytes) of partition key's swap extent."""

    key: str
    byte_offset: int
    nbytes: int


# One piece of a copy's far side: a range of a swap extent, or any other end with its byte count.
Piece = SwapRange | tuple[End, int]


class Swapped(Protocol):
    """The memory manager's side of a SwapPart (see MemoryManager.copy_out / copy_in)."""

    def copy_out(self, pieces: Sequence[Piece], target: AioFile, target_offset: int,
                 staging: Sequence[HostBuffer], seen: Seen | None = None) -> None: ...

    def copy_in(self, pieces: Sequence[Piece], source: AioFile, source_offset: int,
                staging: Sequence[HostBuffer], seen: Seen | None = None) -> None: ...


@dataclass(frozen=True)
class SwapPart:
    """Values in a swap file: bytes from byte_offset of partition key's extent, moved by its manager
    (with the manager's own async-IO handle) without ever being whole in memory."""

    manager: Swapped
    key: str
    byte_offset: int = 0


Part = HostPart | SwapPart


def _host_memory(part: Part) -> bool:
    return isinstance(part, HostPart) and part.tensor.device.type == "cpu" and part.tensor.is_contiguous()


def _runs(parts: Sequence[tuple[Part, int]], offset: int) -> Iterator[tuple[list[tuple[Part, int]], int]]:
    """The runs of consecutive parts one copy streams together, each with its file offset (parts lie end
    to end from offset on).

    [Note: one pipeline per file]  Each run ends the pipeline (its reads ahead drain), so runs are as
    long as they can be: every part of one memory manager, with the host tensors between them, goes in
    one run that the manager copies.  A run ends only at a second manager's part, or at a tensor that is
    not contiguous host memory (a CUDA parameter): that one goes with its own host copy, so only one such
    copy exists at a time."""
    run: list[tuple[Part, int]] = []
    owner: object = None  # the run's manager, or its tensor that needs a host copy
    pos = start = offset
    for part, n in parts:
        key = part.manager if isinstance(part, SwapPart) else None if _host_memory(part) else part
        if key is not None and owner is not None and key is not owner:
            yield run, start
            run, owner, start = [], None, pos
        run.append((part, n))
        owner = owner if key is None else key
        pos += n
    if run:
        yield run, start


def _manager(run: list[tuple[Part, int]]) -> Swapped | None:
    return next((p.manager for p, _ in run if isinstance(p, SwapPart)), None)


def save_parts(handle: IoHandle, parts: Sequence[tuple[Part, int]], file: AioFile, offset: int,
               staging: Sequence[HostBuffer], seen: Seen | None = None) -> None:
    """Writes each part's first nbytes (zero-padded) into file from offset on, end to end: each run
    (see _runs) in one pipelined copy, by its memory manager (MemoryManager.copy_out) when it holds swap
    parts, else through handle."""
    for items, pos in _runs(parts, offset):
        pieces: list[Piece] = [SwapRange(p.key, p.byte_offset, n) if isinstance(p, SwapPart)
                               else (TensorEnd(p.source()), n) for p, n in items]
        manager = _manager(items)
        if manager is not None:
            manager.copy_out(pieces, file, pos, staging, seen)
        else:
            chain = Chain(tuple(pieces))  # type: ignore[arg-type]  (no SwapRange without a manager)
            copy(handle, chain, FileEnd(file, pos), chain.nbytes, staging, seen)


def load_parts(handle: IoHandle, parts: Sequence[tuple[Part, int]], file: AioFile, offset: int,
               staging: Sequence[HostBuffer], seen: Seen | None = None) -> None:
    """The reverse of save_parts: file's bytes from offset on into each part (its padding dropped)."""
    for items, pos in _runs(parts, offset):
        targets = [(p, p.target() if isinstance(p, HostPart) else None) for p, _ in items]
        pieces: list[Piece] = [SwapRange(p.key, p.byte_offset, n) if isinstance(p, SwapPart)
                               else (TensorEnd(t), n) for (p, t), (_, n) in zip(targets, items)]
        manager = _manager(items)
        if manager is not None:
            manager.copy_in(pieces, file, pos, staging, seen)
        else:
            chain = Chain(tuple(pieces))  # type: ignore[arg-type]
            copy(handle, FileEnd(file, pos), chain, chain.nbytes, staging, seen)
        for p, t in targets:
            if isinstance(p, HostPart):
                p.finish_load(t)

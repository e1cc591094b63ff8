"""Swap integrity: a crc32c of every range written into a swap extent, taken from the host buffer as the
write is submitted, and checked against the bytes of every later read of it (a whole extent's read, and
the streamed copies of checkpoints).  A mismatch is a SwapChecksumError naming the file, the offset and
the partition; the memory manager latches it, so the run stops instead of training on wrong values.

[Note: what is checksummed]  A write covers whole 4096-byte blocks (O_DIRECT; write_part pads with
zeros), but only the partition's real bytes are checksummed: [offset, min(offset + length, nbytes)) of
its extent, where nbytes is the partition's size.  A read of the partition returns at least those bytes
(a pooled buffer reads nbytes, a kept copy its whole blocks).  A write drops the records of every range
it overlaps (its padding overwrote theirs), so what is recorded always describes the file as it is.
A range written and never read is never checked; one read in part (a checkpoint of part of an extent)
is checked only where a recorded range lies wholly inside what was read.

[Note: the cost, off the training thread]  crc32c runs at several GB/s on one core (SSE 4.2) and
releases the GIL on large buffers.  A swap transfer's checksum runs on the Checksums' own worker thread,
beside the transfer: a write's from the buffer as the write is submitted (the buffer is left unchanged
until the write completes anyway), a read's as soon as the read completes (the worker waits for it).  The
transfer's future is the transfer and its checksum joined (`joined`), so whoever waits for the transfer
(a flush, finish_read) also waits for its checksum and gets a mismatch as the transfer's error; a read
ahead is verified while the training thread computes.  The streamed copies of checkpoints check on the
copy's own thread, chunk by chunk.  The cost on a training step is measured by benchmarks/swap_checksum.py
(docs/benchmarks.md); the top-level config key "swap_checksum": false turns it off (Integrity.NONE).
"""
from __future__ import annotations

import bisect
import enum
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import crc32c
import torch

from infinity.errors import SwapChecksumError
from infinity.io.handle import IoFuture
from infinity.memory.nvme_store import Extent


class Integrity(enum.Enum):
    """Whether swap transfers are checksummed."""

    CRC32C = "crc32c"  # every write's real bytes checksummed at submit, every read checked at completion
    NONE = "none"  # no checksum: a byte changed on the drive goes unnoticed


@dataclass(frozen=True)
class Written:
    """The crc32c of bytes [offset, offset + nbytes) of an extent, as last written."""

    offset: int
    nbytes: int
    crc: int


def crc_of(data: torch.Tensor, value: int = 0) -> int:
    """crc32c of a contiguous host uint8 tensor's bytes, continuing from value."""
    return crc32c.crc32c(data.numpy(), value=value) if data.numel() else value


class Checksums:
    """The written ranges of every partition of one memory manager, with their crc32c (see the notes above)."""

    def __init__(self, integrity: Integrity = Integrity.CRC32C):
        self.integrity = integrity
        self._written: dict[str, list[Written]] = {}
        self._cuts: dict[str, list[int]] = {}  # a base's views' bounds ([Note: a partition inside another])
        self._lock = threading.Lock()
        self._worker: ThreadPoolExecutor | None = None  # started at the first transfer (see the note above)

    def writing(self, key: str, extent: Extent, byte_offset: int, data: torch.Tensor) -> Checked | None:
        """data (uint8, host) is being written at byte_offset of key's extent: its checksum, computed on the
        worker and recorded when done (None when checksums are off).  Ranges it overlaps are dropped now."""
        if not self.enabled:
            return None
        self._replace(key, byte_offset, data.numel(), None)
        return Checked(self._pool().submit(self.wrote, key, extent, byte_offset, data))

    def reading(self, key: str, extent: Extent, read: IoFuture, data: torch.Tensor, at: int = 0,
                name: str | None = None) -> Checked | None:
        """data (uint8, host) is being read from byte at of key's extent by read: the worker waits for it,
        then checks it (`check`; a mismatch names the partition name, key's own by default); None when
        checksums are off."""
        if not self.enabled:
            return None

        def verify() -> None:
            read.wait()
            self.check(key, extent, data, at, name)
        return Checked(self._pool().submit(verify))

    def cut(self, key: str, bounds: Iterable[int]) -> None:
        """Writes into key's extent record one range per piece between bounds (a view's start and end, memory/
        views.py), so that a read of just one piece finds its range recorded whole."""
        cuts = self._cuts.setdefault(key, [])
        for b in bounds:  # kept sorted as they come (one view at a time, thousands of them at start-up)
            at = bisect.bisect_left(cuts, b)
            if at == len(cuts) or cuts[at] != b:
                cuts.insert(at, b)

    def forget(self, key: str) -> None:
        """key's extent is no longer read (its partition moved into another's): its records go."""
        with self._lock:
            self._written.pop(key, None)

    def close(self) -> None:
        """Stops the worker (after what it was given)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infinity-swap-crc")
            return self._worker

    @property
    def enabled(self) -> bool:
        return self.integrity is Integrity.CRC32C

    def wrote(self, key: str, extent: Extent, byte_offset: int, data: torch.Tensor) -> None:
        """data (uint8, host) is about to be written at byte_offset of key's extent."""
        if not self.enabled:
            return
        real = max(0, min(data.numel(), extent.nbytes - byte_offset))
        cuts = self._cuts.get(key, [])
        pieces = cuts[bisect.bisect_right(cuts, byte_offset):bisect.bisect_left(cuts, byte_offset + real)]
        edges = [byte_offset] + pieces + [byte_offset + real]
        written = [Written(a, b - a, crc_of(data[a - byte_offset:b - byte_offset])) for a, b in zip(edges, edges[1:])]
        with self._lock:
            kept = [w for w in self._written.get(key, ()) if w.offset + w.nbytes <= byte_offset
                    or w.offset >= byte_offset + data.numel()]
            self._written[key] = kept + [w for w in written if w.nbytes]

    def check(self, key: str, extent: Extent, data: torch.Tensor, at: int = 0, name: str | None = None) -> None:
        """data (uint8, host) was just read from key's extent, from byte at: every recorded range inside
        it must match."""
        if not self.enabled:
            return
        with self._lock:
            ranges = list(self._written.get(key, ()))
        for w in ranges:
            if w.offset >= at and w.offset + w.nbytes <= at + data.numel():
                found = crc_of(data[w.offset - at:w.offset - at + w.nbytes])
                if found != w.crc:
                    raise mismatch(name or key, extent, w, found)

    def verifier(self, ranges: Iterable[tuple[int, str, Extent, int, int]]) -> Callable[[torch.Tensor], None]:
        """For a streamed read: ranges are (position in the stream, key, extent, byte_offset, nbytes) of
        the extents' bytes it carries; the callable, shown the stream's chunks in order, checks every
        recorded range that the stream carries whole, in order (a checkpoint carries a sub-group's extent
        as one range per parameter: a recorded range may span several)."""
        by_key: dict[str, list[tuple[int, int, int]]] = {}
        extents: dict[str, Extent] = {}
        for start, key, extent, offset, nbytes in ranges if self.enabled else ():
            by_key.setdefault(key, []).append((offset, nbytes, start))
            extents[key] = extent
        windows = []
        for key, carried in by_key.items():
            with self._lock:
                recorded = list(self._written.get(key, ()))
            for w in recorded:
                segments = _segments(w, sorted(carried))
                if segments is not None:
                    windows.append(Window(segments, _checker(key, extents[key], w)))
        return Windows(windows)

    def recorder(self, ranges: Iterable[tuple[int, str, Extent, int, int]]) -> Callable[[torch.Tensor], None]:
        """For a streamed write into the ranges (as in `verifier`): the callable, shown the chunks in order,
        records each range's checksum once its last byte has passed."""
        windows = []
        for start, key, extent, offset, nbytes in ranges if self.enabled else ():
            real = max(0, min(nbytes, extent.nbytes - offset))
            self._replace(key, offset, nbytes, None)
            windows.append(Window(((start, real),), _recording(self, key, offset, real)))
        return Windows(windows)

    def _replace(self, key: str, offset: int, nbytes: int, new: Written | None) -> None:
        """Drops the ranges of key that [offset, offset + nbytes) overlaps, then records new."""
        with self._lock:
            kept = [w for w in self._written.get(key, ()) if w.offset + w.nbytes <= offset
                    or w.offset >= offset + nbytes]
            self._written[key] = kept + ([new] if new is not None and new.nbytes else [])


class Checked:
    """A checksum computed or checked on the worker, as an IoFuture (done / wait: its error raised)."""

    def __init__(self, future: Future[None]):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> int:
        self._future.result()
        return 0


class Joined:
    """A transfer and its checksum as one IoFuture: done when both are; wait() waits for both, then raises
    the transfer's error, else the checksum's (a SwapChecksumError), else returns the bytes moved."""

    def __init__(self, transfer: IoFuture, checked: Checked):
        self.transfer, self.checked = transfer, checked

    def done(self) -> bool:
        """[Note: the check first]  A read's check waits for the read on the worker thread; a future's done()
        is not safe while another thread completes it (the native engine releases the request).  Once the
        check is done the read is finished and its done() answers from Python alone."""
        return self.checked.done() and self.transfer.done()

    def wait(self) -> int:
        try:
            moved = self.transfer.wait()
        finally:
            try:
                self.checked.wait()
            except Exception:
                pass  # the transfer's own error comes first, raised above; a checked failure is raised below
        self.checked.wait()
        return moved


def joined(transfer: IoFuture, checked: Checked | None) -> IoFuture:
    """transfer, with its checksum when there is one."""
    return transfer if checked is None else Joined(transfer, checked)


def mismatch(key: str, extent: Extent, w: Written, found: int) -> SwapChecksumError:
    return SwapChecksumError(extent.path, extent.offset + w.offset, w.nbytes, key, w.crc, found)


def _checker(key: str, extent: Extent, w: Written) -> Callable[[int], None]:
    def check(found: int) -> None:
        if found != w.crc:
            raise mismatch(key, extent, w, found)
    return check


def _recording(checksums: Checksums, key: str, offset: int, nbytes: int) -> Callable[[int], None]:
    def record(crc: int) -> None:
        checksums._replace(key, offset, nbytes, Written(offset, nbytes, crc))
    return record


def _segments(w: Written, carried: list[tuple[int, int, int]]) -> tuple[tuple[int, int], ...] | None:
    """The stream's (position, length) pieces that carry w's bytes, in w's order; None unless they carry
    all of them, in increasing stream order."""
    segments, covered, end = [], 0, w.offset + w.nbytes
    for offset, nbytes, start in carried:  # sorted by offset
        lo, hi = max(offset, w.offset), min(offset + nbytes, end)
        if lo < hi:
            segments.append((start + lo - offset, hi - lo))
            covered += hi - lo
    ordered = all(a[0] + a[1] <= b[0] for a, b in zip(segments, segments[1:]))
    return tuple(segments) if covered == w.nbytes and ordered and segments else None


@dataclass
class Window:
    """Pieces (position, length) of a stream, in order, whose bytes' crc32c goes to done."""

    segments: tuple[tuple[int, int], ...]
    done: Callable[[int], None]
    crc: int = 0
    left: int = -1

    def __post_init__(self) -> None:
        self.left = sum(n for _, n in self.segments)


class Windows:
    """Feeds a stream's chunks, in order, to the crc32c of each window (windows may interleave)."""

    def __init__(self, windows: list[Window]):
        self._segments = sorted(((start, n, w) for w in windows for start, n in w.segments), key=lambda s: s[0])
        self._i, self._pos = 0, 0
        for w in windows:
            if not w.left:
                w.done(0)

    def __call__(self, chunk: torch.Tensor) -> None:
        lo, hi = self._pos, self._pos + chunk.numel()
        while self._i < len(self._segments) and self._segments[self._i][0] < hi:
            start, n, w = self._segments[self._i]
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                w.crc = crc_of(chunk[a - lo:b - lo], w.crc)
                w.left -= b - a
                if not w.left:
                    w.done(w.crc)
            if start + n > hi:
                break
            self._i += 1
        self._pos = hi

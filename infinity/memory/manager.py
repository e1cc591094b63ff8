"""The tiered memory manager: the only code that moves bytes between NVMe, host buffers and the compute tier,
and the only code that changes a partition's transfer state (its record: infinity/memory/record.py).

A partition's bytes live in an NVMe extent.  To use them, the manager borrows a host buffer from the
partition's pool, reads the extent into it (READING -> HOST_CLEAN), and either hands out a typed view
of that buffer (host work such as the optimizer step: `start_read` / `finish_read`) or places it on the
compute tier (ON_COMPUTE), which its ComputeTier does: a copy on CUDA, on CPU possibly the buffer itself.

Parameters go through five verbs that take a key and decide from its state what to do, so no caller
reads a state to choose a verb: `fetch` starts the read if one is needed and returns a `Fetch` handle
(`ready()`, `wait()` -> the compute copy); `cancel` gives up a fetch nobody will use; `release` forgets
the compute copy; `keep` gives a compute copy kept beyond its use one of its own; `write` takes new
values.  The policies that shape them (infinity/memory/policy.py) are set once: `lend_to_compute`,
`cache_host_copies` (max_in_cpu), and CopyAhead from the compute device (`advance`).

New values of other partitions come in through `stage` (HOST_DIRTY) and go out through `start_write`
(WRITING -> HOST_CLEAN); `drop` returns the buffer.  A kept host copy (HostCache) is written through:
host and NVMe hold the same bytes whenever nothing is in flight.

[Note: an extent never written reads as zeros]
Extents are laid out at the end of a swap file this run created (nvme_store.py), so until something is
written into one it holds zeros.  A read of such a partition (Adam's moments at the first step, a gradient
file no parameter wrote) zeroes the borrowed buffer instead of asking for them: 8 bytes per parameter
fewer requested at an fp32 AdamW model's first step.  (The drive was not read for them before either: the
files are fallocated, and the kernel answers a read of space never written with zeros; what goes is the
requests and the kernel's zero-filling, docs/benchmarks.md "Step time against DeepSpeed".)  Every write
into an extent (`_submit`, and `copy_in` from a checkpoint) marks its entry written first, so a
partition's bytes never come from the zeroing once the file could hold anything else.

[Note: why this module is over 400 lines]  It is the one place that drives the state table: the compute
tier (compute_tier.py), pending writes (writes.py) and the per-partition entry (entry.py) live apart, but
every verb that moves a partition between states stays here, so that no other module reads a state to
choose what to do next.  Views (a partition that is a range of another's extent: views.py keeps who is
whose and states the rules) are kept consistent here for the same reason: their reads and writes are
these verbs' own, with the base's state deciding.

Any error in a transfer, at submit or at completion, latches: from then on every call that moves
bytes raises EngineFailed naming the first error (`fail` latches one from outside, such as an
optimizer step stopped midway).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import torch

from infinity import metrics
from infinity.errors import EngineFailed, InfinityError, SwapChecksumError
from infinity.io.files import AioFile
from infinity.io.handle import IoFuture, IoHandle
from infinity.io.align import round_up
from infinity.memory.compute_tier import ComputeTier
from infinity.memory.entry import Entry, Slot
from infinity.memory.host_buffer import HostBuffer
from infinity.memory.integrity import Checksums, Integrity, joined
from infinity.memory.nvme_store import ALIGNMENT, Extent, NvmeStore, whole_blocks
from infinity.memory.record import Record, State
from infinity.memory.policy import AfterWrite, CacheBudget, ComputeCopy, CopyAhead, HostCache, Origin
from infinity.memory.pool import BufferPool
from infinity.memory.report import TierLedger
from infinity.memory.stream import Chain, FileEnd, Piece, Seen, SwapRange, copy
from infinity.memory.views import Views
from infinity.memory.writes import PendingWrites, Staging

log = logging.getLogger("infinity.memory")


class MemoryManager:
    def __init__(self, handle: IoHandle, store: NvmeStore, compute_device: torch.device,
                 integrity: Integrity = Integrity.CRC32C):
        self.handle, self.store = handle, store
        self.checksums = Checksums(integrity)  # every write's crc32c, checked at every read (integrity.py)
        self.ledger = TierLedger()
        self._entries: dict[str, Entry] = {}
        self._failure: BaseException | None = None
        self._writes = PendingWrites(self.ledger, self.fail)
        self.compute = ComputeTier(compute_device, self.ledger)
        self._views = Views()

    @property
    def device(self) -> torch.device:
        return self.compute.device

    @device.setter
    def device(self, device: torch.device) -> None:
        """The compute device, where zero.Init opened the manager before the engine knew it."""
        self.compute = ComputeTier(device, self.ledger)

    # ---- registration ------------------------------------------------------
    def add(self, key: str, numel: int, dtype: torch.dtype, region: str, pool: BufferPool) -> Record:
        size = torch.empty(0, dtype=dtype).element_size()
        extent = self.store.allocate(key, numel * size, region)
        record = Record(key, numel, size)
        self._entries[key] = Entry(record, extent, dtype, pool, kind=metrics.kind_of_region(region) or "other")
        self.ledger.add("nvme", extent.nbytes)
        return record

    def share(self, key: str, base: str, byte_offset: int, numel: int, dtype: torch.dtype,
              pool: BufferPool) -> Record:
        """From now on key's numel elements are bytes [byte_offset, ...) of base's extent ([Note: a partition
        inside another] in views.py): a new partition, or one with an extent of its own (zero.Init's, whose
        values the base must already hold), which must be at rest.  Its host copies come from pool."""
        b = self._entry(base)
        size = torch.empty(0, dtype=dtype).element_size()
        nbytes = numel * size
        if b.base is not None or dtype != b.dtype or byte_offset % ALIGNMENT \
                or byte_offset + whole_blocks(nbytes) > b.extent.capacity:
            raise InfinityError(f"partition {key!r} cannot be bytes [{byte_offset}, {byte_offset + nbytes}) of "
                                f"{base!r} ({b.extent.capacity} bytes of {b.dtype})")
        extent = Extent(b.extent.path, b.extent.offset + byte_offset, nbytes, whole_blocks(nbytes))
        if key in self._entries:
            e = self._entries[key]
            self.flush({key})
            if e.record.numel != numel or e.record.state not in (State.ON_NVME, State.HOST_CLEAN) \
                    or (e.slot is not None and not e.kept):
                raise InfinityError(f"partition {key!r} ({e.record.numel} elements, {e.record.state.value}) "
                                    f"cannot move into {base!r} now")
            self.checksums.forget(key)
            if self.store.give_back(e.extent):  # its own extent is read no more: the drive gets it back
                self.ledger.add("nvme", -e.extent.nbytes)
            e.extent, e.pool = extent, pool
        else:
            e = self._entries[key] = Entry(Record(key, numel, size), extent, dtype, pool, kind="param")
        e.base, e.base_offset = base, byte_offset
        self._views.add(key, base)
        self.checksums.cut(base, (byte_offset, byte_offset + nbytes))
        return e.record

    def follow(self, key: str, source: str, byte_offset: int) -> None:
        """key's values are source's elements from byte_offset on, converted to key's dtype ([Note: a
        follower] in views.py): while source holds a complete host copy and key has no values of its own,
        key's reads convert from that copy instead of reading key's extent, which is still written."""
        e, src = self._entry(key), self._entry(source)
        size = src.record.element_size
        if src.base is not None or byte_offset % size or byte_offset + e.record.numel * size > src.extent.nbytes:
            raise InfinityError(f"partition {key!r} ({e.record.numel} elements) cannot follow bytes from "
                                f"{byte_offset} of {source!r} ({src.extent.nbytes} bytes)")
        e.follows, e.follows_offset = source, byte_offset

    def extent(self, key: str) -> Extent:
        """Where key's bytes lie (for a view, its range of the base's file)."""
        return self._entry(key).extent

    def base_of(self, key: str) -> str | None:
        """The partition whose extent holds key's bytes (`share`), or None when key has an extent of its own."""
        return self._entry(key).base

    def use_pool(self, key: str, pool: BufferPool) -> None:
        """From now on key's host copies come from pool (zero.Init wrote it through a staging pool)."""
        e = self._entry(key)
        if e.slot is not None:
            raise InfinityError(f"partition {key!r} holds a buffer of pool {e.pool.name!r}; it cannot change pools now")
        e.pool = pool

    def state(self, key: str) -> State:
        return self._entry(key).record.state  # type: ignore[return-value]  # the manager's records have one

    def record(self, key: str) -> Record:
        """key's record: its transfer state (the manager moves it) and its residency (residency.py's verbs)."""
        return self._entry(key).record

    # ---- NVMe -> host -> compute -------------------------------------------
    def start_read(self, key: str, timeout: float | None = None) -> None:
        """Borrows a host buffer and starts reading the partition into it (a partition never written:
        zeroes it instead, [Note: an extent never written reads as zeros])."""
        self.check_healthy()
        self.flush({key})  # the engine does not order requests: a read must not overtake a write
        e = self._entry(key)
        e.record.move_to(State.READING)
        e.slot = self._borrow(e, timeout)
        newest = self._base_copy(e)
        if newest is not None:  # [Note: a partition inside another], rule 2
            e.future = Done(self._fill(e, newest))
            return
        if not self._origin(e).written:
            e.future = Done(self._host_bytes(e).zero_().numel())
            return
        e.future = self._submit(True, self._host_bytes(e), e, 0)  # a base being read, too, is no conflict

    def ready(self, key: str) -> bool:
        """The host copy is there, or its read has completed (finish_read will not wait)."""
        e = self._entry(key)
        if e.record.state is State.READING:
            return e.future is not None and e.future.done()
        return e.record.state in (State.HOST_CLEAN, State.HOST_DIRTY, State.ON_COMPUTE)

    def finish_read(self, key: str) -> torch.Tensor:
        """Waits for the read; returns the host copy as a tensor of the partition's dtype."""
        e = self._entry(key)
        self._settle(e, State.HOST_CLEAN, State.ON_NVME, "read")
        return self.host_view(key)

    def host_view(self, key: str) -> torch.Tensor:
        e = self._entry(key)
        if e.slot is None:
            raise InfinityError(f"partition {key!r} has no host copy (state {e.record.state.value})")
        return e.slot.buffer.view(e.dtype, e.record.numel)

    # ---- parameters: the verbs that decide from the state -------------------------
    def cache_host_copies(self, keys: Iterable[str], policy: HostCache) -> None:
        """keys keep their host copies under policy's budget, decided at each one's first fetch."""
        budget = CacheBudget(policy)
        for key in keys:
            self._entry(key).cache = budget

    def lend_to_compute(self, pool: BufferPool, reserve: int) -> None:
        """On a CPU compute tier, to_compute may lend up to pool.buffer_count - reserve of pool's buffers as
        compute copies instead of copying (infinity/memory/compute_tier.py).  Elsewhere nothing changes."""
        self.compute.allow_lending(pool, reserve)

    def fetch(self, key: str) -> Fetch:
        """Starts moving key towards the compute tier: a read, unless its host copy is there or on its way."""
        e = self._entry(key)
        if e.record.state is State.ON_NVME:
            if not e.fetched:  # [Note: max_in_cpu] in policy.py: decided at the first read
                e.fetched = True
                e.kept = e.cache is not None and e.cache.take(e.record.numel)
            self.start_read(key)
        return Fetch(self, key)

    def _arrive(self, key: str) -> torch.Tensor:
        """The compute copy of key, waiting for what is in flight (a kept copy's write-through first)."""
        if self.state(key) is State.WRITING:
            self.flush({key})
        if self.state(key) is State.ON_NVME:
            self.fetch(key)
        if self.state(key) is State.READING:
            self.finish_read(key)
        return self.to_compute(key)

    def cancel(self, key: str) -> None:
        """A fetch nobody will use: its read completes and its buffer goes back (a kept copy stays)."""
        e = self._entry(key)
        if e.record.state is State.READING:
            self.finish_read(key)
        if e.record.state is State.HOST_CLEAN and not e.kept:
            self.drop(key)

    def advance(self, key: str) -> bool:
        """Under CopyAhead.SIDE_STREAM (CUDA), issues the copy of a partition whose read has completed to
        the device now, so to_compute later finds it there; False (nothing started) otherwise, or if the
        read is still in flight."""
        e = self._entry(key)
        if self.compute.copy_ahead is CopyAhead.NONE or e.arriving is not None or not self.ready(key):
            return False
        if e.record.state is State.READING:
            self._settle(e, State.HOST_CLEAN, State.ON_NVME, "read")
        if e.record.state is not State.HOST_CLEAN:
            return False
        return self.compute.start(e, self.host_view(key))

    def write(self, key: str, values: torch.Tensor, after: AfterWrite, dtype: torch.dtype,
              origin: Origin = Origin.OWN) -> None:
        """New values for key (converted to dtype as they are copied).  A kept copy, or one to hold
        (AfterWrite.HOLD) that fits a buffer, is updated and written through (`_write_held`); other values
        go straight to NVMe through a staging buffer of key's pool (`write_part`).  `flush` completes it."""
        e = self._entry(key)
        if e.kept or (after is AfterWrite.HOLD and e.pool.buffer_bytes >= e.extent.capacity):
            self._write_held(e, values)
        else:
            self.write_part(key, 0, values, staging=e.pool, dtype=dtype)
        e.diverged = origin is Origin.OWN  # [Note: a follower]: the step's values follow again, others do not

    def updated(self, key: str, values: torch.Tensor, after: AfterWrite) -> None:
        """key is a view whose base's owner has written values (key's, padded or not) into the base
        ([Note: a partition inside another], rule 4): a kept host copy takes them, and one to hold
        (AfterWrite.HOLD) that fits a buffer gets a host copy of them, as a completed read; nothing is written."""
        e = self._entry(key)
        if e.base is None:
            raise InfinityError(f"partition {key!r} is not part of another; its new values must be written")
        if e.record.state not in (State.ON_NVME, State.HOST_CLEAN):
            raise InfinityError(f"partition {key!r} is {e.record.state.value}; new values need it at rest")
        if e.slot is not None:
            self._fill(e, values)
        elif e.kept or (after is AfterWrite.HOLD and e.pool.buffer_bytes >= e.extent.capacity):
            e.record.move_to(State.READING)
            e.slot = self._borrow(e, None)
            e.future = Done(self._fill(e, values))

    def _write_held(self, e: Entry, values: torch.Tensor) -> None:
        """New values into e's host copy (HOST_DIRTY), written from there (WRITING); `flush` completes the
        write (HOST_CLEAN).  A kept partition uses its own buffer; another one, which must be on NVMe,
        borrows one from its pool and holds it, like a completed read, until `drop` or a use."""
        key = e.record.key
        self.check_healthy()
        self.flush({key})
        if e.record.state not in ((State.ON_NVME, State.HOST_CLEAN) if e.kept else (State.ON_NVME,)):
            raise InfinityError(f"partition {key!r} is {e.record.state.value}; holding new values needs a kept "
                                f"partition at rest or one on NVMe")
        self.stage(key, values.reshape(-1)[: e.record.numel])
        self._into_base(e, 0, values.reshape(-1)[: e.record.numel])
        e.record.move_to(State.WRITING)
        e.future = self._submit(False, e.slot.buffer.tensor[: e.extent.capacity], e, 0)  # type: ignore[union-attr]
        self._writes.add(e, e.future, None)

    def kept(self, key: str) -> bool:
        """Whether key keeps its host copy between uses (HostCache)."""
        return self._entry(key).kept

    # ---- host -> compute ----------------------------------------------------------
    def to_compute(self, key: str) -> torch.Tensor:
        """The partition on the compute tier: a copy of its host copy (the host buffer goes back, a kept
        one stays), or on CPU the host buffer itself, lent until release."""
        self.check_healthy()
        e = self._entry(key)
        lent = self.compute.place(e, self.host_view(key)) is ComputeCopy.LENT
        e.record.move_to(State.ON_COMPUTE)
        if lent:
            self.ledger.add("host", -e.extent.nbytes)  # the buffer's bytes count as the compute tier's now
        elif not e.kept:
            self._give_back(e)
        self.ledger.add("compute", e.extent.nbytes)
        return e.compute  # type: ignore[return-value]

    def lent(self, key: str) -> bool:
        """Whether key's compute copy is its staging buffer, lent (to_compute on CPU)."""
        return self._entry(key).copy is ComputeCopy.LENT

    def keep(self, key: str) -> torch.Tensor:
        """A partition kept on the compute tier beyond its use whose compute copy is a lent buffer gets a copy
        of its own, and the buffer goes back (replaced if a tensor outside still views it).  Returns the
        compute copy (unchanged if it was not lent).  The caller drops its own views of the old one first,
        so that they are not taken for views outside."""
        e = self._entry(key)
        if self.compute.own_copy(e):
            self._give_back(e)
        return e.compute  # type: ignore[return-value]

    def release(self, key: str) -> None:
        """Forgets the compute copy; the NVMe extent (and a kept host copy) still hold the values.  A lent
        buffer goes back to its pool (or, if tensors outside still view it, is replaced there)."""
        e = self._entry(key)
        if self.compute.drop(e):
            e.record.move_to(State.ON_NVME)
            self._give_back(e)
            return
        e.record.move_to(State.HOST_CLEAN if e.slot is not None else State.ON_NVME)

    # ---- host -> NVMe ------------------------------------------------------
    def stage(self, key: str, values: torch.Tensor | None = None, timeout: float | None = None) -> torch.Tensor:
        """Marks the host copy as newer than NVMe; with values, first copies them into a borrowed buffer."""
        e = self._entry(key)
        self.compute.forget_arriving(e)
        e.diverged = True  # new values of its own ([Note: a follower]); `write` says when they are the source's
        if values is not None and e.slot is None:
            e.slot = self._borrow(e, timeout)
        e.record.move_to(State.HOST_DIRTY)
        view = self.host_view(key)
        if values is not None:
            view.copy_(values.reshape(-1))
        return view

    def start_write(self, key: str) -> None:
        self.check_healthy()
        if self._views.views_of(key):
            self.flush({key})  # a view's own write must not land after the base's (views.py, rule 3)
        e = self._entry(key)
        e.record.move_to(State.WRITING)
        e.future = self._submit(False, self._host_bytes(e), e, 0)

    def finish_write(self, key: str) -> None:
        self._settle(self._entry(key), State.HOST_CLEAN, State.HOST_DIRTY, "write")

    def drop(self, key: str) -> None:
        """Gives back the host buffer of a clean partition (no write: NVMe already holds it)."""
        e = self._entry(key)
        e.record.move_to(State.ON_NVME)
        self.compute.forget_arriving(e)
        self._give_back(e)

    def write_through(self, key: str, values: torch.Tensor) -> None:
        """Stages values, writes them and drops the buffer: for initial values."""
        self.stage(key, values)
        self.start_write(key)
        self.finish_write(key)
        self.drop(key)

    # ---- writes into a partition that stays on NVMe ----------------------------
    def write_part(self, key: str, byte_offset: int, values: torch.Tensor, staging: BufferPool,
                   dtype: torch.dtype | None = None, copy: Staging = Staging.WHEN_NEEDED) -> None:
        """Writes values (converted to dtype, if given) into key's extent at byte_offset, padded with zeros
        to the next 4096 bytes.  The write is left in flight: `flush` (or a read of key) completes it, and
        a borrow from a full staging pool completes that pool's oldest write first.

        Values that are aligned host memory of whole blocks in the stored dtype are written in place (the
        caller keeps them unchanged until `flush`), unless copy is Staging.ALWAYS; others are copied, and
        converted in the same pass, into a buffer borrowed from staging.  The partition must be on NVMe: a
        host copy would silently go stale.
        """
        stored = dtype or values.dtype
        self.check_healthy()
        e = self._entry(key)
        if e.record.state is not State.ON_NVME:
            raise InfinityError(f"partition {key!r} is {e.record.state.value}; write_part needs it on NVMe")
        nbytes = values.numel() * torch.empty(0, dtype=stored).element_size()
        length = min(round_up(nbytes, ALIGNMENT), e.extent.capacity - byte_offset)
        if nbytes > length or byte_offset % ALIGNMENT:
            raise InfinityError(f"write_part of {nbytes} bytes at {byte_offset} does not fit partition {key!r}")
        flat = values.detach().reshape(-1)
        e.diverged = True  # values of its own ([Note: a follower]); `write` says when they are the source's
        if e.base is not None:
            self._into_base(e, byte_offset, flat.to(stored))
        slot = None
        if copy is Staging.WHEN_NEEDED and flat.device.type == "cpu" and flat.is_contiguous() \
                and flat.data_ptr() % ALIGNMENT == 0 and nbytes == length and flat.dtype == stored:
            source = flat.view(torch.uint8)
        else:
            slot = self._writes.borrow(staging, length)
            source = slot.buffer.tensor[:length]
            source[nbytes:].zero_()
            source[:nbytes].view(stored).copy_(flat)
        self._writes.add(e, self._submit(False, source, e, byte_offset), slot)

    def flush(self, keys: set[str] | None = None) -> None:
        """Waits for write_part transfers and write-throughs (of keys and of their family, views.py; or all),
        giving back their buffers."""
        self._writes.flush(self._family(keys) if keys is not None else None)

    # ---- checkpoints: ranges of extents to or from another file -------------------
    def copy_out(self, pieces: Sequence[Piece], target: AioFile, target_offset: int,
                 staging: Sequence[HostBuffer], seen: Seen | None = None) -> None:
        """Copies the pieces (ranges of swap extents, and other ends such as host tensors between them) into
        target, end to end from target_offset, in one pipelined copy through staging (infinity.memory.stream);
        seen gets each chunk in order.  Each extent must hold the current values (on NVMe, or a clean host
        copy).  A failure here leaves the swap files as they were."""
        chain = self._chain(pieces)
        check = self.checksums.verifier(self._positions(pieces, chain))
        try:
            copy(self.handle, chain, FileEnd(target, target_offset), chain.nbytes, staging, _both(check, seen))
        except SwapChecksumError as err:
            self.fail(err)
            raise

    def copy_in(self, pieces: Sequence[Piece], source: AioFile, source_offset: int,
                staging: Sequence[HostBuffer], seen: Seen | None = None) -> None:
        """The reverse of copy_out; clean host copies are read again after.  A failure latches (extents
        half overwritten)."""
        try:
            chain = self._chain(pieces)
            for piece in pieces:
                if isinstance(piece, SwapRange):
                    self._origin(self._entry(piece.key)).written = True
                    self._entry(piece.key).diverged = True  # a checkpoint's values: its own
            record = self.checksums.recorder(self._positions(pieces, chain))
            copy(self.handle, FileEnd(source, source_offset), chain, chain.nbytes, staging, _both(record, seen))
            family = self._family({r.key for r in pieces if isinstance(r, SwapRange)})
            for e in (self._entries[k] for k in sorted(family)):
                if e.slot is not None and e.record.state is not State.READING:
                    data = self._host_bytes(e)
                    self.handle.pread(data, self.store.file(e.extent), e.extent.offset)
                    key, extent, at = self._checked_as(e, 0)
                    self.checksums.check(key, extent, data, at, e.record.key)
        except BaseException as err:
            self.fail(err)
            raise

    def _chain(self, pieces: Sequence[Piece]) -> Chain:
        """The pieces end to end: each swap range as its bytes in the swap file, checked to be at rest and
        aligned; other ends as they are."""
        self.check_healthy()
        ranges = [r for r in pieces if isinstance(r, SwapRange)]
        self.flush({r.key for r in ranges})
        ends = []
        for piece in pieces:
            if not isinstance(piece, SwapRange):
                ends.append(piece)
                continue
            key, byte_offset, nbytes = piece.key, piece.byte_offset, piece.nbytes
            e = self._entry(key)
            self._quiet_base(e)
            if e.record.state not in (State.ON_NVME, State.HOST_CLEAN):
                raise InfinityError(f"partition {key!r} is {e.record.state.value}; copies to or from a file "
                                    f"need it at rest (on NVMe or a clean host copy)")
            if byte_offset % ALIGNMENT or byte_offset < 0 or byte_offset + nbytes > e.extent.capacity:
                raise InfinityError(f"bytes [{byte_offset}, {byte_offset + nbytes}) are not an aligned range of "
                                    f"partition {key!r} ({e.extent.capacity} bytes)")
            ends.append((FileEnd(self.store.file(e.extent), e.extent.offset + byte_offset), nbytes))
        return Chain(tuple(ends))

    def _positions(self, pieces: Sequence[Piece], chain: Chain) -> list[tuple[int, str, Extent, int, int]]:
        """Each swap range of a copy with its position in the chain (for the checksums)."""
        return [(start, *self._checked_as(self._entry(p.key), p.byte_offset), p.nbytes)
                for p, start in zip(pieces, chain.starts) if isinstance(p, SwapRange)]

    # ---- health ------------------------------------------------------------
    def check_healthy(self) -> None:
        if self._failure is not None:
            raise EngineFailed.of(self._failure)

    def fail(self, cause: BaseException) -> None:
        """Latches cause (the first one stays): every later call that moves bytes raises EngineFailed."""
        if self._failure is None:
            self._failure = cause

    def close(self) -> None:
        try:
            self.flush()
        except InfinityError:
            pass
        for e in self._entries.values():
            if e.future is not None:
                try:
                    e.future.wait()
                except InfinityError:
                    pass
        self.checksums.close()
        self.store.close()
        metrics.unwatch(self.ledger)  # its swap files are gone: stop exporting its resident bytes

    # ---- internals ---------------------------------------------------------
    def _entry(self, key: str) -> Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise InfinityError(f"the memory manager has no partition {key!r}") from None

    def _submit(self, read: bool, source: torch.Tensor, e: Entry, byte_offset: int) -> IoFuture:
        """Starts a transfer of e's extent through the store's open file; an error here latches too."""
        submit = self.handle.submit_read if read else self.handle.submit_write
        extent = e.extent
        origin = self._origin(e)
        origin.written = origin.written or not read
        key, checked, at = self._checked_as(e, byte_offset)
        crc = None if read else self.checksums.writing(key, checked, at, source)  # beside the write
        try:
            transfer = submit(source, self._file(e), extent.offset + byte_offset)
        except InfinityError as err:
            if crc is not None:
                crc.wait()  # it reads source: done with it before the caller reuses it
            self.fail(err)
            raise
        if read:  # checked on the checksums' worker as soon as it completes (a whole extent from its start)
            crc = self.checksums.reading(key, checked, transfer, source, at, e.record.key) if byte_offset == 0 else None
        return joined(transfer, crc)

    # ---- [Note: a partition inside another] (views.py) ----------------------------
    def _family(self, keys: set[str]) -> set[str]:
        """keys with what overlaps their bytes (rule 3): a view's base, a base's views."""
        out = set(keys)
        for k in keys:
            e = self._entries.get(k)
            if e is not None and e.base is not None:
                out.add(e.base)
            else:
                out.update(self._views.views_of(k))
        return out

    def _origin(self, e: Entry) -> Entry:
        """The entry whose extent holds e's bytes: its base, or itself."""
        return self._entries[e.base] if e.base is not None else e

    def _file(self, e: Entry) -> AioFile:
        """The open file of e's transfers, labelled for metrics by e's kind when e is a view (a parameter)."""
        return self.store.file(e.extent) if e.base is None else self.store.labelled(e.extent, e.kind)

    def _checked_as(self, e: Entry, byte_offset: int) -> tuple[str, Extent, int]:
        """The key, extent and offset under which the checksums know byte_offset of e (rule 1)."""
        if e.base is None:
            return e.record.key, e.extent, byte_offset
        return e.base, self._entries[e.base].extent, e.base_offset + byte_offset

    def _base_copy(self, e: Entry) -> torch.Tensor | None:
        """e's values in its base's host copy, or its followed partition's while it has none of its own, when
        that holds one that is complete (rule 2; [Note: a follower]): a view's whole blocks, a follower's
        elements in the followed partition's dtype."""
        source = e.base if e.base is not None else (e.follows if not e.diverged else None)
        if source is None:
            return None
        b = self._entries[source]
        if b.slot is None or b.record.state is State.READING:
            return None
        if e.base is not None:
            return self._host_bytes(b)[e.base_offset:e.base_offset + e.extent.capacity].view(e.dtype)
        nbytes = e.record.numel * b.record.element_size
        return self._host_bytes(b)[e.follows_offset:e.follows_offset + nbytes].view(b.dtype)

    def _fill(self, e: Entry, values: torch.Tensor) -> int:
        """values (e's elements, then padding or nothing) into e's host copy, its padding zeroed; the bytes."""
        data = self._host_bytes(e)
        view = data[: data.numel() - data.numel() % e.record.element_size].view(e.dtype)
        n = min(values.numel(), view.numel())
        view[:n].copy_(values.reshape(-1)[:n])
        view[n:].zero_()
        return data.numel()

    def _quiet_base(self, e: Entry) -> None:
        """Waits for the transfer in flight of e's base, if any (its state stays: its owner completes it)."""
        if e.base is not None and self._entries[e.base].future is not None:
            self._entries[e.base].future.wait()  # type: ignore[union-attr]

    def _into_base(self, e: Entry, byte_offset: int, values: torch.Tensor) -> None:
        """A view's new values (at byte_offset of it) into its base's host copy too (rule 3)."""
        if e.base is None:
            return
        self._quiet_base(e)
        b = self._entries[e.base]
        if b.slot is not None:
            start = e.base_offset + byte_offset
            self._host_bytes(b)[start:start + values.numel() * values.element_size()].copy_(
                values.reshape(-1).view(torch.uint8))

    def _borrow(self, e: Entry, timeout: float | None) -> Slot:
        if e.kept:
            buffer = HostBuffer(e.extent.capacity, pin=e.pool.pin, zero=True)  # padding stays zero
            self.ledger.add("host", e.extent.nbytes)
            return Slot(None, -1, buffer)
        self._writes.make_room(e.pool)
        index, buffer = e.pool.acquire(e.extent.nbytes, timeout)
        self.ledger.add("host", e.extent.nbytes)
        return Slot(e.pool, index, buffer)

    def _give_back(self, e: Entry) -> None:
        """Returns the host buffer to its pool, or frees the partition's own kept one."""
        if e.slot is not None:
            if e.slot.pool is not None:
                e.slot.pool.release(e.slot.index)
            self.ledger.add("host", -e.extent.nbytes)
            e.slot = None

    def _host_bytes(self, e: Entry) -> torch.Tensor:
        """The bytes a transfer of e moves: the partition's, or for a kept copy its whole blocks.

        [Note: kept copies move whole blocks]  A transfer shorter than a block goes through the page
        cache (native/src/aio.c).  A buffered write in flight beside an O_DIRECT write to a neighbouring
        extent of the same file can be lost: the page cache's folio may span both, and the kernel then
        fails to invalidate it ("Page cache invalidation failure on direct I/O" in dmesg; seen here with
        a kept copy's write of a 768-byte bias beside its 48 KiB weight).  write_part pads to whole blocks for
        this reason, and a kept copy, whose buffer is its extent's capacity, does the same."""
        if e.slot is None:
            raise InfinityError(f"partition {e.record.key!r} has no host buffer to transfer")
        whole = e.slot.pool is None or e.base is not None  # a view moves whole blocks of its base's file too
        return e.slot.buffer.tensor[: e.extent.capacity if whole else e.extent.nbytes]

    def _settle(self, e: Entry, ok: State, failed: State, what: str) -> None:
        future, e.future = e.future, None
        if future is None:
            raise InfinityError(f"partition {e.record.key!r}: no {what} in flight")
        try:
            future.wait()  # a read's future includes its check against the checksums (integrity.py)
        except InfinityError as err:
            self.fail(err)
            e.record.move_to(failed)
            if failed is State.ON_NVME:
                self._give_back(e)
            raise
        e.record.move_to(ok)


class Done:
    """The finished "read" of a partition whose host buffer was filled without one: zeroed (never written),
    or copied from its base's host copy or from values given (views.py)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def done(self) -> bool:
        return True

    def wait(self) -> int:
        return self.nbytes


def _both(mine: Callable[[torch.Tensor], None], theirs: Seen | None) -> Seen:
    """A copy's chunks shown to the checksums, then to the caller's seen."""
    def seen(chunk: torch.Tensor) -> IoFuture | None:
        mine(chunk)
        return theirs(chunk) if theirs is not None else None
    return seen


class Fetch:
    """A fetch under way (MemoryManager.fetch): ready() says whether wait() would find the host copy there;
    wait() returns the values on the compute tier, where they stay until MemoryManager.release."""

    def __init__(self, manager: MemoryManager, key: str):
        self._manager, self.key = manager, key

    def ready(self) -> bool:
        return self._manager.ready(self.key)

    def wait(self) -> torch.Tensor:
        return self._manager._arrive(self.key)

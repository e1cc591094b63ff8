"""The tiered memory manager: the only code that moves bytes between NVMe, host buffers and the compute tier.

A partition's bytes live in an NVMe extent.  To use them, the manager borrows a host buffer from the
partition's pool, reads the extent into it (READING -> HOST_CLEAN), and either hands out a typed view
of that buffer (host work such as the optimizer step) or copies it to the compute tier and gives the
buffer back at once (ON_COMPUTE).  On a CPU compute tier the buffer itself may be lent as the compute
copy until `drop_compute` (`lend_to_compute`; infinity/memory/compute_tier.py); on CUDA the copy to the
device may be issued ahead of use (`start_to_compute`).  New values come in through `stage` (HOST_DIRTY) and go out through
`start_write` (WRITING -> HOST_CLEAN); `drop` returns the buffer.  Every change of place goes through
the partition's state table.

A partition may keep its host copy (`keep_host_copy`, offload_param.max_in_cpu): its first read goes
into a buffer of its own rather than the pool's, which it keeps after `to_compute`, so it rests in
HOST_CLEAN and later uses skip NVMe.  New values reach it through `write_held`, which updates the host
copy and writes it through, so both places hold the same bytes whenever nothing is in flight.

Any error in a transfer, at submit or at completion, latches: from then on every call that moves
bytes raises EngineFailed naming the first error (`fail` latches one from outside, such as an
optimizer step stopped midway).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from infinity import metrics
from infinity.errors import EngineFailed, InfinityError
from infinity.io.files import AioFile
from infinity.io.handle import IoFuture, IoHandle
from infinity.memory.compute_tier import Arriving, ComputeCopy, ComputeTierMoves, DeviceCopies, Lending
from infinity.memory.host_buffer import HostBuffer
from infinity.io.align import round_up
from infinity.memory.nvme_store import ALIGNMENT, Extent, NvmeStore
from infinity.memory.partition import Partition, State
from infinity.memory.pool import BufferPool
from infinity.memory.report import TierLedger
from infinity.memory.stream import Chain, FileEnd, Piece, Seen, SwapRange, copy

log = logging.getLogger("infinity.memory")


@dataclass
class Slot:
    """A host buffer of a pool, lent to one partition; pool None: the partition's own kept buffer."""

    pool: BufferPool | None
    index: int
    buffer: HostBuffer


@dataclass
class Entry:
    partition: Partition
    extent: Extent
    dtype: torch.dtype
    pool: BufferPool
    slot: Slot | None = None
    future: IoFuture | None = None
    compute: torch.Tensor | None = field(default=None, repr=False)
    kept: bool = False  # keeps its host copy between uses (keep_host_copy)
    copy: ComputeCopy = ComputeCopy.COPY  # how its compute copy was made (LENT: it is the host buffer)
    arriving: Arriving | None = field(default=None, repr=False)  # a copy to the device issued ahead
    kind: str = "other"  # for metrics: param, grad or optimizer_state, from its region


class MemoryManager(ComputeTierMoves):
    def __init__(self, handle: IoHandle, store: NvmeStore, compute_device: torch.device):
        self.handle, self.store, self.device = handle, store, compute_device
        self.ledger = TierLedger()
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._pending: list[tuple[str, IoFuture, Slot | None]] = []
        self._device_copies = DeviceCopies(compute_device) if compute_device.type == "cuda" else None
        self._lending = Lending()

    # ---- registration ------------------------------------------------------
    def add(self, key: str, numel: int, dtype: torch.dtype, region: str, pool: BufferPool) -> Partition:
        size = torch.empty(0, dtype=dtype).element_size()
        extent = self.store.allocate(key, numel * size, region)
        partition = Partition(key, numel, size)
        self._entries[key] = Entry(partition, extent, dtype, pool, kind=metrics.kind_of_region(region) or "other")
        self.ledger.add("nvme", extent.nbytes)
        return partition

    def lend_pool(self, key: str, pool: BufferPool) -> None:
        """From now on key's host copies come from pool (zero.Init wrote it through a staging pool)."""
        e = self._entry(key)
        if e.slot is not None:
            raise InfinityError(f"partition {key!r} holds a buffer of pool {e.pool.name!r}; it cannot change pools now")
        e.pool = pool

    def state(self, key: str) -> State:
        return self._entry(key).partition.state

    # ---- NVMe -> host -> compute -------------------------------------------
    def start_read(self, key: str, timeout: float | None = None) -> None:
        """Borrows a host buffer and starts reading the partition into it."""
        self.check_healthy()
        self.flush({key})  # the engine does not order requests: a read must not overtake a write
        e = self._entry(key)
        e.partition.move_to(State.READING)
        e.slot = self._borrow(e, timeout)
        e.future = self._submit(True, self._host_bytes(e), e, 0)

    def read_done(self, key: str) -> bool:
        """The host copy is there, or its read has completed (finish_read will not wait)."""
        e = self._entry(key)
        if e.partition.state is State.READING:
            return e.future is not None and e.future.done()
        return e.partition.state in (State.HOST_CLEAN, State.HOST_DIRTY, State.ON_COMPUTE)

    def finish_read(self, key: str) -> torch.Tensor:
        """Waits for the read; returns the host copy as a tensor of the partition's dtype."""
        e = self._entry(key)
        self._settle(e, State.HOST_CLEAN, State.ON_NVME, "read")
        return self.host_view(key)

    def host_view(self, key: str) -> torch.Tensor:
        e = self._entry(key)
        if e.slot is None:
            raise InfinityError(f"partition {key!r} has no host copy (state {e.partition.state.value})")
        return e.slot.buffer.view(e.dtype, e.partition.numel)

    # ---- host -> NVMe ------------------------------------------------------
    def stage(self, key: str, values: torch.Tensor | None = None, timeout: float | None = None) -> torch.Tensor:
        """Marks the host copy as newer than NVMe; with values, first copies them into a borrowed buffer."""
        e = self._entry(key)
        self._forget_arriving(e)
        if values is not None and e.slot is None:
            e.slot = self._borrow(e, timeout)
        e.partition.move_to(State.HOST_DIRTY)
        view = self.host_view(key)
        if values is not None:
            view.copy_(values.reshape(-1))
        return view

    def start_write(self, key: str) -> None:
        self.check_healthy()
        e = self._entry(key)
        e.partition.move_to(State.WRITING)
        e.future = self._submit(False, self._host_bytes(e), e, 0)

    def finish_write(self, key: str) -> None:
        self._settle(self._entry(key), State.HOST_CLEAN, State.HOST_DIRTY, "write")

    def drop(self, key: str) -> None:
        """Gives back the host buffer of a clean partition (no write: NVMe already holds it)."""
        e = self._entry(key)
        e.partition.move_to(State.ON_NVME)
        self._forget_arriving(e)
        self._give_back(e)

    def write_through(self, key: str, values: torch.Tensor) -> None:
        """Stages values, writes them and drops the buffer: for initial values."""
        self.stage(key, values)
        self.start_write(key)
        self.finish_write(key)
        self.drop(key)

    # ---- writes into a partition that stays on NVMe ----------------------------
    def write_part(self, key: str, byte_offset: int, values: torch.Tensor, staging: BufferPool,
                   dtype: torch.dtype | None = None) -> None:
        """Writes values (converted to dtype, if given) into key's extent at byte_offset, padded with zeros
        to the next 4096 bytes.

        Values that are aligned host memory of whole blocks in the stored dtype are written in place (the
        caller keeps them unchanged until `flush`); others are copied, and converted in the same pass, into
        a buffer borrowed from staging.  The partition must be on NVMe: a host copy would silently go stale.
        """
        stored = dtype or values.dtype
        self.check_healthy()
        e = self._entry(key)
        if e.partition.state is not State.ON_NVME:
            raise InfinityError(f"partition {key!r} is {e.partition.state.value}; write_part needs it on NVMe")
        nbytes = values.numel() * torch.empty(0, dtype=stored).element_size()
        length = min(round_up(nbytes, ALIGNMENT), e.extent.capacity - byte_offset)
        if nbytes > length or byte_offset % ALIGNMENT:
            raise InfinityError(f"write_part of {nbytes} bytes at {byte_offset} does not fit partition {key!r}")
        flat = values.detach().reshape(-1)
        slot = None
        if flat.device.type == "cpu" and flat.is_contiguous() and flat.data_ptr() % ALIGNMENT == 0 \
                and nbytes == length and flat.dtype == stored:
            source = flat.view(torch.uint8)
        else:
            slot = self._borrow_for_write(staging, length)
            source = slot.buffer.tensor[:length]
            source[nbytes:].zero_()
            source[:nbytes].view(stored).copy_(flat)
        future = self._submit(False, source, e, byte_offset)
        with self._lock:
            self._pending.append((key, future, slot))

    # ---- host copies kept between uses (offload_param.max_in_cpu) ----------------
    def keep_host_copy(self, key: str) -> None:
        """From its next read on, key keeps its host copy in a buffer of its own, counted as host bytes."""
        e = self._entry(key)
        if e.partition.state is not State.ON_NVME:
            raise InfinityError(f"partition {key!r} is {e.partition.state.value}; only one on NVMe can start "
                                f"keeping its host copy")
        e.kept = True

    def write_held(self, key: str, values: torch.Tensor) -> None:
        """New values (converted to the partition's dtype as they are copied) into its host copy
        (HOST_DIRTY), written from there (WRITING); `flush` completes the write (HOST_CLEAN), and host and
        NVMe hold the same bytes again.  A kept partition uses its own buffer; another one, which must be
        on NVMe, borrows one from its pool and holds it, like a completed read, until `drop` or a use."""
        self.check_healthy()
        self.flush({key})
        e = self._entry(key)
        if e.partition.state not in ((State.ON_NVME, State.HOST_CLEAN) if e.kept else (State.ON_NVME,)):
            raise InfinityError(f"partition {key!r} is {e.partition.state.value}; write_held needs a kept partition "
                                f"at rest or one on NVMe")
        if not self.can_hold(key):
            raise InfinityError(f"partition {key!r}: {e.extent.capacity} bytes (whole blocks) do not fit a buffer of "
                                f"pool {e.pool.name!r}; write it with write_part")
        self.stage(key, values.reshape(-1)[: e.partition.numel])
        e.partition.move_to(State.WRITING)
        e.future = self._submit(False, e.slot.buffer.tensor[: e.extent.capacity], e, 0)  # type: ignore[union-attr]
        with self._lock:
            self._pending.append((key, e.future, None))

    def can_hold(self, key: str) -> bool:
        """Whether write_held can write key from a host buffer in whole blocks (see _host_bytes)."""
        e = self._entry(key)
        return e.kept or e.pool.buffer_bytes >= e.extent.capacity

    def flush(self, keys: set[str] | None = None) -> None:
        """Waits for write_part and write_held transfers (of keys, or all), giving back their buffers."""
        with self._lock:
            chosen = [p for p in self._pending if keys is None or p[0] in keys]
        self._complete(chosen)

    def _borrow_for_write(self, pool: BufferPool, nbytes: int) -> Slot:
        """A staging buffer for write_part."""
        self._make_room(pool)
        index, buffer = pool.acquire(nbytes)
        self.ledger.add("host", buffer.nbytes)
        return Slot(pool, index, buffer)

    def _make_room(self, pool: BufferPool) -> None:
        """While the pool is empty, completes its oldest write_part, whose buffer then comes back.

        [Note: why every borrow does this] write_part buffers return only when their write is
        completed here; a borrower that just waited on the pool would wait for itself."""
        while pool.in_use >= pool.buffer_count:
            with self._lock:
                oldest = next((p for p in self._pending if p[2] is not None and p[2].pool is pool), None)
            if oldest is None:
                return  # the buffers are out elsewhere; acquire waits for them
            self._complete([oldest])

    def _complete(self, pending: list[tuple[str, IoFuture, Slot | None]]) -> None:
        finished = {id(p) for p in pending}
        with self._lock:
            self._pending = [p for p in self._pending if id(p) not in finished]
        first_error: InfinityError | None = None
        for key, future, slot in pending:
            ok = True
            try:
                future.wait()
            except InfinityError as err:
                ok = False
                self.fail(err)
                first_error = first_error or err
            e = self._entries[key]
            if e.future is future:  # a write_held: its host copy is clean again, or still dirty
                e.future = None
                e.partition.move_to(State.HOST_CLEAN if ok else State.HOST_DIRTY)
            if slot is not None:
                slot.pool.release(slot.index)
                self.ledger.add("host", -slot.buffer.nbytes)
        if first_error is not None:
            raise first_error

    # ---- checkpoints: ranges of extents to or from another file -------------------
    def copy_out(self, pieces: Sequence[Piece], target: AioFile, target_offset: int,
                 staging: Sequence[HostBuffer], seen: Seen | None = None) -> None:
        """Copies the pieces (ranges of swap extents, and other ends such as host tensors between them) into
        target, end to end from target_offset, in one pipelined copy through staging (infinity.memory.stream);
        seen gets each chunk in order.  Each extent must hold the current values (on NVMe, or a clean host
        copy).  A failure here leaves the swap files as they were."""
        chain = self._chain(pieces)
        copy(self.handle, chain, FileEnd(target, target_offset), chain.nbytes, staging, seen)

    def copy_in(self, pieces: Sequence[Piece], source: AioFile, source_offset: int,
                staging: Sequence[HostBuffer], seen: Seen | None = None) -> None:
        """The reverse of copy_out; clean host copies are read again after.  A failure latches (extents
        half overwritten)."""
        try:
            chain = self._chain(pieces)
            copy(self.handle, FileEnd(source, source_offset), chain, chain.nbytes, staging, seen)
            entries = (self._entries[r.key] for r in pieces if isinstance(r, SwapRange))
            for e in {id(e): e for e in entries if e.slot is not None}.values():
                self.handle.pread(self._host_bytes(e), self.store.file(e.extent), e.extent.offset)
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
            if e.partition.state not in (State.ON_NVME, State.HOST_CLEAN):
                raise InfinityError(f"partition {key!r} is {e.partition.state.value}; copies to or from a file "
                                    f"need it at rest (on NVMe or a clean host copy)")
            if byte_offset % ALIGNMENT or byte_offset < 0 or byte_offset + nbytes > e.extent.capacity:
                raise InfinityError(f"bytes [{byte_offset}, {byte_offset + nbytes}) are not an aligned range of "
                                    f"partition {key!r} ({e.extent.capacity} bytes)")
            ends.append((FileEnd(self.store.file(e.extent), e.extent.offset + byte_offset), nbytes))
        return Chain(tuple(ends))

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
        try:
            return submit(source, self.store.file(e.extent), e.extent.offset + byte_offset)
        except InfinityError as err:
            self.fail(err)
            raise

    def _borrow(self, e: Entry, timeout: float | None) -> Slot:
        if e.kept:
            buffer = HostBuffer(e.extent.capacity, pin=e.pool.pin, zero=True)  # padding stays zero
            self.ledger.add("host", e.extent.nbytes)
            return Slot(None, -1, buffer)
        self._make_room(e.pool)
        index, buffer = e.pool.acquire(e.extent.nbytes, timeout)
        self.ledger.add("host", e.extent.nbytes)
        return Slot(e.pool, index, buffer)

    @staticmethod
    def _forget_arriving(e: Entry) -> None:
        """A copy to the device issued ahead and not used: its host buffer may change once it completes."""
        if e.arriving is not None:
            e.arriving.copied.synchronize()
            e.arriving = None

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
            raise InfinityError(f"partition {e.partition.key!r} has no host buffer to transfer")
        return e.slot.buffer.tensor[: e.extent.capacity if e.slot.pool is None else e.extent.nbytes]

    def _settle(self, e: Entry, ok: State, failed: State, what: str) -> None:
        future, e.future = e.future, None
        if future is None:
            raise InfinityError(f"partition {e.partition.key!r}: no {what} in flight")
        try:
            future.wait()
        except InfinityError as err:
            self.fail(err)
            e.partition.move_to(failed)
            if failed is State.ON_NVME:
                self._give_back(e)
            raise
        e.partition.move_to(ok)

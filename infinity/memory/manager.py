"""The tiered memory manager: the only code that moves bytes between NVMe, host buffers and the compute tier.

A partition's bytes live in an NVMe extent.  To use them, the manager borrows a host buffer from the
partition's pool, reads the extent into it (READING -> HOST_CLEAN), and either hands out a typed view
of that buffer (host work such as the optimizer step) or copies it to the compute tier and gives the
buffer back at once (ON_COMPUTE).  New values come in through `stage` (HOST_DIRTY) and go out through
`start_write` (WRITING -> HOST_CLEAN); `drop` returns the buffer.  Every change of place goes through
the partition's state table.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from infinity.errors import InfinityError
from infinity.io.handle import IoFuture, IoHandle
from infinity.memory.host_buffer import HostBuffer
from infinity.io.align import round_up
from infinity.memory.nvme_store import ALIGNMENT, Extent, NvmeStore
from infinity.memory.partition import Partition, State
from infinity.memory.pool import BufferPool
from infinity.memory.report import TierLedger

log = logging.getLogger("infinity.memory")


class EngineFailed(InfinityError):
    """An earlier I/O error left the swapped state unreliable; the run refuses to go on."""


@dataclass
class Slot:
    """A host buffer of a pool, lent to one partition."""

    pool: BufferPool
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


class MemoryManager:
    def __init__(self, handle: IoHandle, store: NvmeStore, compute_device: torch.device):
        self.handle, self.store, self.device = handle, store, compute_device
        self.ledger = TierLedger()
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._pending: list[tuple[str, IoFuture, Slot | None]] = []
        self._h2d: torch.cuda.Stream | None = None  # host-to-device copies on CUDA (to_compute)

    # ---- registration ------------------------------------------------------
    def add(self, key: str, numel: int, dtype: torch.dtype, region: str, pool: BufferPool) -> Partition:
        size = torch.empty(0, dtype=dtype).element_size()
        extent = self.store.allocate(key, numel * size, region)
        partition = Partition(key, numel, size)
        self._entries[key] = Entry(partition, extent, dtype, pool)
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
        e.future = self.handle.submit_read(self._host_bytes(e), e.extent.path, e.extent.offset)

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

    def to_compute(self, key: str) -> torch.Tensor:
        """Copies the host copy to the compute tier and gives the host buffer back."""
        e = self._entry(key)
        host = self.host_view(key)
        if self.device.type == "cpu":
            e.compute = host.clone()
        elif self.device.type == "cuda":
            e.compute = self._copy_to_cuda(host)
        else:
            e.compute = host.to(self.device, copy=True)
        e.partition.move_to(State.ON_COMPUTE)
        self._give_back(e)
        self.ledger.add("compute", e.extent.nbytes)
        return e.compute

    def _copy_to_cuda(self, host: torch.Tensor) -> torch.Tensor:
        """host's values on the device, copied on a side stream; returns once the copy has read host.

        [Note: the side stream, and what waits for what]
        The copy runs on the manager's own stream, so it does not queue behind the compute stream's
        work, and the caller waits for the copy alone (its host buffer goes back to the pool at once),
        not for every kernel queued before it.  The compute stream waits on the copy's event before it
        reads the values.  The copy is allocated on the side stream and used on the compute stream:
        record_stream keeps the caching allocator from handing its memory to the next copy while
        kernels queued on the compute stream still read it (tests/gpu/test_manager_cuda.py)."""
        compute = torch.cuda.current_stream(self.device)
        if self._h2d is None:
            self._h2d = torch.cuda.Stream(self.device)
        copied = torch.cuda.Event()
        with torch.cuda.stream(self._h2d):
            values = host.to(self.device, non_blocking=True)
            copied.record(self._h2d)
        compute.wait_event(copied)
        values.record_stream(compute)
        copied.synchronize()
        return values

    def drop_compute(self, key: str) -> None:
        """Forgets the compute-tier copy; the NVMe extent still holds the values."""
        e = self._entry(key)
        e.partition.move_to(State.ON_NVME)
        e.compute = None
        self.ledger.add("compute", -e.extent.nbytes)

    # ---- host -> NVMe ------------------------------------------------------
    def stage(self, key: str, values: torch.Tensor | None = None, timeout: float | None = None) -> torch.Tensor:
        """Marks the host copy as newer than NVMe; with values, first copies them into a borrowed buffer."""
        e = self._entry(key)
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
        e.future = self.handle.submit_write(self._host_bytes(e), e.extent.path, e.extent.offset)

    def finish_write(self, key: str) -> None:
        self._settle(self._entry(key), State.HOST_CLEAN, State.HOST_DIRTY, "write")

    def drop(self, key: str) -> None:
        """Gives back the host buffer of a clean partition (no write: NVMe already holds it)."""
        e = self._entry(key)
        e.partition.move_to(State.ON_NVME)
        self._give_back(e)

    def write_through(self, key: str, values: torch.Tensor) -> None:
        """Stages values, writes them and drops the buffer: for initial values."""
        self.stage(key, values)
        self.start_write(key)
        self.finish_write(key)
        self.drop(key)

    # ---- writes into a partition that stays on NVMe ----------------------------
    def write_part(self, key: str, byte_offset: int, values: torch.Tensor, staging: BufferPool) -> None:
        """Writes values into key's extent at byte_offset, padded with zeros to the next 4096 bytes.

        Values that are aligned host memory of whole blocks are written in place (the caller keeps them
        unchanged until `flush`); others are copied into a buffer borrowed from staging.  The partition
        must be on NVMe: a host copy would silently go stale.
        """
        self.check_healthy()
        e = self._entry(key)
        if e.partition.state is not State.ON_NVME:
            raise InfinityError(f"partition {key!r} is {e.partition.state.value}; write_part needs it on NVMe")
        nbytes = values.numel() * values.element_size()
        length = min(round_up(nbytes, ALIGNMENT), e.extent.capacity - byte_offset)
        if nbytes > length or byte_offset % ALIGNMENT:
            raise InfinityError(f"write_part of {nbytes} bytes at {byte_offset} does not fit partition {key!r}")
        flat = values.detach().reshape(-1)
        slot = None
        if flat.device.type == "cpu" and flat.is_contiguous() and flat.data_ptr() % ALIGNMENT == 0 \
                and nbytes == length:
            source = flat.view(torch.uint8)
        else:
            slot = self._borrow_for_write(staging, length)
            source = slot.buffer.tensor[:length]
            source[nbytes:].zero_()
            source[:nbytes].view(values.dtype).copy_(flat)
        future = self.handle.submit_write(source, e.extent.path, e.extent.offset + byte_offset)
        with self._lock:
            self._pending.append((key, future, slot))

    def flush(self, keys: set[str] | None = None) -> None:
        """Waits for write_part transfers (of keys, or all), giving back their buffers."""
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
        for _, future, slot in pending:
            try:
                future.wait()
            except InfinityError as err:
                self._failure = first_error = first_error or err
            if slot is not None:
                slot.pool.release(slot.index)
                self.ledger.add("host", -slot.buffer.nbytes)
        if first_error is not None:
            raise first_error

    # ---- health ------------------------------------------------------------
    def check_healthy(self) -> None:
        if self._failure is not None:
            raise EngineFailed(f"an earlier transfer failed, so swapped state may be wrong; refusing to go on. "
                               f"Cause: {self._failure}") from self._failure

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

    # ---- internals ---------------------------------------------------------
    def _entry(self, key: str) -> Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise InfinityError(f"the memory manager has no partition {key!r}") from None

    def _borrow(self, e: Entry, timeout: float | None) -> Slot:
        self._make_room(e.pool)
        index, buffer = e.pool.acquire(e.extent.nbytes, timeout)
        self.ledger.add("host", e.extent.nbytes)
        return Slot(e.pool, index, buffer)

    def _give_back(self, e: Entry) -> None:
        if e.slot is not None:
            e.slot.pool.release(e.slot.index)
            self.ledger.add("host", -e.extent.nbytes)
            e.slot = None

    def _host_bytes(self, e: Entry) -> torch.Tensor:
        if e.slot is None:
            raise InfinityError(f"partition {e.partition.key!r} has no host buffer to transfer")
        return e.slot.buffer.tensor[: e.extent.nbytes]

    def _settle(self, e: Entry, ok: State, failed: State, what: str) -> None:
        future, e.future = e.future, None
        if future is None:
            raise InfinityError(f"partition {e.partition.key!r}: no {what} in flight")
        try:
            future.wait()
        except InfinityError as err:
            self._failure = err
            e.partition.move_to(failed)
            if failed is State.ON_NVME:
                self._give_back(e)
            raise
        e.partition.move_to(ok)

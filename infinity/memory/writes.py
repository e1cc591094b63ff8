"""Writes the memory manager started and completes later (write_part, and a held copy's write-through):
each with the buffer it borrowed from a staging pool, if any, given back when the write is completed."""
from __future__ import annotations

import enum
import threading
from typing import Callable

from infinity.errors import InfinityError
from infinity.io.handle import IoFuture
from infinity.memory.entry import Entry, Slot
from infinity.memory.record import State
from infinity.memory.pool import BufferPool
from infinity.memory.report import TierLedger

Pending = tuple[Entry, IoFuture, "Slot | None"]


class Staging(enum.Enum):
    """Whether write_part may write the caller's values in place or always copies them into staging."""

    WHEN_NEEDED = "when needed"  # aligned host values of whole blocks are written in place (kept until flush)
    ALWAYS = "always"  # copied into a staging buffer: the caller may reuse or free its values at once


class PendingWrites:
    def __init__(self, ledger: TierLedger, fail: Callable[[BaseException], None]):
        self.ledger, self._fail = ledger, fail
        self._lock = threading.Lock()
        self._pending: list[Pending] = []

    def add(self, e: Entry, future: IoFuture, slot: Slot | None) -> None:
        with self._lock:
            self._pending.append((e, future, slot))

    def flush(self, keys: set[str] | None = None) -> None:
        """Waits for the writes (of keys, or all), giving back their buffers."""
        with self._lock:
            chosen = [p for p in self._pending if keys is None or p[0].record.key in keys]
        self.complete(chosen)

    def borrow(self, pool: BufferPool, nbytes: int) -> Slot:
        """A staging buffer for write_part."""
        self.make_room(pool)
        index, buffer = pool.acquire(nbytes)
        self.ledger.add("host", buffer.nbytes)
        return Slot(pool, index, buffer)

    def make_room(self, pool: BufferPool) -> None:
        """While the pool is empty, completes its oldest write_part, whose buffer then comes back.

        [Note: why every borrow does this] write_part buffers return only when their write is
        completed here; a borrower that just waited on the pool would wait for itself."""
        while pool.in_use >= pool.buffer_count:
            with self._lock:
                oldest = next((p for p in self._pending if p[2] is not None and p[2].pool is pool), None)
            if oldest is None:
                return  # the buffers are out elsewhere; acquire waits for them
            self.complete([oldest])

    def complete(self, pending: list[Pending]) -> None:
        finished = {id(p) for p in pending}
        with self._lock:
            self._pending = [p for p in self._pending if id(p) not in finished]
        first_error: InfinityError | None = None
        for e, future, slot in pending:
            ok = True
            try:
                future.wait()
            except InfinityError as err:
                ok = False
                self._fail(err)
                first_error = first_error or err
            if e.future is future:  # a held copy's write: its host copy is clean again, or still dirty
                e.future = None
                e.record.move_to(State.HOST_CLEAN if ok else State.HOST_DIRTY)
            if slot is not None:
                slot.pool.release(slot.index)  # type: ignore[union-attr]
                self.ledger.add("host", -slot.buffer.nbytes)
        if first_error is not None:
            raise first_error

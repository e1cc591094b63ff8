"""One record per partition, with a state enum and a table of legal transitions.

The memory manager is the only code that changes a record's state.  Every
change goes through `Partition.move_to`, which raises `IllegalTransition` for
anything the table does not list, so a bug shows up at the transition that
caused it rather than as garbage weights later.
"""
from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

from infinity.errors import InfinityError


class State(enum.Enum):
    """Where a partition's authoritative bytes are, and what moving them next costs."""

    ON_NVME = "on_nvme"  # only the swap file holds it; using it costs a read
    READING = "reading"  # a read NVMe -> host buffer is in flight
    HOST_CLEAN = "host_clean"  # a host buffer holds it, equal to the swap file: drop for free
    HOST_DIRTY = "host_dirty"  # a host buffer holds newer bytes than the swap file: must be written
    ON_COMPUTE = "on_compute"  # the compute tier holds it (host memory here, device memory on CUDA)
    WRITING = "writing"  # a write host buffer -> NVMe is in flight


S = State
LEGAL: dict[State, frozenset[State]] = {
    # HOST_DIRTY: new values replace the partition wholesale (initial weights, a fresh gradient)
    S.ON_NVME: frozenset({S.READING, S.HOST_DIRTY}),
    S.READING: frozenset({S.HOST_CLEAN, S.ON_NVME}),  # ON_NVME: the read failed or was abandoned
    S.HOST_CLEAN: frozenset({S.ON_COMPUTE, S.HOST_DIRTY, S.ON_NVME}),  # ON_NVME: dropped, no write needed
    S.HOST_DIRTY: frozenset({S.WRITING, S.ON_COMPUTE}),
    # ON_NVME: dropped unchanged, the swap file still holds it; HOST_DIRTY: came back with new values
    S.ON_COMPUTE: frozenset({S.ON_NVME, S.HOST_CLEAN, S.HOST_DIRTY}),
    S.WRITING: frozenset({S.HOST_CLEAN, S.HOST_DIRTY}),  # HOST_DIRTY: the write failed
}
"""[Note: clean data is never written back]
HOST_CLEAN has no edge to WRITING: the only way to a write is through
HOST_DIRTY, which only an update (optimizer step, gradient) enters."""


class IllegalTransition(InfinityError):
    """A partition was asked to move between states the table does not connect."""

    def __init__(self, key: str, current: State, wanted: State):
        self.key, self.current, self.wanted = key, current, wanted
        allowed = ", ".join(sorted(s.value for s in LEGAL[current])) or "none"
        super().__init__(f"partition {key!r}: {current.value} -> {wanted.value} is not a legal transition "
                         f"(from {current.value}: {allowed}); this is a bug in the caller of the memory manager")


@dataclass
class Partition:
    """A contiguous run of numel elements of one kind (parameter shard, optimizer state) under one key."""

    key: str
    numel: int
    element_size: int
    state: State = State.ON_NVME
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size

    def move_to(self, wanted: State) -> State:
        """Changes state if the table allows it; returns the state left."""
        with self._lock:
            current = self.state
            if wanted not in LEGAL[current]:
                raise IllegalTransition(self.key, current, wanted)
            self.state = wanted
            return current

"""One record per partition: where its bytes are (transfer state) and where it stands in the step
(residency: its users, kept between uses, read ahead), each with its table of legal moves.

The memory manager holds the record of every partition it keeps in a swap file and is the only code
that changes its transfer state (`Record.move_to`).  The residency of a parameter is moved through
`Residence` (residency.py), the table the coordinator asks; a parameter whose home has no swap file
(host memory, the compute tier) has a record too, with no transfer state (`Record.resident_only`).
Every move goes through a table and raises `IllegalTransition` for anything it does not list, so a
bug shows up at the move that caused it rather than as garbage weights later.

[Note: the two halves move apart]  Transfer state and residency are not checked against each other:
a sharded parameter is in use (its whole values all-gathered on the compute tier) while this rank's
piece is back on NVMe, and a kept host copy (max_in_cpu) is clean in host memory while its parameter
is at rest.  Each half is checked against its own table.
"""
from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Union

from infinity.errors import InfinityError


class State(enum.Enum):
    """Where a partition's authoritative bytes are, and what moving them next costs."""

    ON_NVME = "on_nvme"  # only the swap file holds it; using it costs a read
    READING = "reading"  # a read NVMe -> host buffer is in flight
    HOST_CLEAN = "host_clean"  # a host buffer holds it, equal to the swap file: drop for free
    HOST_DIRTY = "host_dirty"  # a host buffer holds newer bytes than the swap file: must be written
    ON_COMPUTE = "on_compute"  # the compute tier holds it (host memory here, device memory on CUDA)
    WRITING = "writing"  # a write host buffer -> NVMe is in flight


class Residency(enum.Enum):
    """Where a parameter stands in the step (the coordinator's moves, through residency.py)."""

    AT_REST = "at_rest"  # not on the compute tier, no read started ahead: a use is a miss
    READ_AHEAD = "read_ahead"  # a read started ahead of its use: a use is a hit, or late
    IN_USE = "in_use"  # on the compute tier with at least one user
    KEPT = "kept"  # on the compute tier with no user, kept for a use soon: a use is a hit


S, R = State, Residency
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

RESIDENCY_LEGAL: dict[Residency, frozenset[Residency]] = {
    R.AT_REST: frozenset({R.READ_AHEAD, R.IN_USE}),
    R.READ_AHEAD: frozenset({R.IN_USE, R.AT_REST}),  # AT_REST: given up (cancelled)
    R.IN_USE: frozenset({R.IN_USE, R.KEPT, R.AT_REST}),  # IN_USE: one more user, or one fewer
    R.KEPT: frozenset({R.IN_USE, R.AT_REST}),
}

Move = Union[State, Residency]


def _table(move: Move) -> dict:
    return LEGAL if isinstance(move, State) else RESIDENCY_LEGAL


class IllegalTransition(InfinityError):
    """A record was asked to move between states (or residencies) its table does not connect."""

    def __init__(self, key: str, current: Move | None, wanted: Move):
        self.key, self.current, self.wanted = key, current, wanted
        if current is None:
            super().__init__(f"partition {key!r} has no swap file, so no transfer state: -> {wanted.value} is not "
                             f"a legal transition; this is a bug in the caller of the memory manager")
            return
        what = "transition" if isinstance(wanted, State) else "residency move"
        allowed = ", ".join(sorted(s.value for s in _table(current)[current])) or "none"
        super().__init__(f"partition {key!r}: {current.value} -> {wanted.value} is not a legal {what} "
                         f"(from {current.value}: {allowed}); this is a bug in the caller of the memory manager")


@dataclass
class Record:
    """A contiguous run of numel elements of one kind (parameter shard, optimizer state) under one key:
    its transfer state (None: it never touches NVMe) and its residency with the users it has."""

    key: str
    numel: int = 0
    element_size: int = 0
    state: State | None = State.ON_NVME
    residency: Residency = Residency.AT_REST
    users: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def resident_only(cls, key: str) -> Record:
        """The record of a parameter whose home has no swap file (host memory, the compute tier)."""
        return cls(key, state=None)

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size

    def move_to(self, wanted: State) -> State:
        """Changes the transfer state if the table allows it; returns the state left."""
        with self._lock:
            current = self.state
            if current is None or wanted not in LEGAL[current]:
                raise IllegalTransition(self.key, current, wanted)
            self.state = wanted
            return current

    def reside(self, wanted: Residency) -> Residency:
        """Changes the residency if the table allows it; returns the residency left."""
        with self._lock:
            current = self.residency
            if wanted not in RESIDENCY_LEGAL[current]:
                raise IllegalTransition(self.key, current, wanted)
            self.residency = wanted
            return current

"""Residency: the coordinator's verbs over each parameter's record (record.py): its users, kept between
uses when it is needed again soon, and read ahead of use.

The records are the partitions' own: a parameter in a swap file has the memory manager's record, one in
host memory or on the compute tier a record with no transfer state, both asked of its home.  No torch
and no I/O: the coordinator asks the homes (and through them the memory manager) to move the bytes, and
records here what it asked; each move goes through record.py's table of legal residency moves.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from infinity.errors import InfinityError
from infinity.memory.record import Record, Residency

R = Residency


class Residence:
    """The residency of each parameter, by index, on the records of its partitions.

    [Note: sets kept beside the records]  `resident()` and `reading()` are asked on every module; the
    read-ahead and kept sets are updated as the records change so that `reading()` need not scan every
    record.  They are sets of indices, so what iterates over them (such as the planner's tie-breaking)
    sees them in the order of the ints' hashes: the same every run, not the order of the moves."""

    def __init__(self, records: Sequence[Record], offloaded: Iterable[int]):
        self._records = tuple(records)
        self._offloaded = tuple(offloaded)
        self._kept: set[int] = set()
        self._reading: set[int] = set()

    def state(self, i: int) -> Residency:
        return self._records[i].residency

    def users(self, i: int) -> int:
        return self._records[i].users

    def _move(self, i: int, wanted: Residency) -> Residency:
        current = self._records[i].reside(wanted)
        (self._kept.add if wanted is R.KEPT else self._kept.discard)(i)
        (self._reading.add if wanted is R.READ_AHEAD else self._reading.discard)(i)
        return current

    def read_ahead(self, i: int) -> None:
        self._move(i, R.READ_AHEAD)

    def use(self, i: int) -> Residency:
        """One more user; returns the residency it had."""
        had = self._move(i, R.IN_USE)  # an illegal move raises before the count changes
        self._records[i].users += 1
        return had

    def leave(self, i: int) -> bool:
        """One user fewer; True when none is left (the caller then keeps or rests it)."""
        record = self._records[i]
        if record.users <= 0:
            raise InfinityError(f"partition {record.key!r} ({record.residency.value}): a user left that never "
                                f"came; this is a bug in the caller of Residence (the coordinator)")
        record.users -= 1
        return record.users == 0

    def keep(self, i: int) -> None:
        self._move(i, R.KEPT)

    def rest(self, i: int) -> None:
        """Released, or a read ahead given up: nothing on the compute tier, nothing on its way."""
        self._records[i].users = 0
        self._move(i, R.AT_REST)

    def resident(self) -> set[int]:
        """On the compute tier: in use or kept."""
        return {i for i in self._offloaded if self._records[i].users > 0} | self._kept

    def kept(self) -> set[int]:
        """On the compute tier with no user, kept for a use soon."""
        return self._kept

    def reading(self) -> set[int]:
        """Reads started ahead, not yet used."""
        return self._reading

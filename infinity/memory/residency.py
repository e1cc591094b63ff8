"""Residency: where a parameter stands in the step, beside its transfer state (partition.py).

The coordinator counts a parameter's users (modules running that need it), keeps it resident between
uses when it is needed again soon, and reads it ahead of use.  Those facts were three loose sets;
here they are one record per parameter with a state and a table of legal moves, so a bug shows up at
the move that caused it.  No torch and no I/O: the coordinator asks the homes (and through them the
memory manager) to move the bytes, and records here what it asked.
"""
from __future__ import annotations

import enum
from typing import Iterable

from infinity.errors import InfinityError


class Residency(enum.Enum):
    AT_REST = "at_rest"  # not on the compute tier, no read started ahead: a use is a miss
    READ_AHEAD = "read_ahead"  # a read started ahead of its use: a use is a hit, or late
    IN_USE = "in_use"  # on the compute tier with at least one user
    KEPT = "kept"  # on the compute tier with no user, kept for a use soon: a use is a hit


R = Residency
LEGAL: dict[Residency, frozenset[Residency]] = {
    R.AT_REST: frozenset({R.READ_AHEAD, R.IN_USE}),
    R.READ_AHEAD: frozenset({R.IN_USE, R.AT_REST}),  # AT_REST: given up (cancelled)
    R.IN_USE: frozenset({R.IN_USE, R.KEPT, R.AT_REST}),  # IN_USE: one more user, or one fewer
    R.KEPT: frozenset({R.IN_USE, R.AT_REST}),
}


class IllegalResidency(InfinityError):
    def __init__(self, index: int, current: Residency, wanted: Residency):
        super().__init__(f"parameter {index}: {current.value} -> {wanted.value} is not a legal residency move "
                         f"(from {current.value}: {', '.join(sorted(s.value for s in LEGAL[current]))}); this is "
                         f"a bug in the coordinator")


class Residence:
    """The residency of each parameter, by index.

    [Note: sets kept beside the records]  `resident()` and `reading()` are asked on every module; the
    read-ahead and kept sets are kept as the records change (in the same order as their moves, so that
    what iterates over them, such as the planner's tie-breaking, sees the same order every run)."""

    def __init__(self, count: int, offloaded: Iterable[int]):
        self._state = [Residency.AT_REST] * count
        self._users = [0] * count
        self._offloaded = tuple(offloaded)
        self._kept: set[int] = set()
        self._reading: set[int] = set()

    def state(self, i: int) -> Residency:
        return self._state[i]

    def users(self, i: int) -> int:
        return self._users[i]

    def _move(self, i: int, wanted: Residency) -> Residency:
        current = self._state[i]
        if wanted not in LEGAL[current]:
            raise IllegalResidency(i, current, wanted)
        self._state[i] = wanted
        (self._kept.add if wanted is R.KEPT else self._kept.discard)(i)
        (self._reading.add if wanted is R.READ_AHEAD else self._reading.discard)(i)
        return current

    def read_ahead(self, i: int) -> None:
        self._move(i, R.READ_AHEAD)

    def use(self, i: int) -> Residency:
        """One more user; returns the residency it had."""
        self._users[i] += 1
        return self._move(i, R.IN_USE)

    def leave(self, i: int) -> bool:
        """One user fewer; True when none is left (the caller then keeps or rests it)."""
        self._users[i] -= 1
        return self._users[i] == 0

    def keep(self, i: int) -> None:
        self._move(i, R.KEPT)

    def rest(self, i: int) -> None:
        """Released, or a read ahead given up: nothing on the compute tier, nothing on its way."""
        self._users[i] = 0
        self._move(i, R.AT_REST)

    def resident(self) -> set[int]:
        """On the compute tier: in use or kept."""
        return {i for i in self._offloaded if self._users[i] > 0} | self._kept

    def kept(self) -> set[int]:
        """On the compute tier with no user, kept for a use soon."""
        return self._kept

    def reading(self) -> set[int]:
        """Reads started ahead, not yet used."""
        return self._reading

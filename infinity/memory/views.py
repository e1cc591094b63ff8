"""Partitions whose bytes are a range of another partition's extent (views of a base), and who is whose.

[Note: a partition inside another]
In an fp32 run with parameters and optimizer on the same nvme_path, a parameter's partition and its fp32
master weights hold the same values.  Two copies would cost 4 bytes per parameter written at every step
(and the space), so the parameter's partition is a view: its extent is its slice of the optimizer's master
extent (slices start on 4096-byte boundaries and their padding is zeros, swap/layout.py), and the master
write of the step is the parameter's write.  The memory manager keeps the two consistent by four rules:

1. A view's transfers go to its range of the base's file, and its checksums are the base's: the base's
   recorded ranges are cut at every view's bounds (integrity.py `cut`), so a read of a view finds its
   range recorded whole and is checked like any other.
2. While the base holds a host copy (a completed read, new values, a write in flight: always at least as
   new as its file), a view's read copies its range from there instead of reading the drive.  After an
   optimizer step that leaves the master's write in flight, the next forward's parameters come from that
   buffer: no request, and no wait for the write.
3. Base and views are one family for ordering: a read or copy of a view first completes its own pending
   writes and its base's, one of the base all of theirs (MemoryManager._family).  A view's own write
   (GatheredParameters) waits for the base's transfer in flight and goes into the base's host copy too,
   so that copy stays the newest; a checkpoint's copy into either reads the family's host copies back.
4. When the base's owner (the optimizer) wrote new values, a view's host copies take them without a
   write (MemoryManager.updated): a kept copy (max_in_cpu) and a held one (AfterWrite.HOLD).

[Note: a follower]
With bf16 or fp16 parameters the partition cannot be the master's range (another dtype), so it keeps its
own extent and is written at every step as before; but it follows the master (MemoryManager.follow):
its values are the master's range converted, exactly as the step wrote them.  So while the master holds a
complete host copy (the step's buffer, its write left in flight under the next forward), a read of the
parameter converts from there instead of reading its file, as rule 2 does for a view: the forward's
parameter reads leave the drive.  A follower's values of its own (initial values, GatheredParameters, a
checkpoint: every write but the step's, `Origin.OWN`) may differ from the master's host copy, so from such
a write until the step's next one (`Origin.FOLLOWED`) it reads its own file only (`Entry.diverged`).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Views:
    """Each base's views (one level: a view has no views; a view's own base is its Entry.base)."""

    _views: dict[str, list[str]] = field(default_factory=dict)  # base -> views

    def add(self, view: str, base: str) -> None:
        self._views.setdefault(base, []).append(view)

    def views_of(self, base: str) -> list[str]:
        return self._views.get(base, [])

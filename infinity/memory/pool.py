"""A bounded pool of aligned host buffers: buffer_count × buffer_bytes, allocated once.

`acquire` waits while every buffer is out and never hands out more than the
pool holds; a request larger than one buffer is refused up front with the
setting to change, instead of failing deep inside a step.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from infinity import metrics
from infinity.errors import CapacityError
from infinity.memory.host_buffer import HostBuffer, PinPolicy


class PoolTimeout(CapacityError):
    """No buffer came back within the time allowed: too few buffers for the pipeline, or a leak."""


class BufferPool:
    def __init__(self, name: str, buffer_count: int, buffer_bytes: int, setting: str,
                 pin: PinPolicy = PinPolicy.AUTO):
        """setting names the config keys that size the pool, for error messages."""
        if buffer_count < 1 or buffer_bytes < 1:
            raise CapacityError(f"buffer pool {name!r}", max(buffer_bytes, 1), 0,
                                f"set {setting} to at least 1 buffer of at least 1 element")
        self.name, self.setting, self.pin = name, setting, pin
        self.buffer_bytes = buffer_bytes
        self._all = [HostBuffer(buffer_bytes, pin=pin, zero=False) for _ in range(buffer_count)]
        self._free = list(range(buffer_count))
        self._cond = threading.Condition()
        self.peak_in_use = 0
        self.replaced = 0  # buffers replaced because tensors outside still viewed them (replace)
        self.pinned = any(b.pinned for b in self._all)
        metrics.watch(self, metrics.read_pool)  # buffers free and used, read when metrics are scraped

    @property
    def buffer_count(self) -> int:
        return len(self._all)

    @property
    def in_use(self) -> int:
        with self._cond:
            return len(self._all) - len(self._free)

    def acquire(self, nbytes: int, timeout: float | None = None) -> tuple[int, HostBuffer]:
        """(slot, buffer) of a free buffer able to hold nbytes; waits for one to be released."""
        if nbytes > self.buffer_bytes:
            raise CapacityError(f"buffer pool {self.name!r}: one buffer", nbytes, self.buffer_bytes,
                                f"raise {self.setting} so one buffer holds the largest partition")
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout=timeout):
                raise PoolTimeout(f"buffer pool {self.name!r}: a free buffer within {timeout} s", 1, 0,
                                  f"raise the buffer count in {self.setting}, or release buffers after use")
            slot = self._free.pop()
            self.peak_in_use = max(self.peak_in_use, len(self._all) - len(self._free))
            return slot, self._all[slot]

    def release(self, slot: int) -> None:
        with self._cond:
            if slot in self._free or not 0 <= slot < len(self._all):
                raise ValueError(f"buffer pool {self.name!r}: slot {slot} is not out (double release?)")
            self._free.append(slot)
            self._cond.notify()

    def replace(self, slot: int) -> None:
        """Puts a new buffer in slot, which is out: the old one still has views outside the pool (a tensor
        autograd saved, say), so its memory lives on with them and must not be lent again."""
        with self._cond:
            if slot in self._free or not 0 <= slot < len(self._all):
                raise ValueError(f"buffer pool {self.name!r}: slot {slot} is not out; only a lent buffer is replaced")
            self._all[slot] = HostBuffer(self.buffer_bytes, pin=self.pin, zero=False)
            self.replaced += 1

    @contextmanager
    def borrowed(self, nbytes: int, timeout: float | None = None) -> Iterator[HostBuffer]:
        slot, buf = self.acquire(nbytes, timeout)
        try:
            yield buf
        finally:
            self.release(slot)

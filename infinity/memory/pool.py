"""A bounded pool of aligned host buffers: buffer_count × buffer_bytes, allocated once.

Each buffer holds whole 4096-byte blocks: buffer_bytes is rounded up as a swap file's extents are
(nvme_store.whole_blocks), since a transfer of an extent moves its whole blocks.  `acquire` waits
while every buffer is out and never hands out more than the pool holds; a request larger than one
buffer is refused up front with the setting to change and its value, instead of failing deep inside
a step.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from infinity import metrics
from infinity.errors import CapacityError
from infinity.memory.host_buffer import HostBuffer, PinPolicy
from infinity.memory.nvme_store import whole_blocks


class PoolTimeout(CapacityError):
    """No buffer came back within the time allowed: too few buffers for the pipeline, or a leak."""


@dataclass(frozen=True)
class BufferSize:
    """The config key that sets how large a pool's buffers are, counted in elements of element_bytes (as
    DeepSpeed's offload_param.buffer_size is), so a message can give the value to set."""

    key: str
    element_bytes: int

    def elements(self, nbytes: int) -> int:
        """Elements whose whole blocks are at least nbytes: the least value of key that holds nbytes."""
        return -(-whole_blocks(nbytes) // self.element_bytes)


class BufferPool:
    def __init__(self, name: str, buffer_count: int, buffer_bytes: int, setting: str,
                 pin: PinPolicy = PinPolicy.AUTO, size: BufferSize | None = None):
        """setting names the config key of the buffer count, size the one of the buffer size (if there is
        one), for error messages.  Buffers hold whole blocks: buffer_bytes is rounded up to them."""
        if buffer_count < 1 or buffer_bytes < 1:
            raise CapacityError(f"buffer pool {name!r}", max(buffer_bytes, 1), 0,
                                f"set {setting} to at least 1 buffer of at least 1 element")
        self.name, self.setting, self.pin, self.size = name, setting, pin, size
        self.buffer_bytes = whole_blocks(buffer_bytes)
        self._all = [HostBuffer(self.buffer_bytes, pin=pin, zero=False) for _ in range(buffer_count)]
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
            raise CapacityError(f"buffer pool {self.name!r}: one buffer", nbytes, self.buffer_bytes, self._fix(nbytes))
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout=timeout):
                raise PoolTimeout(f"buffer pool {self.name!r}: a free buffer within {timeout} s", 1, 0,
                                  f"raise the buffer count in {self.setting}, or release buffers after use")
            slot = self._free.pop()
            self.peak_in_use = max(self.peak_in_use, len(self._all) - len(self._free))
            return slot, self._all[slot]

    def _fix(self, nbytes: int) -> str:
        """What to set so one buffer holds nbytes (more buffers, `setting`, cannot)."""
        if self.size is None:
            return f"make the buffers of pool {self.name!r} at least {whole_blocks(nbytes)} bytes"
        return (f"set {self.size.key} to at least {self.size.elements(nbytes)} elements so one buffer holds "
                f"the largest partition ({self.setting} sets how many buffers there are, not how large)")

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

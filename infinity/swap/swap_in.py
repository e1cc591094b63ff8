"""Swap-in: many partitions NVMe → host buffer → compute tier, with reads kept in flight.

    for key, values in swap_in(manager, keys, pool, depth=pool.buffer_count):
        use(values)                       # on the compute tier; manager.drop_compute(key) when done

One partition at a time (start_read, wait, copy, next) leaves the drive idle while each copy runs and
keeps one request in flight.  Here up to `depth` reads are in flight at once, and the copy of the
oldest to the compute tier (`to_compute`, which gives its host buffer back) overlaps the reads of
the next ones.  Only MemoryManager methods move bytes.

[Note: the window, and why it never overcommits the pool]
Each read in flight holds one buffer of `pool`, and a buffer comes back only when this generator
finishes that read.  So the window is at most pool.buffer_count, and a new read starts only while the
pool has a free buffer (or none of ours is out): buffers held elsewhere shrink the window instead of
leaving start_read waiting on a buffer that only this generator could free.  Partitions are yielded
in the order given; the caller drops each when done (the engine's coordinator does, after the module).
If the caller stops early, or a read fails, the reads still in flight are completed and their
buffers given back (the partitions return to ON_NVME), so nothing is left holding the pool.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator

import torch

from infinity.errors import InfinityError
from infinity.memory.manager import MemoryManager
from infinity.memory.partition import State
from infinity.memory.pool import BufferPool


def swap_in(manager: MemoryManager, keys: Iterable[str], pool: BufferPool, depth: int | None = None,
            start: Callable[[str], None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, values on the compute tier) for every key, in order, with up to depth reads in flight.

    keys: partitions whose host buffers come from pool, on NVMe (read here), already reading (a
    prefetch: finished here) or at rest in a kept host copy (copied, no read).  depth: reads in flight
    (default and maximum: pool.buffer_count, offload_param.buffer_count for parameters).  start: how a
    read begins (default manager.start_read; NvmeHome passes its own, which applies max_in_cpu).
    """
    begin = start or manager.start_read
    window = pool.buffer_count if depth is None else max(1, min(depth, pool.buffer_count))
    queued: deque[str] = deque()  # in order; those in `reading` hold a buffer
    reading: set[str] = set()
    try:
        for key in keys:
            while queued and reading and (len(reading) >= window or pool.in_use >= pool.buffer_count):
                yield _arrive(manager, queued.popleft(), reading)
            state = manager.state(key)
            if state is State.WRITING:
                manager.flush({key})  # a kept copy's write-through completes first
            elif state is State.ON_NVME:
                begin(key)
            if manager.state(key) is State.READING:
                reading.add(key)
            queued.append(key)
        while queued:
            yield _arrive(manager, queued.popleft(), reading)
    except BaseException:  # a failed read, or the caller stopped early (GeneratorExit)
        _abandon(manager, [k for k in queued if k in reading])
        raise


def _arrive(manager: MemoryManager, key: str, reading: set[str]) -> tuple[str, torch.Tensor]:
    if key in reading:
        reading.discard(key)
        manager.finish_read(key)
    return key, manager.to_compute(key)


def _abandon(manager: MemoryManager, inflight: list[str]) -> None:
    """Completes reads nobody will use and gives their buffers back.  A read that fails here gives its
    buffer back too and latches the manager's failure (the next use raises EngineFailed); the error
    already on its way out is the one the caller sees."""
    for key in inflight:
        try:
            manager.finish_read(key)
        except InfinityError:
            continue
        manager.drop(key)

"""Runs in DeepSpeed's own virtual environment: times its aio handle on commands from stdin.

Protocol, one JSON object a line each way:
  {"op": "read"|"write", "path": str, "nbytes": int, "block_size": int, "queue_depth": int,
   "single_submit": bool, "overlap_events": bool, "threads": int, "memory": "locked"|"huge"}
  ->  {"seconds": float}
memory "locked": the buffer comes from DeepSpeed's new_cpu_locked_tensor, as its own benchmark does.
memory "huge": a 2 MiB-aligned buffer advised MADV_HUGEPAGE, like infinity's HostBuffer, to compare
the two engines on the same kind of memory.
Benchmark-only: DeepSpeed is never a dependency of infinity.
"""
import ctypes
import json
import sys
import time

import torch
from deepspeed.ops.op_builder import AsyncIOBuilder

module = AsyncIOBuilder().load(verbose=False)
handles: dict = {}
buffers: dict = {}


def handle_for(cmd):
    key = (cmd["block_size"], cmd["queue_depth"], cmd["single_submit"], cmd["overlap_events"], cmd["threads"])
    if key not in handles:
        handles[key] = module.aio_handle(*key)
    return handles[key]


def huge_page_tensor(nbytes):
    huge = 2 << 20
    raw = torch.empty(nbytes + huge, dtype=torch.uint8)
    t = raw[(-raw.data_ptr()) % huge:][:nbytes]
    libc = ctypes.CDLL(None)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise(t.data_ptr(), nbytes, 14)  # MADV_HUGEPAGE
    return t


def buffer_for(h, nbytes, memory):
    if (nbytes, memory) not in buffers:
        if memory == "huge":
            t = huge_page_tensor(nbytes)
        else:
            t = h.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
        t.random_(0, 255)
        buffers[(nbytes, memory)] = t
    return buffers[(nbytes, memory)]


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    h = handle_for(cmd)
    buf = buffer_for(h, cmd["nbytes"], cmd.get("memory", "locked"))
    start = time.perf_counter()
    if cmd["op"] == "read":
        rc = h.sync_pread(buf, cmd["path"])
    else:
        rc = h.sync_pwrite(buf, cmd["path"])
    # DeepSpeed reports failure (a file it cannot open, say) as a return code, not an exception.
    print(json.dumps({"seconds": time.perf_counter() - start, "rc": rc}), flush=True)

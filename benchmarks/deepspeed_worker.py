"""Runs in DeepSpeed's own virtual environment: times its aio handle on commands from stdin.

Protocol, one JSON object a line each way:
  {"op": "read"|"write", "path": str, "nbytes": int, "block_size": int, "queue_depth": int,
   "single_submit": bool, "overlap_events": bool, "threads": int}  ->  {"seconds": float}
The buffer comes from DeepSpeed's new_cpu_locked_tensor, as its own benchmark does.
Benchmark-only: DeepSpeed is never a dependency of infinity.
"""
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


def buffer_for(h, nbytes):
    if nbytes not in buffers:
        t = h.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
        t.random_(0, 255)
        buffers[nbytes] = t
    return buffers[nbytes]


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    h = handle_for(cmd)
    buf = buffer_for(h, cmd["nbytes"])
    start = time.perf_counter()
    if cmd["op"] == "read":
        h.sync_pread(buf, cmd["path"])
    else:
        h.sync_pwrite(buf, cmd["path"])
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)

"""Peak resident memory of infinity's from_pretrained, measured in a process of its own (run by
tests/integration/test_hf_pretrained.py and benchmarks/hf_load.py):

    python tests/integration/hf_rss_worker.py FOLDER NVME_PATH WARMUP_FOLDER

Loads WARMUP_FOLDER first (so that imports and first-call allocations are not counted), then resets the
peak (writing 5 to /proc/self/clear_refs sets VmHWM to the current VmRSS) and loads FOLDER with parameters
and optimizer on NVMe.  Prints one JSON line: the peak's growth over the resident size before the load,
in bytes, and the load's seconds."""
from __future__ import annotations

import gc
import json
import os
import re
import sys
import time
from pathlib import Path

import transformers

from infinity.integrations.transformers import from_pretrained


def status(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


def config(nvme: str) -> dict:
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "offload_param": {"device": "nvme", "nvme_path": nvme},
                                  "offload_optimizer": {"device": "nvme", "nvme_path": nvme}},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}


def main() -> None:
    folder, nvme, warmup = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(os.path.join(nvme, "warmup"), exist_ok=True)
    from_pretrained(transformers.AutoModelForCausalLM, warmup, config(os.path.join(nvme, "warmup")))
    gc.collect()
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    model = from_pretrained(transformers.AutoModelForCausalLM, folder, config(nvme))
    seconds = time.perf_counter() - started
    peak = status("VmHWM")
    print(json.dumps({"growth": peak - before, "seconds": seconds, "parameters": model.num_parameters()}))


if __name__ == "__main__":
    main()

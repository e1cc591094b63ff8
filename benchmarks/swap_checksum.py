"""What swap integrity costs a training step (issue 17): step time with the crc32c of every swap transfer
on ÷ off, on infinity-train's model.

One engine trains infinity-train's default GPT (21M parameters, the shipped nvme-local config: bf16,
parameters and optimizer states on NVMe, micro-batch 8, sequence 128).  After a few warm-up steps, each
round runs a short block of steps with the checksum off and one with it on, the order alternating from
round to round, so the disk's minute-to-minute swings fall on both alike; a round's ratio is on's median
step time ÷ off's in the same round, and the figure is the median of the rounds' ratios.  A mode is set
by giving each memory manager a fresh Checksums (infinity/memory/integrity.py): ranges written in one
block are checked by the reads of that block and later "on" blocks only.

    .venv/bin/python -m benchmarks.swap_checksum --nvme_path swap --rounds 20 --steps 2 \\
        --json bench-out/swap_checksum.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from infinity.cli.train import DEFAULT_CONFIG, DEFAULT_SPEC
from infinity.memory.integrity import Checksums, Integrity
from infinity.models.gpt import synthetic_batches
from infinity.config import Config
from infinity.train import TrainJob, build_model, load_config
from infinity.zero import initialize

MODES = {"off": Integrity.NONE, "on": Integrity.CRC32C}


def timed_steps(engine: Any, batches: list, n: int, first: int) -> list[float]:
    times = []
    for x, y in batches[first:first + n]:
        started = time.perf_counter()
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - started)
    return times


def set_mode(engine: Any, mode: str) -> None:
    for manager in engine.run.managers:
        manager.checksums = Checksums(MODES[mode])


def run(args: argparse.Namespace) -> dict[str, Any]:
    job = TrainJob(config=DEFAULT_CONFIG, spec=DEFAULT_SPEC, nvme_path=args.nvme_path, seed=0)
    config = load_config(job)
    if args.precision == "fp32":  # the same job with bf16 off: faster compute, so the I/O weighs more
        config = Config.load(json.loads(config.to_json()), overrides={"bf16.enabled": False})
    engine, *_ = initialize(model=build_model(job, config), config=config)
    total = args.warmup + 2 * args.rounds * args.steps
    batches = synthetic_batches(DEFAULT_SPEC, batch=int(config.train_micro_batch_size_per_gpu), steps=total, seed=1)
    rounds, used = [], 0
    try:
        engine.train()
        timed_steps(engine, batches, args.warmup, used)
        used += args.warmup
        for r in range(args.rounds):
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
            block: dict[str, Any] = {"order": "-".join(order)}
            for mode in order:
                set_mode(engine, mode)
                before = engine.io_stats()
                times = timed_steps(engine, batches, args.steps, used)
                after = engine.io_stats()
                used += args.steps
                moved = (after.bytes_read - before.bytes_read + after.bytes_written - before.bytes_written)
                block[mode] = {"step_s": times, "median_s": statistics.median(times),
                               "swap_bytes_per_step": moved / args.steps}
            block["ratio"] = block["on"]["median_s"] / block["off"]["median_s"]
            rounds.append(block)
            print(f"round {r + 1}/{args.rounds} ({block['order']}): off {block['off']['median_s']:.3f} s/step, "
                  f"on {block['on']['median_s']:.3f} s/step; on/off {block['ratio']:.4f}", file=sys.stderr)
    finally:
        engine.close()
    ratios = sorted(b["ratio"] for b in rounds)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    summary = {"median_ratio": statistics.median(ratios), "quartiles": [q[0], q[2]], "min_ratio": ratios[0],
               "max_ratio": ratios[-1],
               "off_median_step_s": statistics.median(s for b in rounds for s in b["off"]["step_s"]),
               "on_median_step_s": statistics.median(s for b in rounds for s in b["on"]["step_s"]),
               "swap_bytes_per_step": statistics.median(b["on"]["swap_bytes_per_step"] for b in rounds)}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "command": " ".join(["python", "-m", "benchmarks.swap_checksum", *sys.argv[1:]]),
            "model": {"spec": vars(DEFAULT_SPEC), "config": DEFAULT_CONFIG,
                      "micro_batch": int(config.train_micro_batch_size_per_gpu)},
            "settings": vars(args), "summary": summary, "rounds": rounds}


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nvme_path", default="swap", help="folder for swap files (default %(default)s)")
    p.add_argument("--rounds", type=int, default=20, help="rounds of one block per mode (default %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per block (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="steps before the first round (default %(default)s)")
    p.add_argument("--json", help="write every step time, the rounds and the summary here")
    p.add_argument("--precision", choices=("config", "fp32"), default="config",
                   help="the config's precision (nvme-local: bf16) or fp32 (default %(default)s)")
    args = p.parse_args(argv)
    Path(args.nvme_path).mkdir(parents=True, exist_ok=True)
    result = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    print(f"swap checksum on ÷ off, median of {args.rounds} rounds: {s['median_ratio']:.4f} (quartiles "
          f"{s['quartiles'][0]:.4f}–{s['quartiles'][1]:.4f}, rounds {s['min_ratio']:.4f}–{s['max_ratio']:.4f}); "
          f"off {s['off_median_step_s']:.3f} s/step, on {s['on_median_step_s']:.3f} s/step; "
          f"{s['swap_bytes_per_step'] / 1e9:.3f} GB of swap transfers checksummed per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())

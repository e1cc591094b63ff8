"""What metrics cost a training step (issue 6): step time with metrics on ÷ off, on infinity-train's model.

One engine trains infinity-train's default GPT (21M parameters, the shipped nvme-local config: bf16, parameters and
optimizer states on NVMe, micro-batch 8, sequence 128).  After a few warm-up steps, each round runs a short
block of steps in every mode, the order rotated and reversed from round to round (off-on, on-off, ...), so
the disk's minute-to-minute swings fall on every mode alike; a round's ratio is a mode's median step time
÷ that of off in the same round, and the figure is the median of the rounds' ratios.

  off    no exporter: nothing is counted (a call site tests one attribute)
  count  counting only (metrics.enable() without an exporter): the hot-path cost alone
  on     an exporter serves /metrics (counting in the I/O completion path and in to_compute, step reports
         recorded when the engine gives them) and is scraped every --scrape_interval seconds (1 s: 15 times
         Prometheus' default), so the collector's work happens during the steps

The scraper is one separate process for the whole run (as Prometheus is), polling the same port in every
mode; with no exporter its connection is refused, so its own CPU falls on every mode alike.

    .venv/bin/python -m benchmarks.metrics_overhead --nvme_path swap --modes off,count,on --rounds 30 \\
        --steps 2 --json bench-out/metrics_overhead.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from infinity import metrics
from infinity.cli.train import DEFAULT_CONFIG, DEFAULT_SPEC
from infinity.exporter import Exporter, start_exporter
from infinity.models.gpt import synthetic_batches
from infinity.train import TrainJob, build_model, load_config
from infinity.zero import initialize

SCRAPER = """
import sys, time, urllib.request
url, interval = sys.argv[1], float(sys.argv[2])
while True:
    started = time.monotonic()
    try:
        urllib.request.urlopen(url, timeout=30).read()
        print(1, flush=True)
    except OSError:
        pass  # no exporter in this mode
    time.sleep(max(interval - (time.monotonic() - started), 0))
"""


class Scraper:
    """One process polling http://127.0.0.1:port/metrics every interval seconds for the whole run."""

    def __init__(self, port: int, interval: float):
        self.port = port
        self.process = subprocess.Popen([sys.executable, "-c", SCRAPER, f"http://127.0.0.1:{port}/metrics",
                                         str(interval)], stdout=subprocess.PIPE, text=True)

    def stop(self) -> int:
        """Stops it; returns how many scrapes succeeded."""
        self.process.terminate()
        out, _ = self.process.communicate(timeout=30)
        return out.count("1")


class Mode:
    """Enters and leaves one mode around a block of steps."""

    def __init__(self, name: str, port: int):
        self.name, self.port = name, port
        self._exporter: Exporter | None = None

    def __enter__(self) -> "Mode":
        if self.name == "count":
            metrics.enable()
        elif self.name == "on":
            self._exporter = start_exporter(self.port, rank=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.name == "count":
            metrics.disable()
        elif self._exporter is not None:
            self._exporter.stop()


def requests_counted() -> int:
    """I/O requests the tally has counted so far (none while metrics are off)."""
    counters = metrics.TALLY.snapshot().counters
    return sum(v for (name, _), v in counters.items() if name == "infinity_io_requests_total")


def timed_steps(engine: Any, batches: list, n: int, first: int) -> list[float]:
    times = []
    for x, y in batches[first:first + n]:
        started = time.perf_counter()
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - started)
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = args.modes.split(",")
    if modes[0] != "off" or not set(modes) <= {"off", "count", "on"} or len(set(modes)) != len(modes):
        raise SystemExit("--modes: off first, then count and/or on (e.g. off,on or off,count,on)")
    job = TrainJob(config=DEFAULT_CONFIG, spec=DEFAULT_SPEC, nvme_path=args.nvme_path, seed=0)
    config = load_config(job)
    model = build_model(job, config)
    engine, *_ = initialize(model=model, config=config)
    total = args.warmup + len(modes) * args.rounds * args.steps
    batches = synthetic_batches(DEFAULT_SPEC, batch=int(config.train_micro_batch_size_per_gpu), steps=total, seed=1)
    port = free_port()
    scraper = Scraper(port, args.scrape_interval)
    rounds, used = [], 0
    try:
        engine.train()
        timed_steps(engine, batches, args.warmup, used)
        used += args.warmup
        for r in range(args.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            order = order[::-1] if (r // len(modes)) % 2 else order
            block: dict[str, Any] = {"order": "-".join(order)}
            for mode in order:
                before = requests_counted()
                with Mode(mode, port):
                    times = timed_steps(engine, batches, args.steps, used)
                used += args.steps
                block[mode] = {"step_s": times, "median_s": statistics.median(times),
                               "requests_counted_per_step": (requests_counted() - before) / args.steps}
            block["ratios"] = {m: block[m]["median_s"] / block["off"]["median_s"] for m in modes[1:]}
            rounds.append(block)
            print(f"round {r + 1}/{args.rounds} ({block['order']}): " + ", ".join(
                f"{m} {block[m]['median_s']:.3f} s/step" for m in modes) + "; " + ", ".join(
                f"{m}/off {v:.4f}" for m, v in block["ratios"].items()), file=sys.stderr)
    finally:
        scrapes = scraper.stop()
        engine.close()
    summary = {}
    for m in modes[1:]:
        ratios = sorted(b["ratios"][m] for b in rounds)
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        summary[m] = {"median_ratio": statistics.median(ratios), "quartiles": [q[0], q[2]],
                      "min_ratio": ratios[0], "max_ratio": ratios[-1],
                      "requests_counted_per_step": statistics.median(b[m]["requests_counted_per_step"]
                                                                     for b in rounds),
                      "median_step_s": statistics.median(s for b in rounds for s in b[m]["step_s"])}
    summary["off"] = {"median_step_s": statistics.median(s for b in rounds for s in b["off"]["step_s"])}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "command": " ".join(["python", "-m", "benchmarks.metrics_overhead", *sys.argv[1:]]),
            "model": {"spec": vars(DEFAULT_SPEC), "config": DEFAULT_CONFIG,
                      "micro_batch": int(config.train_micro_batch_size_per_gpu)},
            "settings": vars(args), "scrapes": scrapes, "summary": summary, "rounds": rounds}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nvme_path", default="swap", help="folder for swap files (default %(default)s)")
    p.add_argument("--modes", default="off,count,on", help="off first, then count and/or on (default %(default)s)")
    p.add_argument("--rounds", type=int, default=30, help="rounds of one block per mode (default %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per block (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="steps before the first round (default %(default)s)")
    p.add_argument("--scrape_interval", type=float, default=1.0, help="seconds between scrapes (default %(default)s)")
    p.add_argument("--json", help="write every step time, the rounds and the summary here")
    args = p.parse_args(argv)
    Path(args.nvme_path).mkdir(parents=True, exist_ok=True)
    result = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for mode, figures in result["summary"].items():
        if mode != "off":
            print(f"metrics {mode} ÷ off, median of {args.rounds} rounds: {figures['median_ratio']:.4f} (quartiles "
                  f"{figures['quartiles'][0]:.4f}–{figures['quartiles'][1]:.4f}, rounds {figures['min_ratio']:.4f}–"
                  f"{figures['max_ratio']:.4f}); {figures['requests_counted_per_step']:.0f} requests counted per step")
    print(f"off: {result['summary']['off']['median_step_s']:.3f} s/step (median); {result['scrapes']} scrapes served")
    return 0


if __name__ == "__main__":
    sys.exit(main())

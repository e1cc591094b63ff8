"""Training a model whose state is larger than RAM, with parameters and optimizer on NVMe (issue 4).

The issue's requirement: a model whose full training state (parameters, gradients, Adam moments) is at
least 1.5 × this machine's RAM trains 2 steps with parameters and optimizer on NVMe, with peak RSS at
most 25% of RAM.  The GPT is built under infinity.zero.Init (each module's parameters go to NVMe as
its parent's constructor returns, so the model is never whole in RAM) and trained through
infinity.initialize with the config below (CONFIG).

    .venv/bin/python -m benchmarks.bounded_memory --nvme_path swap --json bench-out/bounded_memory.json

[Note: how the state is counted]
state = parameters × (2 bf16 weight + 2 bf16 gradient + 4 fp32 master + 8 two fp32 Adam moments)
= 16 bytes per parameter, the usual mixed-precision count.  The engine's swap files hold more: bf16
weights (2) and, per optimizer sub-group, fp32 master, gradient and both moments (16), 18 bytes per
parameter, each tensor padded to 4096 bytes.

Measured: peak RSS of the whole process (kernel's VmHWM = getrusage ru_maxrss; a sampler thread reading
VmRSS every 50 ms gives the peak of each phase), seconds per phase and per step, bytes per step from
the engine's I/O handles (Engine.io_stats: bytes of completed requests) and from /proc/diskstats (what
the device moved, other processes included), engine.memory_report(), and infinity-estimate's
prediction for the same model and config.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch

import infinity
from infinity.bench.diskstats import DiskProbe, device_bytes
from infinity.config import Config
from infinity.estimate import Cluster, count_module, estimate
from infinity.estimate.tiers import NVME, Option, ZeroInit
from infinity.io import check_nvme_path
from infinity.models.gpt import Gpt, GptSpec, synthetic_batches

GIB = 2 ** 30
STATE_BYTES_PER_PARAM = 2 + 2 + 4 + 8  # see [Note: how the state is counted]
SWAP_BYTES_PER_PARAM = 2 + 16
SPEC = GptSpec(vocab=8192, context=64, hidden=3072, layers=22, heads=24)

# The benchmark's config (nvme-local.json's settings, with the pools sized for the RSS budget).
CONFIG: dict[str, Any] = {
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
    "zero_optimization": {
        "stage": 3,
        # Sub-groups of about one 4h x h matrix (37.7M elements at hidden 3072): 151 MB per fp32 buffer.
        "sub_group_size": 40_000_000,
        "stage3_param_persistence_threshold": 100_000,  # layer norms and biases stay resident
        "offload_param": {"device": "nvme", "nvme_path": "swap", "pin_memory": True, "buffer_count": 5,
                          "buffer_size": 40_000_000, "max_in_cpu": 0},
        # 4 buffers per sub-group x (1 updating + 1 read ahead + 1 writing behind) = 12 buffers.
        "offload_optimizer": {"device": "nvme", "nvme_path": "swap", "pin_memory": True, "buffer_count": 4,
                              "pipeline_read": True, "pipeline_write": True},
    },
    "aio": {"backend": "auto", "block_size": 1048576, "queue_depth": 32, "intra_op_parallelism": 4,
            "single_submit": False, "overlap_events": True},
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "train_micro_batch_size_per_gpu": 1,
}


def ram_bytes() -> int:
    """MemTotal of /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemTotal")


def status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples VmRSS every `period` seconds in a thread; `phase(name)` starts a new phase's peak."""

    def __init__(self, period: float = 0.05):
        self.period, self.peaks, self._name = period, {}, "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = status_bytes("VmRSS")
            self.peaks[self._name] = max(self.peaks.get(self._name, 0), rss)
            self._stop.wait(self.period)

    def phase(self, name: str) -> None:
        self._name = name
        self.peaks[name] = status_bytes("VmRSS")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def disk_usage(folder: Path) -> int:
    """Bytes the files under folder take on the drive."""
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


def config_for(nvme_path: str) -> dict[str, Any]:
    cfg = copy.deepcopy(CONFIG)
    for block in ("offload_param", "offload_optimizer"):
        cfg["zero_optimization"][block]["nvme_path"] = nvme_path
    return cfg


def predicted(spec: GptSpec, config: Config) -> dict[str, Any]:
    """infinity-estimate's row for this model (counted on the meta device) and config."""
    with torch.device("meta"):
        size = count_module(Gpt(spec))
    result = estimate(size, Cluster(), config)
    row = next(r for r in result.rows if r.option == Option(NVME, NVME, ZeroInit.ON))
    return {"host_bytes": row.need.host_per_node, "nvme_bytes": row.need.nvme_per_node,
            "host_parts": dict(row.need.host_parts), "notes": list(result.notes)}


def git_state() -> dict[str, Any]:
    """The checkout's commit and modified files (INFINITY_BENCH_COMMIT names it for an exported tree)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()
    return {"commit": os.environ.get("INFINITY_BENCH_COMMIT") or git("rev-parse", "HEAD"),
            "modified": [line for line in git("status", "--short", "--untracked-files=no").split("\n") if line]}


def train_steps(engine: Any, spec: GptSpec, steps: int, batch: int, probe: DiskProbe,
                sampler: RssSampler) -> Iterator[dict[str, Any]]:
    data = synthetic_batches(spec, batch, steps)  # spec.context is the sequence length
    for n, (x, y) in enumerate(data, 1):
        sampler.phase(f"step {n} forward")
        io, disk = engine.io_stats(), probe.snapshot()
        t0 = time.perf_counter()
        loss = engine(x, y)
        t1 = time.perf_counter()
        sampler.phase(f"step {n} backward")
        engine.backward(loss)
        t2 = time.perf_counter()
        sampler.phase(f"step {n} optimizer")
        engine.step()
        t3 = time.perf_counter()
        after = engine.io_stats()
        end = probe.snapshot()
        yield {"step": n, "loss": float(loss.detach()), "seconds": t3 - t0, "forward_s": t1 - t0, "backward_s": t2 - t1,
               "optimizer_s": t3 - t2, "io_read_bytes": after.bytes_read - io.bytes_read,
               "io_written_bytes": after.bytes_written - io.bytes_written,
               "io_requests": after.requests - io.requests,
               "device_read_bytes": device_bytes(disk, end, reading=True),
               "device_written_bytes": device_bytes(disk, end, reading=False),
               "peak_rss_bytes": max(sampler.peaks[f"step {n} {part}"] for part in ("forward", "backward", "optimizer"))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = GptSpec(vocab=args.vocab, context=max(args.seq, 1), hidden=args.hidden, layers=args.layers,
                   heads=args.heads)
    ram, count = ram_bytes(), spec.parameters
    swap_need = count * SWAP_BYTES_PER_PARAM
    folder = os.path.abspath(check_nvme_path(args.nvme_path, need_bytes=swap_need + 2 * GIB))
    raw = config_for(folder)
    raw["zero_optimization"]["sub_group_size"] = args.sub_group_size
    config = Config.load(raw)
    print(f"model {count / 1e9:.3f}B parameters; state {count * STATE_BYTES_PER_PARAM / 1e9:.1f} GB = "
          f"{count * STATE_BYTES_PER_PARAM / ram:.2f} x RAM ({ram / GIB:.2f} GiB); swap files about "
          f"{swap_need / 1e9:.1f} GB; RSS budget {0.25 * ram / GIB:.2f} GiB", flush=True)
    prediction = predicted(spec, config)
    probe = DiskProbe.for_path(folder)
    sampler = RssSampler()
    phases: dict[str, float] = {}
    torch.manual_seed(0)
    sampler.phase("build")
    t = time.perf_counter()
    with infinity.zero.Init(config=config):
        model = Gpt(spec)
    phases["build_s"] = time.perf_counter() - t
    print(f"built under zero.Init in {phases['build_s']:.0f} s, RSS peak {sampler.peaks['build'] / GIB:.2f} GiB",
          flush=True)
    sampler.phase("initialize")
    t = time.perf_counter()
    engine, *_ = infinity.initialize(model=model, config=config)
    phases["initialize_s"] = time.perf_counter() - t
    print(f"initialized in {phases['initialize_s']:.0f} s, RSS peak {sampler.peaks['initialize'] / GIB:.2f} GiB",
          flush=True)
    steps = []
    try:
        for record in train_steps(engine, spec, args.steps, args.batch, probe, sampler):
            steps.append(record)
            print(f"step {record['step']}: loss {record['loss']:.4f}, {record['seconds']:.1f} s "
                  f"(forward {record['forward_s']:.1f}, backward {record['backward_s']:.1f}, optimizer "
                  f"{record['optimizer_s']:.1f}), engine read {record['io_read_bytes'] / 1e9:.1f} GB + wrote "
                  f"{record['io_written_bytes'] / 1e9:.1f} GB, device read {_gb(record['device_read_bytes'])} + "
                  f"wrote {_gb(record['device_written_bytes'])}, RSS peak {record['peak_rss_bytes'] / GIB:.2f} GiB",
                  flush=True)
        report = engine.memory_report()
        swap_files = disk_usage(Path(folder) / "infinity-swap" / "rank-0" / f"run-{os.getpid()}")
    finally:
        engine.close()
        sampler.stop()
    hwm = status_bytes("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {ram / GIB:.2f} GiB, "
                   f"{probe.device or 'no block device'}",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "git": git_state(),
        "config": raw, "spec": asdict(spec), "batch": args.batch, "seq": args.seq,
        "ram_bytes": ram, "parameters": count, "state_bytes": count * STATE_BYTES_PER_PARAM,
        "state_over_ram": count * STATE_BYTES_PER_PARAM / ram, "swap_file_bytes": swap_files,
        "peak_rss_bytes": max(hwm, maxrss), "vm_hwm_bytes": hwm, "ru_maxrss_bytes": maxrss,
        "peak_rss_over_ram": max(hwm, maxrss) / ram, "phase_peak_rss_bytes": dict(sampler.peaks),
        "phases": phases, "steps": steps, "memory_report": report.to_dict(), "estimate": prediction,
    }


def _gb(nbytes: int | None) -> str:
    return "?" if nbytes is None else f"{nbytes / 1e9:.1f} GB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nvme_path", default="swap")
    p.add_argument("--hidden", type=int, default=SPEC.hidden)
    p.add_argument("--layers", type=int, default=SPEC.layers)
    p.add_argument("--vocab", type=int, default=SPEC.vocab)
    p.add_argument("--heads", type=int, default=SPEC.heads)
    p.add_argument("--sub_group_size", type=int, default=CONFIG["zero_optimization"]["sub_group_size"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    result = run(args)
    ram = result["ram_bytes"]
    print(f"peak RSS {result['peak_rss_bytes'] / GIB:.2f} GiB = {result['peak_rss_over_ram']:.1%} of RAM "
          f"(budget 25%); state {result['state_over_ram']:.2f} x RAM")
    print(json.dumps({k: result[k] for k in ("phase_peak_rss_bytes", "memory_report", "estimate")}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["peak_rss_bytes"] <= 0.25 * ram and result["state_over_ram"] >= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Parameter swap-in of a whole model against the async-IO engine's bandwidth on the same file (issue 4).

A GPT is built under infinity.zero.Init, so its bf16 parameters sit in one swap file (param.swp), one
extent each, as the engine keeps them.  Each round then reads that file, after dropping its cached pages,
with every method below, in alternating order, and the ratio swap-in GB/s ÷ raw GB/s is taken per round:

  raw       the engine's handle (the same one the manager uses, so the same aio settings) reads the whole
            file in one request into one HostBuffer: the bandwidth to keep up with
  swap-in   NvmeHome.read_ahead then fetch: every parameter NVMe → pooled host buffer → compute tier
            (CPU), up to offload_param.buffer_count reads in flight (started ahead in order of use, as
            the engine's coordinator does), each released after it arrives
  fetch     NvmeHome.fetch / release, one parameter at a time, no read ahead
  fio       fio on the same file, libaio, direct=1, the same block size, iodepth and jobs (context only)

    .venv/bin/python -m benchmarks.param_swap_in --nvme_path swap --hidden 2048 --layers 32 --rounds 5 \\
        --json bench-out/param_swap_in.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from infinity.bench.diskstats import DiskProbe, device_bytes
from infinity.bench.fio import fio_binary, run_fio
from infinity.config import Config
from infinity.io import Op, check_nvme_path, open_file
from infinity.io.files import Access
from infinity.memory import HostBuffer
from infinity.memory.pool import BufferPool
from infinity.models.gpt import Gpt, GptSpec
from infinity.swap.params import NvmeHome
from infinity.zero import Init
from infinity.zero.init import placed
from infinity.zero.from_config import settings_from_config

CONFIG = Path(__file__).resolve().parent.parent / "infinity" / "config" / "shipped" / "nvme-local.json"


@dataclass(frozen=True)
class Run:
    method: str
    round: int
    nbytes: int
    seconds: float
    device_bytes_ratio: float | None

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9


def config_for(nvme_path: str, buffer_count: int | None, persistence_threshold: int | None = None) -> Config:
    """The shipped nvme-local config with nvme_path, and optionally buffer_count and the persistence threshold."""
    raw = copy.deepcopy(json.loads(CONFIG.read_text()))
    zero = raw["zero_optimization"]
    for block in ("offload_param", "offload_optimizer"):
        zero[block]["nvme_path"] = nvme_path
    if buffer_count is not None:
        zero["offload_param"]["buffer_count"] = buffer_count
    if persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    return Config.load(raw)


def git_state() -> dict[str, Any]:
    """The checkout's commit and modified files (INFINITY_BENCH_COMMIT names it for an exported tree)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()
    return {"commit": os.environ.get("INFINITY_BENCH_COMMIT") or git("rev-parse", "HEAD"),
            "modified": [line for line in git("status", "--short", "--untracked-files=no").split("\n") if line]}


class Model:
    """A GPT built under zero.Init, its parameters in the manager the engine would take over."""

    def __init__(self, config: Config, spec: GptSpec):
        settings = settings_from_config(config)
        with Init(config=config) as init:
            self.module = Gpt(spec)
        if init.run is None:
            raise SystemExit("the config does not put parameters on nvme; zero.Init placed nothing")
        # Parameters above stage3_param_persistence_threshold went to NVMe (the engine's offloaded set);
        # the rest stay resident and are not part of a swap-in.
        records = {i: r for i, r in enumerate(placed(p) for p in self.module.parameters()) if r is not None}
        self.manager = init.run.take(settings)
        dtype = init.run.dtype
        shapes = {i: r.shape for i, r in records.items()}
        largest = max(s.numel() for s in shapes.values()) * torch.empty(0, dtype=dtype).element_size()
        self.pool = BufferPool("param", settings.param_buffer_count, largest, "offload_param.buffer_count")
        self.home = NvmeHome(self.manager, self.pool, {i: str(i) for i in shapes}, shapes, dtype,
                             adopted={i: r.key for i, r in records.items()})
        self.indices = list(shapes)
        self.keys = [self.home.key(i) for i in self.indices]
        self.param_bytes = sum(self.manager.store.extent(k).nbytes for k in self.keys)
        self.path = self.manager.store.extent(self.keys[0]).path
        self.file_bytes = os.path.getsize(self.path)
        self.count = sum(s.numel() for s in shapes.values())
        self.resident = sum(p.numel() for p in self.module.parameters())

    def close(self) -> None:
        self.manager.close()


def methods(model: Model, config: Config, with_fio: bool) -> dict[str, Callable[[], tuple[int, float]]]:
    """Each method reads the model's parameters once; returns (bytes asked for, seconds)."""
    whole = HostBuffer(model.file_bytes)
    handle = model.manager.handle

    def timed(go: Callable[[], int]) -> Callable[[], tuple[int, float]]:
        def run() -> tuple[int, float]:
            start = time.perf_counter()
            nbytes = go()
            return nbytes, time.perf_counter() - start
        return run

    def raw() -> int:
        handle.pread(whole.tensor, model.path, 0)
        return model.file_bytes

    def swapped_in() -> int:  # reads kept ahead as far as the pool allows, as the coordinator keeps them
        ahead = 0
        for n, i in enumerate(model.indices):
            ahead = max(ahead, n)
            while ahead < len(model.indices) and model.home.read_ahead(model.indices[ahead]):
                ahead += 1
            model.home.fetch(i)
            model.home.release(i)
        return model.param_bytes

    def fetched() -> int:
        for i in model.indices:
            model.home.fetch(i)
            model.home.release(i)
        return model.param_bytes

    out = {"raw": timed(raw), "swap-in": timed(swapped_in), "fetch": timed(fetched)}
    fio = fio_binary()
    if fio and with_fio:  # fio times itself
        out["fio"] = lambda: (model.file_bytes,
                              model.file_bytes / (run_fio(fio, config.aio, Op.READ, model.path, model.file_bytes) * 1e9))
    return out


def measure(name: str, go: Callable[[], tuple[int, float]], model: Model, probe: DiskProbe, rnd: int) -> Run:
    with open_file(model.path, Access.READ) as f:
        f.drop_cached_pages()
    before = probe.snapshot()
    nbytes, seconds = go()
    moved = device_bytes(before, probe.snapshot(), reading=True)
    return Run(name, rnd, nbytes, seconds, moved / nbytes if moved is not None else None)


def summarize(runs: list[Run]) -> dict[str, Any]:
    by: dict[str, dict[int, Run]] = {}
    for r in runs:
        by.setdefault(r.method, {})[r.round] = r
    raw = by["raw"]
    out: dict[str, Any] = {}
    for method, rs in by.items():
        gbps = [r.gbps for r in rs.values()]
        row: dict[str, Any] = {"median_gbps": statistics.median(gbps), "min_gbps": min(gbps), "max_gbps": max(gbps),
                               "device_bytes_ratio": [r.device_bytes_ratio for r in rs.values()]}
        if method != "raw":
            ratios = [r.gbps / raw[n].gbps for n, r in rs.items()]
            row["over_raw_per_round"] = ratios
            row["over_raw_median"] = statistics.median(ratios)
        out[method] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nvme_path", default="swap")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--buffer_count", type=int, default=None, help="offload_param.buffer_count (default: the "
                   "config's)")
    p.add_argument("--persistence_threshold", type=int, default=None, help="stage3_param_persistence_threshold "
                   "(default: the config's; 0 puts every parameter, layer norms and biases too, on NVMe)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no_fio", action="store_true")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    spec = GptSpec(vocab=args.vocab, context=64, hidden=args.hidden, layers=args.layers, heads=args.heads)
    folder = os.path.abspath(check_nvme_path(args.nvme_path, need_bytes=2 * spec.parameters + (1 << 30)))
    config = config_for(folder, args.buffer_count, args.persistence_threshold)
    probe = DiskProbe.for_path(folder)
    t0 = time.perf_counter()
    model = Model(config, spec)
    print(f"built {model.count / 1e9:.3f}B parameters ({model.param_bytes / 1e9:.2f} GB bf16) in "
          f"{time.perf_counter() - t0:.0f} s; {len(model.keys)} partitions; param pool "
          f"{model.pool.buffer_count} x {model.pool.buffer_bytes / 1e6:.1f} MB", flush=True)
    runs: list[Run] = []
    try:
        tools = methods(model, config, not args.no_fio)
        names = list(tools)
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]  # alternate, so drift favours no method
            for name in order:
                run = measure(name, tools[name], model, probe, rnd)
                runs.append(run)
                print(f"round {rnd} {name:8} {run.gbps:6.2f} GB/s  {run.seconds:6.2f} s  device/requested "
                      f"{run.device_bytes_ratio if run.device_bytes_ratio is None else round(run.device_bytes_ratio, 3)}",
                      flush=True)
            raw = next(r for r in runs if r.round == rnd and r.method == "raw")
            mine = next(r for r in runs if r.round == rnd and r.method == "swap-in")
            print(f"round {rnd} swap-in / raw = {mine.gbps / raw.gbps:.3f}", flush=True)
    finally:
        model.close()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
                         f"{probe.device or 'no block device'}",
              "command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "git": git_state(),
              "model": {"spec": asdict(spec), "parameters": model.count, "param_bytes": model.param_bytes,
                        "file_bytes": model.file_bytes, "partitions": len(model.keys),
                        "resident_parameters": model.resident},
              "aio": config.aio.to_dict(), "param_buffer_count": model.pool.buffer_count,
              "summary": summarize(runs), "runs": [asdict(r) | {"gbps": r.gbps} for r in runs]}
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

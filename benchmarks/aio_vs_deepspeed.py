"""Sequential read and write of one file: infinity's libaio engine against DeepSpeed's aio op.

Same settings, interleaved in one run (infinity, DeepSpeed, ... per round, --pairs rounds), fio at the
same settings and at its own best (bs 4M, 2 jobs) in the same rounds, and the device bytes each run
moved (from /proc/diskstats) against the bytes it asked for.

    benchmarks/setup_deepspeed.sh                      # once: DeepSpeed in ../dsvenv, aio op built
    .venv/bin/python benchmarks/aio_vs_deepspeed.py --nvme_path swap --io_size 1G --pairs 5 \\
        --json bench-out/aio_vs_deepspeed.json

Tools measured (each a row of the summary):
  infinity            HostBuffer (2 MiB huge pages), DirectPolicy.REQUIRE
  infinity-4k-pages   HostBuffer with PagePolicy.BASE: the same engine on the kernel's default pages
  deepspeed           DeepSpeed's aio_handle on its own new_cpu_locked_tensor, as its benchmark uses it
  deepspeed-huge      DeepSpeed's aio_handle on a huge-page buffer: the two engines on the same memory
  fio                 fio, libaio, direct=1, same block size, iodepth and jobs
  fio-best            fio at bs 4M, iodepth 32, 2 jobs
"""
from __future__ import annotations

import argparse
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
from typing import Callable

from infinity.bench.diskstats import DiskProbe, device_bytes
from infinity.bench.fio import fio_binary, run_fio
from infinity.bench.sizes import parse_size
from infinity.config.aio import AioConfig, Backend
from infinity.io import DirectPolicy, Op, check_nvme_path, open_file, open_handle
from infinity.io.files import Access
from infinity.memory import HostBuffer, PagePolicy

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Run:
    tool: str
    op: str
    round: int
    gbps: float
    device_bytes_ratio: float | None


class DeepSpeedWorker:
    """DeepSpeed's aio op in its own interpreter, driven one JSON line at a time."""

    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, str(HERE / "deepspeed_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     cwd="/tmp")
        self._reply()

    def _reply(self) -> dict:
        for line in self.proc.stdout:  # DeepSpeed may print banners first
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError("DeepSpeed worker exited; run benchmarks/setup_deepspeed.sh first")

    def seconds(self, op: str, path: str, nbytes: int, cfg: AioConfig, memory: str) -> float:
        cmd = dict(op=op, path=path, nbytes=nbytes, block_size=cfg.block_size, queue_depth=cfg.queue_depth,
                   single_submit=cfg.single_submit, overlap_events=cfg.overlap_events,
                   threads=cfg.thread_count, memory=memory)
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if reply["rc"] < 0:
            raise RuntimeError(f"DeepSpeed's {op} of {path} failed with return code {reply['rc']}")
        return reply["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def drop_cache(path: str) -> None:
    with open_file(path, Access.READ) as f:
        f.drop_cached_pages()


def measure(op: str, nbytes: int, probe: DiskProbe, go: Callable[[], float]) -> tuple[float, float | None]:
    """(GB/s, device bytes / requested bytes) of one timed transfer."""
    before = probe.snapshot()
    seconds = go()
    moved = device_bytes(before, probe.snapshot(), reading=op == "read")
    return nbytes / seconds / 1e9, (moved / nbytes if moved is not None else None)


def build_tools(args: argparse.Namespace, cfg: AioConfig, path: str, nbytes: int) -> dict[str, Callable[[str], float]]:
    handle = open_handle(cfg, nvme_path=args.nvme_path, direct=DirectPolicy.REQUIRE)
    huge, base = HostBuffer(nbytes), HostBuffer(nbytes, pages=PagePolicy.BASE)
    huge.tensor.random_(0, 255)
    base.tensor.copy_(huge.tensor)
    file = open_file(path, Access.READ_WRITE)

    def ours(buf: HostBuffer) -> Callable[[str], float]:
        def go(op: str) -> float:
            start = time.perf_counter()
            (handle.pread if op == "read" else handle.pwrite)(buf.tensor, file, 0)
            return time.perf_counter() - start
        return go

    tools: dict[str, Callable[[str], float]] = {"infinity": ours(huge), "infinity-4k-pages": ours(base)}
    if args.ds_python:
        ds = DeepSpeedWorker(args.ds_python)
        tools["deepspeed"] = lambda op: ds.seconds(op, path, nbytes, cfg, "locked")
        tools["deepspeed-huge"] = lambda op: ds.seconds(op, path, nbytes, cfg, "huge")
    fio = fio_binary()
    best = AioConfig(block_size=4 << 20, queue_depth=32, intra_op_parallelism=2)
    for name, setting in (("fio", cfg), ("fio-best", best)):
        if fio:  # fio reports its own GB/s; turned back into seconds for the common measure()
            tools[name] = (lambda st: lambda op: nbytes / (run_fio(fio, st, Op[op.upper()], path, nbytes) * 1e9))(setting)
    return tools


def summarize(runs: list[Run]) -> dict:
    out: dict = {}
    for op in ("write", "read"):
        by_tool: dict[str, list[Run]] = {}
        for r in runs:
            if r.op == op:
                by_tool.setdefault(r.tool, []).append(r)
        rows = {tool: {"median_gbps": statistics.median(x.gbps for x in rs),
                       "min_gbps": min(x.gbps for x in rs), "max_gbps": max(x.gbps for x in rs),
                       "median_device_bytes_ratio": (statistics.median(x.device_bytes_ratio for x in rs)
                                                     if rs[0].device_bytes_ratio is not None else None)}
                for tool, rs in by_tool.items()}
        ours = {r.round: r.gbps for r in by_tool["infinity"]}
        for tool, rs in by_tool.items():
            if tool != "infinity":  # per-round ratios, then their median: drift between rounds cancels
                rows[tool]["infinity_over_this_median"] = statistics.median(ours[r.round] / r.gbps for r in rs)
        out[op] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nvme_path", default="swap")
    p.add_argument("--io_size", default="1G")
    p.add_argument("--block_size", default="1M")
    p.add_argument("--queue_depth", type=int, default=32)
    p.add_argument("--thread_count", type=int, default=1)
    p.add_argument("--pairs", type=int, default=5, help="rounds; each runs every tool once per op")
    p.add_argument("--ds_python", default=str(HERE.parent.parent / "dsvenv" / "bin" / "python"),
                   help="DeepSpeed's interpreter ('' to skip DeepSpeed)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    nbytes = parse_size(args.io_size)
    cfg = AioConfig(block_size=parse_size(args.block_size), queue_depth=args.queue_depth,
                    intra_op_parallelism=args.thread_count, backend=Backend.LIBAIO)
    folder = os.path.abspath(check_nvme_path(args.nvme_path, need_bytes=nbytes))  # the worker runs elsewhere
    path = os.path.join(folder, f"aio-vs-deepspeed-{os.getpid()}.dat")
    probe = DiskProbe.for_path(folder)
    runs: list[Run] = []
    try:
        tools = build_tools(args, cfg, path, nbytes)
        for tool in tools.values():  # warm-up: every tool writes once (file extents exist, handles built)
            tool("write")
        for op in ("write", "read"):
            for rnd in range(args.pairs):
                for name, tool in tools.items():
                    if op == "read":
                        drop_cache(path)
                    gbps, ratio = measure(op, nbytes, probe, lambda: tool(op))
                    runs.append(Run(name, op, rnd, gbps, ratio))
                    print(f"{op:5} round {rnd} {name:18} {gbps:6.2f} GB/s  device/requested "
                          f"{ratio if ratio is None else round(ratio, 3)}", flush=True)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
                         f"{probe.device or 'no block device'}",
              "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
              "settings": cfg.to_dict(), "io_size": nbytes, "summary": summarize(runs),
              "runs": [asdict(r) for r in runs]}
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

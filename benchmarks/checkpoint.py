"""Checkpoint save and load of NVMe-resident state against the async-IO engine's own bandwidth (issue 7).

A GPT is built under infinity.zero.Init and trained one step through infinity.initialize with its bf16
parameters and its fp32 master weights and Adam moments in swap files (so every byte of state is real
on the drive).  SWAP is --nvme_path, CKPT is --ckpt_path (by default a folder in SWAP: the same drive).
Each round then runs, in alternating order:

  save          engine.save_checkpoint(CKPT, tag): swap files -> checkpoint files through the run's handle
                (reads N bytes in SWAP, writes N in CKPT, checksum of every byte), N = the checkpoint's bytes
  load          engine.load_checkpoint(CKPT, tag), the checkpoint's cached pages dropped first (reads N in
                CKPT, writes N in SWAP, checksums checked)
  raw write X   the run's own handle (same aio settings) writes N bytes into a new file in X (SWAP or
                CKPT) from one host buffer, two requests of --raw_chunk bytes in flight, then fsync
  raw read X    the same handle reads that file's N bytes back, cached pages dropped first
  copy out/in   the same handle copies N bytes from a file in SWAP into a new file in CKPT (out) or from
                CKPT into SWAP (in), reads and writes in flight at once (--raw_chunk / 4 bytes apiece),
                then fsync: the engine's own bandwidth for the bytes a save (out) or a load (in) moves,
                with no format and no checksum
  checksum      the checkpoint's checksum (format.CHECKSUM: crc32c) of N bytes in 8 MiB updates, one core
  sha256        the same with sha256 (what checkpoints used before crc32c), for comparison

Per round: save and load GB/s over the engine's copy the same way (save / copy out, load / copy in),
and over one way (the slower side's raw figure: save / min(raw read SWAP, raw write CKPT), load /
min(raw read CKPT, raw write SWAP)); medians of the rounds are reported.  With SWAP and CKPT on one
drive a copy moves 2N bytes through it, so no copy reaches one way; on two drives it can.  Peak RSS
growth during a save is sampled every 2 ms from /proc/self/status (VmRSS above the value just before).
With --consolidate, infinity-consolidate of the last checkpoint runs in a fresh process and its peak RSS
(VmHWM) is set against a process that only imports it, and against the largest tensor.

    python -m benchmarks.checkpoint --nvme_path swap --hidden 1024 --layers 8 --rounds 5 --consolidate \\
        --json bench-out/checkpoint.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

import infinity
from infinity.checkpoint.format import CHECKSUM, new_checksum
from infinity.io import check_nvme_path, open_file
from infinity.io.files import Access
from infinity.memory import HostBuffer
from infinity.models.gpt import Gpt, GptSpec, synthetic_batches
from infinity.zero import Engine, Init

from benchmarks.bounded_memory import config_for, git_state, status_bytes


class RssPeak:
    """Highest VmRSS seen by a thread sampling every `period` seconds while the block runs, above the
    value when it began."""

    def __init__(self, period: float = 0.002):
        self.period, self.base, self.peak = period, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_bytes("VmRSS"))
            self._stop.wait(self.period)

    def __enter__(self) -> "RssPeak":
        self.base = self.peak = status_bytes("VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_bytes("VmRSS"))

    @property
    def growth(self) -> int:
        return self.peak - self.base


def drop_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open_file(path, Access.READ) as f:
                f.drop_cached_pages()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class Raw:
    """N bytes through the run's own async-IO handle: written to and read from a file in the swap folder
    (where a save reads and a load writes) and in the checkpoint folder (where a save writes and a load
    reads), and copied between the two in both directions."""

    def __init__(self, engine: Engine, swap: Path, ckpt: Path, nbytes: int, chunk: int):
        handle = engine.run.io_handle()
        if handle is None:
            raise SystemExit("the benchmark's config puts nothing on NVMe: the engine has no async-IO handle")
        self.handle = handle
        self.folders, self.nbytes = {"swap": swap, "ckpt": ckpt}, nbytes
        self.buffer = HostBuffer(min(chunk, -(-nbytes // 4096) * 4096))
        self.buffer.tensor.fill_(7)
        for side in self.folders:
            self.write(side)  # every file a round reads exists from the start

    def path(self, side: str, name: str = "raw-bench.bin") -> Path:
        return self.folders[side] / name

    def _requests(self, submit: Callable[..., Any], file: Any) -> None:
        in_flight, pos, size = [], 0, self.buffer.nbytes
        while pos < self.nbytes:
            if len(in_flight) == 2:
                in_flight.pop(0).wait()
            n = min(size, -(-(self.nbytes - pos) // 4096) * 4096)
            in_flight.append(submit(self.buffer.tensor[:n], file, pos))
            pos += n
        for f in in_flight:
            f.wait()

    def write(self, side: str) -> float:
        """Seconds to write N bytes into a new file on side, fsync included (as a save writes new files)."""
        self.path(side).unlink(missing_ok=True)
        started = time.perf_counter()
        with open_file(self.path(side), Access.WRITE) as file:
            self._requests(self.handle.submit_write, file)
            os.fsync(file.buffered_fd)
        return time.perf_counter() - started

    def read(self, side: str) -> float:
        with open_file(self.path(side), Access.READ) as file:
            file.drop_cached_pages()
            started = time.perf_counter()
            self._requests(self.handle.submit_read, file)
            return time.perf_counter() - started

    def hash(self, algorithm: str, chunk: int = 8 << 20) -> float:
        """Seconds for the checksum of N bytes, fed in chunks as a save feeds it, on this thread."""
        digest, data = new_checksum(algorithm), self.buffer.tensor.numpy()
        started = time.perf_counter()
        for pos in range(0, self.nbytes, chunk):
            at = pos % self.buffer.nbytes
            digest.update(data[at:at + min(chunk, self.nbytes - pos)])
        return time.perf_counter() - started

    def copy(self, source: str, target: str) -> float:
        """Seconds to copy source's file into a new file on target, fsync included: reads and writes of
        chunk / 4 in flight at once."""
        out_path = self.path(target, "raw-copy.bin")
        out_path.unlink(missing_ok=True)
        quarter = self.buffer.nbytes // 4 // 4096 * 4096
        views = [self.buffer.tensor[i * quarter:(i + 1) * quarter] for i in range(4)]
        with open_file(self.path(source), Access.READ) as src, open_file(out_path, Access.WRITE) as out:
            src.drop_cached_pages()
            started = time.perf_counter()
            in_flight: list[Any] = []
            for i, pos in enumerate(range(0, self.nbytes, quarter)):
                n = min(quarter, -(-(self.nbytes - pos) // 4096) * 4096)
                read, write = views[i % 2][:n], views[2 + i % 2][:n]
                while len(in_flight) >= 2:  # the read into `read` two chunks ago is done
                    in_flight.pop(0).wait()
                # [Note: what this copies]  A real copy writes chunk i after reading it; this one writes the
                # other half of the buffer while reading, so reads and writes overlap fully: an upper bound.
                in_flight += [self.handle.submit_read(read, src, pos), self.handle.submit_write(write, out, pos)]
            for f in in_flight:
                f.wait()
            os.fsync(out.buffered_fd)
            seconds = time.perf_counter() - started
        out_path.unlink()
        return seconds

    def remove(self) -> None:
        for side in self.folders:
            self.path(side).unlink(missing_ok=True)


def build(args: argparse.Namespace, folder: str) -> tuple[Engine, GptSpec]:
    spec = GptSpec(vocab=args.vocab, context=64, hidden=args.hidden, layers=args.layers, heads=args.heads)
    config = config_for(folder)
    config["zero_optimization"]["sub_group_size"] = args.sub_group_size
    config["zero_optimization"]["offload_param"]["buffer_size"] = args.sub_group_size
    torch.manual_seed(0)
    with Init(config=config):
        model = Gpt(spec)
    engine, *_ = infinity.initialize(model=model, config=config)
    x, y = synthetic_batches(spec, batch=1, steps=1)[0]
    x, y = x[:, :16], y[:, :16]
    engine.backward(engine(x, y))
    engine.step()  # every optimizer state is now written (unwritten extents read as zeros without I/O)
    return engine, spec


def one_round(engine: Engine, ckpt: Path, raw: Raw, r: int) -> dict[str, Any]:
    tag = f"round{r}"
    row: dict[str, Any] = {"round": r}

    def save() -> None:
        with RssPeak() as rss:
            started = time.perf_counter()
            engine.save_checkpoint(ckpt, tag=tag)
            row["save_s"] = time.perf_counter() - started
        row["save_rss_growth"] = rss.growth
        row["bytes"] = folder_bytes(ckpt / tag)

    def load() -> None:
        drop_cache(ckpt / tag)
        with RssPeak() as rss:
            started = time.perf_counter()
            engine.load_checkpoint(ckpt, tag=tag)
            row["load_s"] = time.perf_counter() - started
        row["load_rss_growth"] = rss.growth

    def raw_write_ckpt() -> None:
        row["raw_write_ckpt_s"] = raw.write("ckpt")

    def raw_write_swap() -> None:
        row["raw_write_swap_s"] = raw.write("swap")

    def raw_read_ckpt() -> None:
        row["raw_read_ckpt_s"] = raw.read("ckpt")

    def raw_read_swap() -> None:
        row["raw_read_swap_s"] = raw.read("swap")

    def copy_out() -> None:
        row["copy_out_s"] = raw.copy("swap", "ckpt")

    def copy_in() -> None:
        row["copy_in_s"] = raw.copy("ckpt", "swap")

    def checksum() -> None:
        row["checksum_s"] = raw.hash(CHECKSUM)

    def sha256() -> None:
        row["sha256_s"] = raw.hash("sha256")

    writes = [save, raw_write_ckpt, raw_write_swap, copy_out]
    reads = [load, raw_read_ckpt, raw_read_swap, copy_in]
    if r % 2:
        writes, reads = writes[::-1], reads[::-1]
    row["order"] = "-".join(f.__name__ for f in writes + reads + [checksum, sha256])
    for go in writes + reads + [checksum, sha256]:
        go()
    gb = row["bytes"] / 1e9
    row.update(save_gbps=gb / row["save_s"], load_gbps=gb / row["load_s"])
    for key in ("raw_write_ckpt", "raw_write_swap", "raw_read_ckpt", "raw_read_swap", "copy_out", "copy_in", "checksum", "sha256"):
        row[f"{key}_gbps"] = raw.nbytes / 1e9 / row[f"{key}_s"]
    # one way: the slower of the two sides a save (swap read, checkpoint write) or a load moves bytes on
    row["save_over_one_way"] = row["save_gbps"] / min(row["raw_read_swap_gbps"], row["raw_write_ckpt_gbps"])
    row["load_over_one_way"] = row["load_gbps"] / min(row["raw_read_ckpt_gbps"], row["raw_write_swap_gbps"])
    # the engine copying the same N bytes the same way between the same two folders
    row["save_over_copy"] = row["save_gbps"] / row["copy_out_gbps"]
    row["load_over_copy"] = row["load_gbps"] / row["copy_in_gbps"]
    return row


def consolidation_rss(ckpt: Path, tag: str, out: Path, largest: int) -> dict[str, Any]:
    """Peak RSS (VmHWM) of infinity-consolidate in a fresh process, against one that only imports it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                       os.environ.get("PYTHONPATH")]))}

    def peak(argv: list[str]) -> tuple[int, float]:
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of this large process
        # would report at least the parent's RSS at fork
        code = ("import sys; from infinity.cli.consolidate import main; "
                "rc = main(sys.argv[1:]) if len(sys.argv) > 1 else 0; "
                "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; "
                "print(int(hwm.split()[1])); sys.exit(rc)")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"consolidate failed: {done.stderr}")
        return int(done.stdout.split()[-1]) * 1024, time.perf_counter() - started
    base, _ = peak([])
    used, seconds = peak([str(ckpt), str(out), "--tag", tag])
    written = out.stat().st_size
    out.unlink()
    return {"import_only_hwm": base, "consolidate_hwm": used, "growth": used - base, "seconds": seconds,
            "largest_tensor_bytes": largest, "growth_over_largest": (used - base) / largest, "out_bytes": written}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)
    keys = ("save_gbps", "load_gbps", "raw_write_ckpt_gbps", "raw_write_swap_gbps", "raw_read_ckpt_gbps",
            "raw_read_swap_gbps", "copy_out_gbps", "copy_in_gbps", "checksum_gbps", "sha256_gbps", "save_over_one_way",
            "load_over_one_way", "save_over_copy", "load_over_copy")
    out: dict[str, Any] = {f"median_{k}": med(k) for k in keys}
    out.update({f"range_{k}": [min(r[k] for r in rows), max(r[k] for r in rows)] for k in keys})
    out["checkpoint_bytes"] = rows[0]["bytes"]
    out["max_save_rss_growth"] = max(r["save_rss_growth"] for r in rows)
    out["max_save_rss_growth_over_checkpoint"] = out["max_save_rss_growth"] / rows[0]["bytes"]
    out["max_load_rss_growth"] = max(r["load_rss_growth"] for r in rows)
    return out


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__, "load_avg": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nvme_path", default="swap", help="folder for swap files (default %(default)s)")
    p.add_argument("--ckpt_path", help="checkpoint folder, removed at the end (default NVME_PATH/ckpt-bench)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--sub_group_size", type=int, default=10_000_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--raw_chunk", type=int, default=256 << 20, help="bytes per raw request (default 256 MiB)")
    p.add_argument("--consolidate", action="store_true", help="also measure infinity-consolidate's peak RSS")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    folder = os.path.abspath(check_nvme_path(args.nvme_path))
    ckpt = Path(args.ckpt_path or os.path.join(folder, "ckpt-bench"))
    if ckpt.exists() and any(ckpt.iterdir()):
        raise SystemExit(f"{ckpt} holds files; the benchmark removes its checkpoint folder at the end, so give a new "
                         "or empty --ckpt_path")
    ckpt.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    engine, spec = build(args, folder)
    built = time.perf_counter() - started
    rows: list[dict[str, Any]] = []
    try:
        with RssPeak() as first:  # learns N; first-touch costs stay out of the rounds
            engine.save_checkpoint(ckpt, tag="warmup")
        nbytes = folder_bytes(ckpt / "warmup")
        shutil.rmtree(ckpt / "warmup")
        raw = Raw(engine, Path(folder), ckpt, nbytes, args.raw_chunk)
        for r in range(args.rounds):
            rows.append(one_round(engine, ckpt, raw, r))
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                  flush=True)
            if r < args.rounds - 1:
                shutil.rmtree(ckpt / f"round{r}")
        result: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "git": git_state(), "argv": sys.argv, "spec": spec.__dict__,
            "parameters": sum(s.numel() for s in engine.run.shapes), "build_and_step_s": built,
            "first_save_rss_growth": first.growth, "rounds": rows,
            "summary": summarize(rows)}
        if args.consolidate:
            largest = max(s.numel() for s in engine.run.shapes) * 4  # fp32, as consolidated
            result["consolidate"] = consolidation_rss(ckpt, f"round{args.rounds - 1}",
                                                      ckpt / "consolidated.safetensors", largest)
    finally:
        if "raw" in locals():
            raw.remove()
        engine.close()
        shutil.rmtree(ckpt, ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    print(f"checkpoint {s['checkpoint_bytes'] / 1e9:.2f} GB; median of {args.rounds} rounds: save "
          f"{s['median_save_gbps']:.2f} GB/s = {s['median_save_over_copy']:.3f} x the engine's copy "
          f"({s['median_copy_out_gbps']:.2f} GB/s), {s['median_save_over_one_way']:.3f} x one way; load "
          f"{s['median_load_gbps']:.2f} GB/s = {s['median_load_over_copy']:.3f} x the engine's copy "
          f"({s['median_copy_in_gbps']:.2f} GB/s), {s['median_load_over_one_way']:.3f} x one way; peak RSS growth in "
          f"a save {s['max_save_rss_growth'] / 1e6:.0f} MB = {100 * s['max_save_rss_growth_over_checkpoint']:.1f}% "
          f"of it (the process's first save: {result['first_save_rss_growth'] / 1e6:.0f} MB)")
    if "consolidate" in result:
        c = result["consolidate"]
        print(f"consolidate: peak RSS +{c['growth'] / 1e6:.0f} MB over an import-only process "
              f"({c['growth_over_largest']:.2f} x the largest tensor, {c['largest_tensor_bytes'] / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

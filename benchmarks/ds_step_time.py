"""infinity's training steps against DeepSpeed ZeRO-3, parameters and optimizer on NVMe (issue 18).

Each engine trains the same model from the same seed on the same data with the same config (ZeRO-3,
offload_param and offload_optimizer on NVMe, aio block_size 1 MiB, queue_depth 32, intra_op_parallelism 2,
fp32, AdamW, gradient_clipping 1.0, stage3_param_persistence_threshold 1e5: benchmarks/ds_step_cases.py),
one process at a time, in interleaved pairs (infinity, DeepSpeed, infinity, DeepSpeed, ...), each pair
followed by infinity with everything resident (offload none: the compute-only step).  Measured in each
process: the model's build under zero.Init through initialize to the end of step 1; step 1; step 2; the
steady step (median of steps 3..N); the bytes each step moved to and from storage (/proc/self/io for
both engines, engine.io_stats() for infinity); and, after the steps, the time the engine's own async-IO
handle takes to write and read one steady step's bytes on a scratch file (the I/O-only time).  Printed
per model: each run's figures, the ratios infinity / DeepSpeed (median over pairs) against the issue's
targets, and each engine's steady step against its floor, max(compute-only step, I/O-only time).

    benchmarks/setup_deepspeed.sh /work/dsvenv          # once: DeepSpeed in its own environment
    .venv/bin/python benchmarks/ds_step_time.py --nvme_path swap --ds_python /work/dsvenv/bin/python \\
        --pairs 3 --steps 8 --json bench-out/ds_step_time.json

DeepSpeed runs on the CPU accelerator (DS_ACCELERATOR=cpu, gloo), its optimizer the DeepSpeedCPUAdam
that ZeRO-Offload picks for an offloaded AdamW.  Each side is this file run with --worker by the
side's own python (DeepSpeed's side imports deepspeed and never infinity), printing one JSON line.
Benchmark-only: DeepSpeed is never a dependency of infinity.
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
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ds_step_cases as cases  # noqa: E402

ENGINES = ("infinity", "deepspeed", "resident")  # resident: infinity with offload none (compute only)
TARGETS = {"steady_s": 0.5, "steps12_s": 1.0, "init_to_step1_s": 1.0}  # infinity / DeepSpeed at most


# ---- the DeepSpeed side (run by --ds_python) ---------------------------------------------------------
def deepspeed_worker(name: str, nvme: str, steps: int, threads: int) -> dict[str, Any]:
    import deepspeed  # noqa: PLC0415 (only in DeepSpeed's environment)
    import torch  # noqa: PLC0415
    from deepspeed.ops.op_builder import AsyncIOBuilder  # noqa: PLC0415

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29647", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = cases.config(name, nvme, threads)

    def build() -> Any:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = cases.model(name)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        return engine

    engine, record = cases.timed_run(build, cases.batches(name, steps))
    record["optimizer"] = type(engine.optimizer.optimizer).__name__ if hasattr(engine.optimizer, "optimizer") \
        else type(engine.optimizer).__name__
    record["version"] = deepspeed.__version__
    fig = cases.summary(record)
    aio = cfg["aio"]
    handle = AsyncIOBuilder().load(verbose=False).aio_handle(aio["block_size"], aio["queue_depth"],
                                                            aio["single_submit"], aio["overlap_events"], threads)
    read, written = whole_mib(fig["steady_proc_read"]), whole_mib(fig["steady_proc_written"])
    buf = handle.new_cpu_locked_tensor(max(read, written, 1 << 20), torch.empty(0, dtype=torch.uint8))
    path = str(Path(nvme) / "io-only.bin")
    started = time.perf_counter()
    handle.sync_pwrite(buf[:max(written, 1 << 20)], path)
    wrote = time.perf_counter()
    handle.sync_pread(buf[:read], path) if read else None
    record["io_only"] = {"read_bytes": read, "written_bytes": written, "write_s": wrote - started,
                         "read_s": time.perf_counter() - wrote}
    handle.free_cpu_locked_tensor(buf)
    return record


def whole_mib(n: float) -> int:
    return int(-(-int(n) // (1 << 20)) * (1 << 20))


# ---- the infinity side -------------------------------------------------------------------------------
def infinity_worker(name: str, nvme: str | None, steps: int, threads: int) -> dict[str, Any]:
    sys.path.insert(0, str(cases.ROOT))
    import infinity  # noqa: PLC0415
    from benchmarks.overlap import IoOnly  # noqa: PLC0415

    cfg = cases.config(name, nvme, threads)

    def build() -> Any:
        with infinity.zero.Init(config=cfg):
            model = cases.model(name)
        engine, *_ = infinity.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        return engine

    def counters(engine: Any) -> dict[str, int]:
        stats = engine.io_stats()
        return {"io_stats_read": stats.bytes_read, "io_stats_written": stats.bytes_written}

    engine, record = cases.timed_run(build, cases.batches(name, steps), counters)
    try:
        if nvme is not None:
            fig = cases.summary(record)
            read, written = int(fig["steady_io_stats_read"]), int(fig["steady_io_stats_written"])
            io = IoOnly(engine, Path(nvme), max(read, written))
            read_s, write_s = io.seconds(read, written)
            record["io_only"] = {"read_bytes": read, "written_bytes": written, "write_s": write_s, "read_s": read_s}
        record["version"] = infinity.__version__
        record["params"] = sum(p.numel() for p in engine.module.parameters()) if nvme is None else \
            engine.step_report().params
    finally:
        engine.close()
    return record


def worker(args: argparse.Namespace) -> None:
    """One engine, one model, in this process: prints one JSON line."""
    nvme = None
    if args.worker != "resident":
        Path(args.nvme_path).mkdir(parents=True, exist_ok=True)
        nvme = tempfile.mkdtemp(prefix=f"ds-step-{args.worker}-", dir=args.nvme_path)
    try:
        if args.worker == "deepspeed":
            record = deepspeed_worker(args.model, str(nvme), args.steps, args.threads)
        else:
            record = infinity_worker(args.model, nvme, args.steps, args.threads)
    finally:
        if nvme is not None:
            shutil.rmtree(nvme, ignore_errors=True)
    print("JSON " + json.dumps(record), flush=True)


# ---- the driver ----------------------------------------------------------------------------------------
def run_worker(engine: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    python = args.ds_python if engine == "deepspeed" else sys.executable
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(cases.ROOT)}
    cmd = [python, __file__, "--worker", engine, "--model", model, "--nvme_path", args.nvme_path,
           "--steps", str(args.steps), "--threads", str(args.threads)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=cases.ROOT)
    line = next((l for l in done.stdout.splitlines() if l.startswith("JSON ")), None)
    if done.returncode or line is None:
        sys.exit(f"{engine}'s run of {model} failed (rc {done.returncode}):\n{done.stdout[-2000:]}\n"
                 f"{done.stderr[-4000:]}")
    record = json.loads(line[5:])
    record["process_s"] = time.perf_counter() - started
    record["figures"] = cases.summary(record)
    f = record["figures"]
    print(f"  {model} {engine:>9}: init->step1 {f['init_to_step1_s']:.2f} s, steps 1+2 {f['steps12_s']:.2f} s, "
          f"steady {f['steady_s']:.2f} s (process {record['process_s']:.0f} s)", file=sys.stderr, flush=True)
    return record


def ratio(runs: list[dict[str, Any]], key: str) -> float:
    pairs = [(p["infinity"]["figures"][key], p["deepspeed"]["figures"][key]) for p in runs]
    return statistics.median(a / b for a, b in pairs)


def mb(n: float) -> str:
    return f"{n / 1e6:.0f}"


def table(model: str, runs: list[dict[str, Any]]) -> list[str]:
    params = runs[0]["infinity"]["params"]
    lines = [f"\n{model}: {params:,} parameters, {len(runs)} pairs, steady = median of steps 3..N",
             f"{'pair':>4} {'engine':<9} {'build':>7} {'init->1':>8} {'step 1':>7} {'step 2':>7} {'1+2':>7} "
             f"{'steady':>7} | {'MB read/written step 1':>22} {'steady':>13} {'(io_stats)':>13} | {'losses 1, N'}"]
    for k, pair in enumerate(runs, 1):
        for engine in ENGINES:
            r = pair[engine]
            f = r["figures"]
            stats = (f"{mb(f['steady_io_stats_read'])}/{mb(f['steady_io_stats_written'])}"
                     if "steady_io_stats_read" in f else "-")
            lines.append(f"{k:>4} {engine:<9} {f['build_s']:>7.2f} {f['init_to_step1_s']:>8.2f} {f['step1_s']:>7.2f} "
                         f"{f['step2_s']:>7.2f} {f['steps12_s']:>7.2f} {f['steady_s']:>7.2f} | "
                         f"{mb(f['step1_proc_read']) + '/' + mb(f['step1_proc_written']):>22} "
                         f"{mb(f['steady_proc_read']) + '/' + mb(f['steady_proc_written']):>13} {stats:>13} | "
                         f"{r['steps'][0]['loss']:.6f}, {r['steps'][-1]['loss']:.6f}")
    lines.append("infinity / DeepSpeed, median over pairs (issue 18's target):")
    for key, target in TARGETS.items():
        value = ratio(runs, key)
        lines.append(f"  {key[:-2]:<16} {value:6.3f}  (<= {target}: {'met' if value <= target else 'NOT met'})")
    lines.append("steady step against its floor, max(compute-only step, I/O-only time), both from the same pair; "
                 "medians over pairs:")
    for engine in ("infinity", "deepspeed"):
        rows = []
        for p in runs:
            io = p[engine]["io_only"]
            seconds, moved = io["read_s"] + io["write_s"], io["read_bytes"] + io["written_bytes"]
            compute, steady = p["resident"]["figures"]["steady_s"], p[engine]["figures"]["steady_s"]
            rows.append((steady, compute, seconds, moved, moved / seconds, steady / max(compute, seconds)))
        steady, compute, seconds, moved, rate, over = (statistics.median(r[k] for r in rows) for k in range(6))
        lines.append(f"  {engine:<9} steady {steady:.2f} s; compute-only {compute:.2f} s; I/O-only {seconds:.2f} s "
                     f"({mb(moved)} MB at {rate / 1e9:.2f} GB/s through its own handle); steady / floor {over:.2f} "
                     f"(pairs: {', '.join(f'{r[5]:.2f}' for r in rows)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nvme_path", default="swap", help="folder for both engines' swap folders (default %(default)s)")
    p.add_argument("--ds_python", default=str(HERE.parent.parent / "dsvenv" / "bin" / "python"))
    p.add_argument("--models", default="mlp,gpt", help="comma-separated, of: " + ", ".join(cases.MODELS))
    p.add_argument("--pairs", type=int, default=3, help="interleaved (infinity, DeepSpeed) pairs, at least 2")
    p.add_argument("--steps", type=int, default=8, help="steps per run, N >= 3 (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="aio intra_op_parallelism (default %(default)s)")
    p.add_argument("--json", help="write every run's record here")
    p.add_argument("--report", help="print the tables of an earlier run's --json file, and run nothing")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=cases.MODELS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.report:
        print("\n".join(json.loads(Path(args.report).read_text())["report"][:2]))
        for model, runs in json.loads(Path(args.report).read_text())["results"].items():
            print("\n".join(table(model, runs)))
        return 0
    if args.pairs < 2 or args.steps < 3:
        p.error("--pairs must be at least 2 and --steps at least 3")
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    results: dict[str, list[dict[str, Any]]] = {}
    for model in args.models.split(","):
        results[model] = []
        for k in range(args.pairs):
            print(f"{model} pair {k + 1}/{args.pairs}", file=sys.stderr, flush=True)
            results[model].append({engine: run_worker(engine, model, args) for engine in ENGINES})
    load_after = os.getloadavg()
    ds_version = results[next(iter(results))][0]["deepspeed"]["version"]
    optimizer = results[next(iter(results))][0]["deepspeed"]["optimizer"]
    lines = [f"{started.isoformat(timespec='seconds')}; {os.cpu_count()} CPUs, {platform.release()}; load average "
             f"before {load_before[0]:.2f}, after {load_after[0]:.2f}; DeepSpeed {ds_version} (optimizer {optimizer}) "
             f"against infinity; fp32; aio intra_op_parallelism {args.threads}; {args.steps} steps a run",
             "times in s, bytes in MB (10^6): /proc/self/io read/written (and infinity's io_stats) per step"]
    for model, runs in results.items():
        lines += table(model, runs)
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "settings": vars(args),
                                               "results": results, "report": lines}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

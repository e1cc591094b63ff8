"""How much of a step's NVMe traffic the stage-3 schedule hides behind compute (issue 5).

overlap efficiency = step time ÷ max(compute-only step time, I/O-only time)

  compute-only  the same model and config with everything resident (offload_param and offload_optimizer
                "none"): the step with no I/O at all
  I/O-only      the bytes the offloaded step moved (its step report), read and written through the run's own
                async-IO handle as one request each way, on a scratch file beside the swap files: the drive
                at the engine's best, with nothing else to do

1.0 means the step takes exactly as long as the larger of the two, so the other is hidden entirely.  Three
engines train the same GPT side by side, each its own swap folder:

  resident  everything on the compute tier (the compute-only figure)
  overlap   parameters on NVMe; reads ahead along the recorded trace (stage3_prefetch_bucket_size 5e7), the
            optimizer's NVMe pipeline on (pipeline_read, pipeline_write)
  serial    the same with prefetch and pipelining off (stage3_prefetch_bucket_size 0, pipeline_read and
            pipeline_write false): every partition is read when its module asks

stage3_max_reuse_distance is 0, so every parameter is read for forward and again for backward (the
memory-tight setting; 1e9 would keep this small model whole between the two).  Each round runs --steps
steps per mode in a rotated order, then the I/O-only reads and writes; a round's figure is the median step
of a mode ÷ max(the round's resident median, the round's I/O-only time), and the result the median of the
rounds.  At the end one overlap step is recorded as a timeline (--trace, Chrome trace events) and drawn
as an SVG (infinity/timeline_svg.py, the code of infinity-timeline).

    .venv/bin/python -m benchmarks.overlap --nvme_path swap --optimizer cpu --rounds 15 \\
        --json bench-out/overlap-cpu.json --trace bench-out/overlap-step.json --svg docs/img/overlap-step.svg
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.metrics_overhead import machine
from infinity.cli.train import DEFAULT_CONFIG
from infinity.config import shipped
from infinity.memory import HostBuffer
from infinity.models.gpt import GptSpec, synthetic_batches
from infinity.timeline import Timeline
from infinity.timeline_svg import render
from infinity.train import TrainJob, build_model, load_config
from infinity.zero import Engine, initialize

MODES = ("resident", "overlap", "serial")
SPEC = GptSpec(vocab=8192, context=128, hidden=512, layers=4, heads=8)  # infinity-train's default GPT


def config_for(mode: str, folder: Path, optimizer: str, batch: int, sub_group_size: float,
               threads: int | None = None) -> dict[str, Any]:
    cfg = copy.deepcopy(json.loads(shipped.read_text(DEFAULT_CONFIG)))
    if threads is not None:
        cfg["aio"]["intra_op_parallelism"] = threads
    zo = cfg["zero_optimization"]
    zo.update(sub_group_size=sub_group_size, stage3_max_reuse_distance=0)
    zo["offload_param"]["nvme_path"] = zo["offload_optimizer"]["nvme_path"] = str(folder)
    zo["offload_optimizer"]["device"] = optimizer
    if mode == "resident":
        zo["offload_param"] = {"device": "none"}
        zo["offload_optimizer"] = {"device": "none"}
    elif mode == "serial":
        zo["stage3_prefetch_bucket_size"] = 0
        zo["offload_optimizer"].update(pipeline_read=False, pipeline_write=False)
    cfg["train_micro_batch_size_per_gpu"] = batch
    return cfg


def build(mode: str, root: Path, args: argparse.Namespace) -> Engine:
    folder = root / mode
    folder.mkdir(parents=True, exist_ok=True)
    job = TrainJob(config=config_for(mode, folder, args.optimizer, args.batch, args.sub_group_size, args.threads), spec=SPEC)
    config = load_config(job)
    engine, *_ = initialize(model=build_model(job, config), config=config)
    engine.train()
    return engine


def timed_steps(engine: Engine, batches: list) -> tuple[list[float], list[Any]]:
    times, reports = [], []
    for x, y in batches:
        started = time.perf_counter()
        engine.backward(engine(x, y))
        engine.step()
        times.append(time.perf_counter() - started)
        reports.append(engine.step_report())
    return times, reports


class IoOnly:
    """The step's bytes through the overlap engine's own handle: one write, then one read, O_DIRECT."""

    def __init__(self, engine: Engine, folder: Path, nbytes: int):
        handle = engine.run.io_handle()
        if handle is None:
            raise SystemExit("the benchmark's config puts nothing on NVMe: the engine has no async-IO handle")
        self.handle = handle
        self.path = folder / "io-only.bin"
        self.buffer = HostBuffer(-(-nbytes // 4096) * 4096)
        self.handle.pwrite(self.buffer.tensor, self.path, 0)

    def seconds(self, read: int, written: int) -> tuple[float, float]:
        """(read seconds, write seconds) for these byte counts (rounded up to whole 4 KiB blocks)."""
        def whole(n: int) -> int:
            return min(-(-n // 4096) * 4096, self.buffer.nbytes)
        started = time.perf_counter()
        self.handle.pwrite(self.buffer.tensor[:whole(written)], self.path, 0)
        wrote = time.perf_counter()
        self.handle.pread(self.buffer.tensor[:whole(read)], self.path, 0)
        return time.perf_counter() - wrote, wrote - started


def run_rounds(engines: dict[str, Engine], io: IoOnly, batches: list, args: argparse.Namespace) -> list[dict]:
    rounds, used = [], args.warmup
    for r in range(args.rounds):
        order = list(MODES[r % 3:] + MODES[:r % 3])
        order = order[::-1] if (r // 3) % 2 else order
        block: dict[str, Any] = {"order": "-".join(order)}
        for mode in order:
            times, reports = timed_steps(engines[mode], batches[used:used + args.steps])
            block[mode] = {"step_s": times, "median_s": statistics.median(times),
                           "reports": [rep.to_dict() for rep in reports]}
        used += args.steps
        moved = block["overlap"]["reports"]
        read = int(statistics.median(rep["bytes_read"] for rep in moved))
        written = int(statistics.median(rep["bytes_written"] for rep in moved))
        read_s, write_s = io.seconds(read, written)
        block["io_only"] = {"bytes_read": read, "bytes_written": written, "read_s": read_s, "write_s": write_s,
                            "seconds": read_s + write_s}
        floor = max(block["resident"]["median_s"], read_s + write_s)
        block["efficiency"] = {m: block[m]["median_s"] / floor for m in ("overlap", "serial")}
        block["stall_share"] = {m: statistics.median(rep["stall_ratio"] for rep in block[m]["reports"])
                                for m in ("overlap", "serial")}
        rounds.append(block)
        print(f"round {r + 1}/{args.rounds} ({block['order']}): resident {block['resident']['median_s']:.3f} s, "
              f"I/O-only {read_s + write_s:.3f} s; overlap {block['overlap']['median_s']:.3f} s "
              f"(efficiency {block['efficiency']['overlap']:.3f}, stall {100 * block['stall_share']['overlap']:.1f}%)"
              f", serial {block['serial']['median_s']:.3f} s (efficiency {block['efficiency']['serial']:.3f})",
              file=sys.stderr)
    return rounds


def summarize(rounds: list[dict]) -> dict[str, Any]:
    def spread(values: list[float]) -> dict[str, float]:
        values = sorted(values)
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": values[0], "max": values[-1]}
    out: dict[str, Any] = {m: {"step_s": spread([b[m]["median_s"] for b in rounds])} for m in MODES}
    for m in ("overlap", "serial"):
        out[m]["efficiency"] = spread([b["efficiency"][m] for b in rounds])
        out[m]["stall_share"] = spread([b["stall_share"][m] for b in rounds])
        reports = [rep for b in rounds for rep in b[m]["reports"]]
        out[m]["hit_ratio"] = statistics.median(rep["hit_ratio"] + rep["late_ratio"] for rep in reports)  # hits + late
    out["io_only_s"] = spread([b["io_only"]["seconds"] for b in rounds])
    out["serial_over_overlap"] = spread([b["serial"]["median_s"] / b["overlap"]["median_s"] for b in rounds])
    out["compute_over_io"] = spread([b["resident"]["median_s"] / b["io_only"]["seconds"] for b in rounds])
    return out


def profile_steps(engines: dict[str, Engine], batches: list, top: int = 12) -> dict[str, list[dict[str, Any]]]:
    """cProfile of len(batches) steps of the resident and the overlap engine: the functions that took the
    most time of their own, in ms per step, so the two can be set side by side."""
    out = {}
    for mode in ("resident", "overlap"):
        profiler = cProfile.Profile()
        profiler.enable()
        timed_steps(engines[mode], batches)
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        rows = sorted(((tt, calls, f"{file}:{line}({name})") for (file, line, name), (_, calls, tt, _, _) in
                       stats.items()), reverse=True)[:top]
        out[mode] = [{"function": f, "calls_per_step": calls / len(batches), "ms_per_step": 1e3 * tt / len(batches)}
                     for tt, calls, f in rows]
    return out


def trace_one_step(engine: Engine, batch: tuple, path: str, svg: str | None) -> None:
    timeline = Timeline()
    engine.trace_to(timeline)
    timed_steps(engine, [batch])
    engine.trace_to(Timeline(enabled=False))
    timeline.write(path)
    if svg:
        Path(svg).parent.mkdir(parents=True, exist_ok=True)
        Path(svg).write_text(render(timeline.events(), title="one overlap step (benchmarks/overlap.py)"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nvme_path", default="swap", help="folder for the three engines' swap files (default %(default)s)")
    p.add_argument("--optimizer", choices=("cpu", "nvme"), default="cpu",
                   help="offload_optimizer.device of the offloaded engines (default %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch size (default %(default)s)")
    p.add_argument("--sub_group_size", type=float, default=2e6, help="zero_optimization.sub_group_size")
    p.add_argument("--threads", type=int, help="aio.intra_op_parallelism (default: the config's, 4)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=3, help="steps per mode per round (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="steps each engine runs before the first round")
    p.add_argument("--json", help="write every step time, report and round here")
    p.add_argument("--trace", help="write one overlap step's timeline here (Chrome trace events)")
    p.add_argument("--svg", help="draw that step's timeline here (needs --trace)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the rounds, cProfile N steps of the resident and the overlap engine (in the JSON)")
    args = p.parse_args(argv)
    root = Path(args.nvme_path) / "overlap-bench"
    batches = synthetic_batches(SPEC, batch=args.batch, steps=args.warmup + args.rounds * args.steps + 1 + args.profile,
                                seed=1)
    engines = {m: build(m, root, args) for m in MODES}
    try:
        for engine in engines.values():
            timed_steps(engine, batches[:args.warmup])
        step = engines["overlap"].step_report()
        io = IoOnly(engines["overlap"], root / "overlap", max(step.bytes_read, step.bytes_written) * 2)
        rounds = run_rounds(engines, io, batches, args)
        profile = profile_steps(engines, batches[-1 - args.profile:-1]) if args.profile else {}
        if args.trace:
            trace_one_step(engines["overlap"], batches[-1], args.trace, args.svg)
    finally:
        for engine in engines.values():
            engine.close()
    summary = summarize(rounds)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "command": " ".join(["python", "-m", "benchmarks.overlap", *sys.argv[1:]]),
              "model": {"spec": vars(SPEC), "config": DEFAULT_CONFIG, "micro_batch": args.batch},
              "settings": vars(args), "summary": summary, "profile": profile, "rounds": rounds}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for m in ("overlap", "serial"):
        e, s = summary[m]["efficiency"], summary[m]["stall_share"]
        print(f"{m}: overlap efficiency {e['median']:.3f} (quartiles {e['q1']:.3f}-{e['q3']:.3f}), stall share "
              f"{100 * s['median']:.1f}%, step {summary[m]['step_s']['median']:.3f} s, prefetch hit + late "
              f"{100 * summary[m]['hit_ratio']:.1f}%")
    for mode, rows in profile.items():
        print(f"{mode}, own time per step: " + ", ".join(f"{r['function'].rsplit('(', 1)[-1][:-1]} "
                                                          f"{r['ms_per_step']:.1f} ms" for r in rows[:8]))
    print(f"resident (compute-only) {summary['resident']['step_s']['median']:.3f} s/step; I/O-only "
          f"{summary['io_only_s']['median']:.3f} s; compute / I/O {summary['compute_over_io']['median']:.2f}; "
          f"serial / overlap {summary['serial_over_overlap']['median']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

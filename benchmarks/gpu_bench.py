"""A GPT trained with parameters and optimizer on NVMe against the same GPT resident (issue 19).

Two modes, each run in a process of its own (so each has its own peak RSS and peak GPU memory):

  resident  offload_param and offload_optimizer "none": parameters on the compute tier; Adam's states in
            host memory (infinity always runs Adam on the host, torch's fused CPU kernel)
  nvme      both offload blocks "nvme" under --nvme_path (the machine's local disk): parameters read ahead
            along the recorded trace, the optimizer's NVMe pipeline on (the shipped nvme-local config)

Per step: wall seconds, tokens/s, the step report (stall share, waits, bytes read and written). On CUDA the
last step runs under torch.profiler (CUDA activity only): the share of the step some kernel ran (the union
of kernel intervals ÷ the step's wall time: the GPU-busy share), and the step's host-to-device and
device-to-host copies (bytes, and bytes ÷ the copies' own time). Beside it, a pinned 1 GiB buffer copied
each way (the link's rate, not the engine's). Peak GPU memory is torch.cuda.max_memory_allocated, peak
host memory ru_maxrss. Step 1 records the module order and fetches everything on demand, so the means
leave it out. Every figure is written to the JSON as soon as it is known (a run cut short keeps its
finished steps).

    .venv/bin/python -m benchmarks.gpu_bench run --mode nvme --size 1b --nvme_path /tmp/swap --json nvme.json
    .venv/bin/python -m benchmarks.gpu_bench compare resident.json nvme.json --json summary.json
    .venv/bin/python -m benchmarks.gpu_bench smoke --out bench-out/gpu   # tiny GPT, both modes, on any device

benchmarks/gpu_check.sh runs it on a GPU machine (docs/benchmarks.md, "GPU check (issue 19)").
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from infinity.config import shipped
from infinity.models.gpt import Gpt, GptSpec, synthetic_batches
from infinity.zero import Engine, Init, initialize

MODES = ("resident", "nvme")
# size -> (spec, micro-batch).  1b: 1.14e9 parameters (docs/benchmarks.md); tiny: the CPU smoke test's.
SIZES = {
    "1b": (GptSpec(vocab=32768, context=512, hidden=2048, layers=20, heads=16), 8),
    "tiny": (GptSpec(vocab=512, context=64, hidden=128, layers=2, heads=4), 4),
}
PINNED_BYTES = 1 << 30


def config_for(mode: str, nvme_path: Path, size: str, batch: int) -> dict[str, Any]:
    cfg = copy.deepcopy(json.loads(shipped.read_text("nvme-local")))
    zo = cfg["zero_optimization"]
    zo["offload_param"]["nvme_path"] = zo["offload_optimizer"]["nvme_path"] = str(nvme_path)
    if size == "tiny":  # so that the tiny GPT's matrices go to NVMe too (the default keeps under 1e5 resident)
        zo.update(stage3_param_persistence_threshold=1000, sub_group_size=50_000)
        zo["offload_param"]["buffer_size"] = 1e6
    if mode == "resident":
        zo["offload_param"] = {"device": "none"}
        zo["offload_optimizer"] = {"device": "none"}
    cfg["train_micro_batch_size_per_gpu"] = batch
    return cfg


def build(mode: str, size: str, nvme_path: Path, device: torch.device) -> tuple[Engine, dict[str, Any]]:
    spec, batch = SIZES[size]
    cfg = config_for(mode, nvme_path, size, batch)
    torch.manual_seed(0)
    # Built on the host (under zero.Init the matrices go to NVMe module by module), then moved: an
    # offloaded parameter's placeholder keeps its zero.Init record through Module.to (param.data is set).
    with Init(config=cfg, enabled=mode == "nvme"):
        model = Gpt(spec)
    model = model.to(device=device)
    engine, *_ = initialize(model=model, config=cfg)
    engine.train()
    return engine, cfg


class Progress:
    """The run's JSON, rewritten whole (through a temporary file and a rename) at every update."""

    def __init__(self, path: Path | None, result: dict[str, Any]):
        self.path, self.result = path, result
        self.write()

    def update(self, **fields: Any) -> None:
        self.result.update(fields)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2) + "\n")
        tmp.replace(self.path)


def pinned_copy_rates(device: torch.device, nbytes: int = PINNED_BYTES, repeats: int = 3) -> dict[str, Any]:
    """GB/s of one pinned host buffer copied to the device and back (median of repeats), CUDA events."""
    if device.type != "cuda":
        return {"skipped": f"the compute device is {device.type}: no host-device link"}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates: dict[str, list[float]] = {"h2d": [], "d2h": []}
    for _ in range(repeats):
        for way, (dst, src) in (("h2d", (dev, host)), ("d2h", (host, dev))):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            rates[way].append(nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
    del dev
    torch.cuda.empty_cache()
    return {"bytes": nbytes, "h2d_gb_s": statistics.median(rates["h2d"]), "d2h_gb_s": statistics.median(rates["d2h"]),
            "repeats": repeats}


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Microseconds covered by at least one of the (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def device_activity(events: list[dict[str, Any]], step_s: float) -> dict[str, Any]:
    """From one step's Chrome trace events (torch.profiler, CUDA activity): the GPU-busy share and the copies."""
    kernels = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel" and "dur" in e]
    out: dict[str, Any] = {"kernels": len(kernels), "kernel_busy_s": union_us(kernels) / 1e6}
    out["gpu_busy_share"] = out["kernel_busy_s"] / step_s if step_s > 0 else None
    for way, tag in (("h2d", "HtoD"), ("d2h", "DtoH")):
        copies = [e for e in events if e.get("cat") == "gpu_memcpy" and tag in e.get("name", "") and "dur" in e]
        nbytes = sum(int(e.get("args", {}).get("bytes", 0)) for e in copies)
        busy = union_us([(e["ts"], e["ts"] + e["dur"]) for e in copies]) / 1e6
        out[way] = {"copies": len(copies), "bytes": nbytes, "busy_s": busy,
                    "gb_s_while_copying": nbytes / busy / 1e9 if busy > 0 else None,
                    "gb_s_over_step": nbytes / step_s / 1e9 if step_s > 0 else None}
    return out


def one_step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> float:
    x, y = (t.to(device) for t in batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    engine.backward(engine(x, y))
    engine.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def profiled_step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                  trace_path: Path | None) -> tuple[float, dict[str, Any]]:
    """One step under torch.profiler (CUDA activity only); (step seconds, device_activity of it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step_s = one_step(engine, batch, device)
    with tempfile.TemporaryDirectory() as tmp:
        path = trace_path or Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(Path(path).read_text()).get("traceEvents", [])
    return step_s, device_activity(events, step_s)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def summary_of(steps: list[dict[str, Any]], tokens_per_step: int) -> dict[str, Any]:
    measured = steps[1:] or steps  # step 1 records the module order
    mean = statistics.mean
    return {"averaged_from": [s["step"] for s in measured], "mean_step_s": mean(s["step_s"] for s in measured),
            "tokens_per_s": tokens_per_step / mean(s["step_s"] for s in measured),
            "stall_share": mean(s["report"]["stall_ratio"] for s in measured),
            "gb_read_per_step": mean(s["report"]["bytes_read"] for s in measured) / 1e9,
            "gb_written_per_step": mean(s["report"]["bytes_written"] for s in measured) / 1e9}


def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    spec, batch = SIZES[args.size]
    nvme_path = Path(args.nvme_path) / f"gpu-bench-{args.mode}"
    nvme_path.mkdir(parents=True, exist_ok=True)
    out = Progress(Path(args.json) if args.json else None, {
        "mode": args.mode, "size": args.size, "device": str(device), "status": "building",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "model": {"spec": vars(spec), "parameters": spec.parameters, "micro_batch": batch},
        "nvme_path": str(nvme_path), "steps": []})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out.update(pinned_copy=pinned_copy_rates(device) if args.pinned else {"skipped": "--no-pinned"})
    started = time.perf_counter()
    engine, _ = build(args.mode, args.size, nvme_path, device)
    handle = engine.run.io_handle()
    out.update(status="training", build_s=time.perf_counter() - started,
               io_backend=type(handle).__name__ if handle is not None else None)
    batches = synthetic_batches(spec, batch=batch, steps=args.steps, seed=1)
    try:
        for i, b in enumerate(batches, start=1):
            last = i == len(batches) and device.type == "cuda" and args.profile
            trace = Path(args.json).with_suffix(".trace.json") if last and args.json and args.keep_trace else None
            step_s, activity = profiled_step(engine, b, device, trace) if last else (one_step(engine, b, device), None)
            report = engine.step_report()
            row = {"step": i, "step_s": step_s, "tokens_per_s": batch * spec.context / step_s,
                   "report": report.to_dict() if report is not None else None, "peak_rss_bytes": peak_rss_bytes()}
            if activity is not None:
                row["device_activity"] = activity
            out.result["steps"].append(row)
            out.update(summary=summary_of(out.result["steps"], batch * spec.context))
    finally:
        engine.close()
    device_figures = next((s["device_activity"] for s in reversed(out.result["steps"]) if "device_activity" in s),
                          {"skipped": f"device {device.type}: no kernels to profile" if device.type != "cuda"
                           else "--no-profile"})
    out.update(status="done", device_activity=device_figures, peak_rss_bytes=peak_rss_bytes(),
               peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    return out.result


def compare(resident: dict[str, Any], nvme: dict[str, Any]) -> dict[str, Any]:
    """The figures docs/benchmarks.md quotes, side by side; the NVMe run's tokens/s as a share of resident's."""
    def figures(r: dict[str, Any]) -> dict[str, Any]:
        act = r.get("device_activity", {})
        s = r.get("summary") or {}
        return {"status": r.get("status"), "tokens_per_s": s.get("tokens_per_s"), "mean_step_s": s.get("mean_step_s"),
                "stall_share": s.get("stall_share"), "gpu_busy_share": act.get("gpu_busy_share"),
                "h2d_gb_s": (act.get("h2d") or {}).get("gb_s_while_copying"),
                "d2h_gb_s": (act.get("d2h") or {}).get("gb_s_while_copying"),
                "gb_read_per_step": s.get("gb_read_per_step"), "gb_written_per_step": s.get("gb_written_per_step"),
                "peak_gpu_bytes": r.get("peak_gpu_bytes"), "peak_rss_bytes": r.get("peak_rss_bytes"),
                "io_backend": r.get("io_backend")}
    out = {"resident": figures(resident), "nvme": figures(nvme), "pinned_copy": nvme.get("pinned_copy"),
           "device": nvme.get("device"), "model": nvme.get("model")}
    a, b = out["nvme"]["tokens_per_s"], out["resident"]["tokens_per_s"]
    out["nvme_tokens_share_of_resident"] = a / b if a and b else None
    return out


def smoke(args: argparse.Namespace) -> dict[str, Any]:
    """Both modes of the tiny GPT, each in a process of its own (--timeout each), then compare."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for mode in MODES:
        path = out / f"{mode}.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_bench", "run", "--mode", mode, "--size", "tiny",
               "--device", args.device, "--steps", str(args.steps), "--nvme_path", args.nvme_path, "--json", str(path)]
        subprocess.run(cmd, check=True, timeout=args.timeout)
        results[mode] = json.loads(path.read_text())
    summary = compare(results["resident"], results["nvme"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one mode, this process")
    r.add_argument("--mode", choices=MODES, required=True)
    r.add_argument("--size", choices=sorted(SIZES), default="1b")
    r.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when there is one; default)")
    r.add_argument("--steps", type=int, default=3, help="optimizer steps; the means leave step 1 out (default 3)")
    r.add_argument("--nvme_path", default=tempfile.gettempdir(), help="folder for swap files (default $TMPDIR)")
    r.add_argument("--json", help="write the figures here, updated after every step")
    r.add_argument("--no-pinned", dest="pinned", action="store_false", help="skip the pinned-copy measurement")
    r.add_argument("--no-profile", dest="profile", action="store_false", help="no torch.profiler on the last step")
    r.add_argument("--keep-trace", action="store_true", help="keep the profiled step's trace beside --json")
    c = sub.add_parser("compare", help="the two modes' JSON side by side")
    c.add_argument("resident")
    c.add_argument("nvme")
    c.add_argument("--json", help="write the comparison here")
    s = sub.add_parser("smoke", help="the tiny GPT, both modes (in processes of their own), compared")
    s.add_argument("--out", default=os.environ.get("OUT", "bench-out/gpu"))
    s.add_argument("--device", default="cpu")
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--nvme_path", default=tempfile.gettempdir())
    s.add_argument("--timeout", type=float, default=120.0, help="seconds each mode may take (default 120)")
    args = p.parse_args(argv)
    if args.command == "run":
        result = run_mode(args)
        print(json.dumps(result.get("summary"), indent=None))
    elif args.command == "compare":
        result = compare(json.loads(Path(args.resident).read_text()), json.loads(Path(args.nvme).read_text()))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps(smoke(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""infinity against DeepSpeed 0.19.8, the same small model and config both ways, sequences side by side:
the lr (and betas) of every step for each scheduler type, the fp16 loss scale with forced overflows,
the counters between backward and step, the losses with gradient_clipping left at its default, and
the batch-size rules.  DeepSpeed runs in its own environment (benchmarks/setup_deepspeed.sh builds it).

    benchmarks/setup_deepspeed.sh                              # once: DeepSpeed in ../dsvenv
    .venv/bin/python benchmarks/ds_parity.py --nvme_path swap  # prints the tables; exit 1 on a difference

infinity keeps parameters and optimizer states on NVMe (under --nvme_path); DeepSpeed runs ZeRO-3 on the
CPU accelerator (DS_ACCELERATOR=cpu, gloo).  Losses must agree within 1e-6 relative; everything else
exactly.  Benchmark-only: DeepSpeed is never a dependency of infinity or of its tests."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import infinity
from infinity import ConfigError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ds_parity_cases as cases  # noqa: E402

LOSS_RTOL = 1e-6


def deepspeed_side(python: str) -> dict[str, Any]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([python, str(HERE / "ds_parity_worker.py")], capture_output=True, text=True, env=env,
                          check=False)
    line = next((l for l in done.stdout.splitlines() if l.startswith("JSON ")), None)
    if done.returncode or line is None:
        sys.exit(f"DeepSpeed's side failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(line[5:])


def infinity_config(case: str, nvme: str, **extra: Any) -> dict[str, Any]:
    cfg = cases.config(case, **extra)
    cfg["zero_optimization"] = {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": nvme},
                                "offload_optimizer": {"device": "nvme", "nvme_path": nvme}}
    return cfg


def run(case: str, nvme: str, steps: int = cases.STEPS, **kw: Any) -> list[dict[str, Any]]:
    engine, *_ = infinity.initialize(model=cases.model(), config=infinity_config(case, nvme))
    try:
        return cases.train(engine, steps, **kw)
    finally:
        engine.close()


def loss_scales(nvme: str, consecutive: bool) -> list[float]:
    fp16 = {"enabled": True, "loss_scale_window": 3, "hysteresis": 2, "initial_scale_power": 16,
            "consecutive_hysteresis": consecutive}
    cfg = infinity_config("fp16", nvme, fp16=fp16)
    engine, optimizer, *_ = infinity.initialize(model=cases.model().half(), config=cfg)
    try:
        rows = cases.train(engine, 16, overflow_at=cases.OVERFLOW_STEPS, half=True,
                           scale_of=lambda: optimizer.cur_scale)
    finally:
        engine.close()
    return [r["scale"] for r in rows]


def batch(case: str, nvme: str) -> dict[str, Any]:
    try:
        engine, *_ = infinity.initialize(model=cases.model(), config=infinity_config(case, nvme))
    except ConfigError as err:
        return {"refused": f"ConfigError: {err}"}
    try:
        return {"micro": engine.train_micro_batch_size_per_gpu(), "gas": engine.gradient_accumulation_steps(),
                "train": engine.train_batch_size()}
    finally:
        engine.close()


def infinity_side(nvme: str) -> dict[str, Any]:
    return {"schedules": {name: run(name, nvme) for name in cases.SCHEDULERS},
            "counters": run("counters", nvme, steps=3, gas=4),
            "losses": run("losses", nvme),
            "loss_scale": {"plain": loss_scales(nvme, False), "consecutive": loss_scales(nvme, True)},
            "batch": {case: batch(case, nvme) for case in ("derived micro", "mismatch")}}


class Report:
    """Prints the side-by-side tables and counts the differences."""

    def __init__(self) -> None:
        self.differences = 0

    def same(self, a: Any, b: Any, rtol: float = 0.0) -> str:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            ok = a == b or abs(a - b) <= rtol * max(abs(a), abs(b))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            ok = all(self.same(x, y, rtol) == "=" for x, y in zip(a, b))
            return "=" if ok else "DIFF"
        else:
            ok = a == b
        self.differences += not ok
        return "=" if ok else "DIFF"

    def schedules(self, ds: dict[str, Any], inf: dict[str, Any]) -> None:
        for name in cases.SCHEDULERS:
            print(f"\n{name}: lr used by each optimizer step (and Adam's betas) {json.dumps(cases.SCHEDULERS[name]['params'])}")
            print(f"{'step':>4} {'DeepSpeed lr':>14} {'infinity lr':>14}    {'DeepSpeed betas':>16} {'infinity betas':>16}")
            for k, (a, b) in enumerate(zip(ds[name], inf[name])):
                mark = self.same(a["lr"], b["lr"], 1e-12) + " " + self.same(a["mom"], b["mom"], 1e-12)
                print(f"{k:>4} {a['lr']:>14.8g} {b['lr']:>14.8g}    {_betas(a):>16} {_betas(b):>16}  {mark}")

    def loss_scale(self, ds: dict[str, Any], inf: dict[str, Any]) -> None:
        for kind in ("plain", "consecutive"):
            print(f"\nfp16 loss scale (x1024) per step, window 3, hysteresis 2, consecutive_hysteresis "
                  f"{kind == 'consecutive'}, overflows forced at steps {list(cases.OVERFLOW_STEPS)}")
            print("DeepSpeed " + " ".join(f"{s / 1024:g}" for s in ds[kind]))
            print("infinity  " + " ".join(f"{s / 1024:g}" for s in inf[kind]) + "  " + self.same(ds[kind], inf[kind]))

    def counters(self, ds: list[dict[str, Any]], inf: list[dict[str, Any]]) -> None:
        print("\ncounters, gradient_accumulation_steps 4: between backward and step | after step")
        print(f"{'micro':>5}  {'DeepSpeed':>34}  {'infinity':>34}")
        keys = ("micro_steps", "boundary", "global_steps", "applied", "samples")
        for k, (a, b) in enumerate(zip(ds, inf)):
            print(f"{k:>5}  {_counters(a):>34}  {_counters(b):>34}  "
                  f"{self.same([a[x] for x in keys], [b[x] for x in keys])}")

    def losses(self, ds: list[dict[str, Any]], inf: list[dict[str, Any]]) -> None:
        print("\nfp32 losses, gradient_clipping absent (DeepSpeed's default 1.0), AdamW lr 1e-2")
        print(f"{'step':>4} {'DeepSpeed':>14} {'infinity':>14} {'rel diff':>10} {'DS grad norm':>13} {'inf grad norm':>13}")
        for k, (a, b) in enumerate(zip(ds, inf)):
            rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
            print(f"{k:>4} {a['loss']:>14.9f} {b['loss']:>14.9f} {rel:>10.2e} {a['grad_norm']:>13.6f} "
                  f"{b['grad_norm']:>13.6f}  {self.same(a['loss'], b['loss'], LOSS_RTOL)}")

    def batch(self, ds: dict[str, Any], inf: dict[str, Any]) -> None:
        print("\nbatch sizes")
        for case in ds:
            print(f"{case}: {json.dumps(cases.config(case).get('train_batch_size'))} train_batch_size")
            a, b = ds[case], inf[case]
            same = self.same("refused" if "refused" in a else a, "refused" if "refused" in b else b)
            print(f"  DeepSpeed {_short(a)}\n  infinity  {_short(b)}  {same}")


def _betas(row: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{m:.6g}" for m in row["mom"][0]) + ")"


def _counters(row: dict[str, Any]) -> str:
    return (f"{row['micro_steps']} {str(row['boundary'])[0]} g{row['global_steps_before']} | g{row['global_steps']} "
            f"applied {str(row['applied'])[0]} n{row['samples']}")


def _short(result: dict[str, Any]) -> str:
    return result["refused"][:150] if "refused" in result else json.dumps(result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nvme_path", default=None, help="folder for infinity's swap files (default: a temp folder)")
    p.add_argument("--ds_python", default=str(HERE.parent.parent / "dsvenv" / "bin" / "python"))
    p.add_argument("--json", default=None, help="also write both sides' raw sequences here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    ds = deepspeed_side(args.ds_python)
    with tempfile.TemporaryDirectory(dir=args.nvme_path) as nvme:
        inf = infinity_side(nvme)
    if args.json:
        Path(args.json).write_text(json.dumps({"deepspeed": ds, "infinity": inf}, indent=1))
    print(f"DeepSpeed {ds['version']} against infinity {infinity.__version__}")
    report = Report()
    report.schedules(ds["schedules"], inf["schedules"])
    report.loss_scale(ds["loss_scale"], inf["loss_scale"])
    report.counters(ds["counters"], inf["counters"])
    report.losses(ds["losses"], inf["losses"])
    report.batch(ds["batch"], inf["batch"])
    print(f"\n{report.differences} difference(s)")
    return 1 if report.differences else 0


if __name__ == "__main__":
    sys.exit(main())

"""`infinity-train`: train a GPT with parameters and optimizer states where a DeepSpeed-style config puts them.

    infinity-train                                   # config nvme-local: both on NVMe under ./swap
    infinity-train --config cpu-offload --steps 50 --hidden 1024 --layers 8
    infinity-train --nvme_path /local_nvme --batch 8 --seq 256 --json run.json
    infinity-train --nproc 2                         # two data-parallel ranks (torchrun), ZeRO-3 across them
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from infinity.bench.progress import Cadence, ProgressBar
from infinity.cli.interrupts import (as_interrupted, raise_on_signals, run_forwarding_signals, swap_folders_left,
                                     train_stopped)
from infinity.config import shipped
from infinity.errors import InfinityError
from infinity.outputs import write_output
from infinity.models.gpt import GptSpec

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
DEFAULT_CONFIG = "nvme-local"  # shipped with the package: infinity/config/shipped/nvme-local.json
DEFAULT_SPEC = GptSpec(vocab=8192, context=128, hidden=512, layers=4, heads=8)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infinity-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="DeepSpeed-style JSON: a file, or the name of a shipped "
                   f"config ({', '.join(shipped.names())}; default: %(default)s)")
    p.add_argument("--nvme_path", "--nvme-path", help="folder for swap files; overrides both offload blocks. A "
                   "missing folder is created (mode 0700) when its parent exists and is writable")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch", type=int, help="micro-batch size (default: the config's "
                   "train_micro_batch_size_per_gpu)")
    p.add_argument("--seq", type=int, default=DEFAULT_SPEC.context, help="sequence length (default %(default)s)")
    p.add_argument("--hidden", type=int, default=DEFAULT_SPEC.hidden, help="model width (default %(default)s)")
    p.add_argument("--layers", type=int, default=DEFAULT_SPEC.layers, help="blocks (default %(default)s)")
    p.add_argument("--heads", type=int, default=DEFAULT_SPEC.heads, help="attention heads (default %(default)s)")
    p.add_argument("--vocab", type=int, default=DEFAULT_SPEC.vocab, help="vocabulary (default %(default)s)")
    p.add_argument("--hf-config", metavar="NAME_OR_PATH", help="train a Transformers model built from this config "
                   "instead of the built-in GPT: a causal LM, or a seq2seq model such as T5 (trained to continue its "
                   "input); needs the transformers package")
    p.add_argument("--data", metavar="FILE", help="train on this file's tokens instead of synthetic ones: a text file "
                   "(tokenized by --tokenizer, byte by byte without it), a .npy array or a .bin file of token ids")
    p.add_argument("--tokenizer", metavar="DIR", help="a local folder holding the tokenizer for a text --data "
                   "(tokenizer.save_pretrained writes one)")
    p.add_argument("--save", metavar="DIR", help="write the engine's checkpoint to DIR at the end")
    p.add_argument("--resume", metavar="DIR", help="start from the engine's checkpoint in DIR (written by --save); "
                   "--steps more steps follow, on the batches the uninterrupted run would have seen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write every step's figures and the summary as JSON")
    p.add_argument("--trace", metavar="FILE.json", help="write a timeline of the last two steps (compute, waits, "
                   "optimizer and every I/O request) as Chrome trace events: open it in ui.perfetto.dev")
    p.add_argument("--metrics-port", "--metrics_port", type=int, metavar="N", dest="metrics_port",
                   help="serve Prometheus metrics at http://<prometheus.bind_address>:N/metrics while training "
                        "(N + LOCAL_RANK with several processes; docs/metrics.md)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine, launched with torchrun (torch.distributed.run "
                        "--standalone); each holds 1/N of every parameter and trains on 1/N of each global batch "
                        "of N x --batch sequences (default %(default)s)")
    return p


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Runs this command again (less --nproc, which torchrun would take for its own option) in nproc
    processes under torchrun; its exit code."""
    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "infinity.cli.train", *rest]
    status, stopped = run_forwarding_signals(command)  # SIGTERM to this process reaches every rank, which
    return status if stopped is None else stopped.exit_code  # cleans up; rank 0 said so (torchrun adds its own)


def job_from_args(ns: argparse.Namespace):  # -> TrainJob (imported late: torch loads slowly)
    from infinity.train import TrainJob
    problems = [f"--{name} must be at least 1, got {value}" for name, value in
                (("steps", ns.steps), ("seq", ns.seq), ("hidden", ns.hidden), ("layers", ns.layers),
                 ("heads", ns.heads), ("vocab", ns.vocab), ("batch", ns.batch or 1), ("nproc", ns.nproc))
                if value < 1]
    if ns.metrics_port is not None and not 1 <= ns.metrics_port <= 65535:
        problems.append(f"--metrics-port must be a port, 1 to 65535, got {ns.metrics_port}")
    if ns.trace is not None and not Path(ns.trace).resolve().parent.is_dir():
        problems.append(f"--trace {ns.trace}: the folder {Path(ns.trace).resolve().parent} does not exist; create it "
                        "or name a file in an existing folder")
    if ns.tokenizer is not None and ns.data is None:
        problems.append(f"--tokenizer {ns.tokenizer} tokenizes a text --data FILE; give --data too")
    if ns.hidden % max(ns.heads, 1):
        problems.append(f"--hidden {ns.hidden} must be a multiple of --heads {ns.heads}")
    if problems:
        raise ValueError("; ".join(problems))
    spec = GptSpec(vocab=ns.vocab, context=ns.seq, hidden=ns.hidden, layers=ns.layers, heads=ns.heads)
    return TrainJob(config=ns.config, spec=spec, steps=ns.steps, micro_batch=ns.batch, nvme_path=ns.nvme_path,
                    seed=ns.seed, hf_config=ns.hf_config, metrics_port=ns.metrics_port, trace=ns.trace,
                    data=ns.data, tokenizer=ns.tokenizer, save=ns.save, resume=ns.resume)


def describe(stats) -> str:
    """The progress line of one optimizer step (StepStats): every figure is that step's alone."""
    return (f"loss {stats.loss:7.4f}  this step: {stats.step_s:6.2f} s  {stats.tokens_per_s:8.0f} tok/s  "
            f"stall {100 * stats.stall_ratio:4.1f}%  read {stats.bytes_read / 1e9:6.3f} GB  written "
            f"{stats.bytes_written / 1e9:6.3f} GB  ({stats.bytes_read_per_param:.1f} / "
            f"{stats.bytes_written_per_param:.1f} B/param)  prefetch {stats.prefetch.shares()}  lr {stats.lr:.2e}"
            + (f"  NON-FINITE {', '.join(stats.nonfinite)}" if stats.nonfinite else ""))


def train(ns: argparse.Namespace):  # -> RunSummary
    from infinity.train import run, summarize
    job = job_from_args(ns)
    bar = ProgressBar(job.steps, sys.stderr if _rank() == 0 else open(os.devnull, "w"), Cadence.EVERY)
    steps = []
    try:
        for stats in run(job):
            steps.append(stats)
            bar.advance(describe(stats))
    except KeyboardInterrupt as stop:  # SIGINT or SIGTERM (cli/interrupts.py): run() has closed the engine
        stopped = as_interrupted(stop)
        stopped.during = f"step {len(steps) + 1} of {job.steps}"
        raise stopped from None
    finally:
        bar.close()
    result = summarize(steps, ranks=int(os.environ.get("WORLD_SIZE", "1") or 1))
    if ns.json and _rank() == 0:
        write_output(ns.json, json.dumps({"summary": asdict(result), "steps": [s.to_dict() for s in steps]},
                                         indent=2))  # replaces a symlink at the name, never follows it
    return result


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("infinity.zero").setLevel(logging.INFO)  # the step report (steps_per_print, wall_clock_breakdown)
    ns = build_parser().parse_args(argv)
    if ns.nproc > 1 and "RANK" not in os.environ:
        return launch(ns.nproc, sys.argv[1:] if argv is None else list(argv))
    try:
        with raise_on_signals("infinity-train"):
            result = train(ns)
    except KeyboardInterrupt as stop:
        paths = nvme_paths(ns)
        if _rank() == 0 or swap_folders_left(paths):  # rank 0 speaks for the run; another rank only of a failure
            print(f"infinity-train: {train_stopped(as_interrupted(stop), paths)}", file=sys.stderr)
        return as_interrupted(stop).exit_code
    except ValueError as err:
        print(f"infinity-train: {err}", file=sys.stderr)
        return EXIT_INVALID
    except InfinityError as err:
        print(f"infinity-train: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    if _rank() != 0:
        return EXIT_OK  # rank 0 speaks for the run
    print(result.line())
    return EXIT_OK


def nvme_paths(ns: argparse.Namespace) -> list[str]:
    """The folders the run's swap files go under: --nvme_path, or the config's offload blocks on nvme."""
    if ns.nvme_path:
        return [ns.nvme_path]
    from infinity.config import Config, OffloadDevice
    try:
        zero = Config.load(ns.config).zero_optimization
    except InfinityError:
        return []
    return [b.nvme_path for b in (zero.offload_param, zero.offload_optimizer)
            if b.device is OffloadDevice.NVME and b.nvme_path]


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


if __name__ == "__main__":
    sys.exit(main())

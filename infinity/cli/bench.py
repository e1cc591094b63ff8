"""`infinity-bench`: the aio tuner to run on the NVMe folder before training.

    infinity-bench --nvme_path /local_nvme [--io_size 1G] [--block_size 256K,1M,4M] [--queue_depth 8,32,64]
                   [--thread_count 1,2] [--single_submit false] [--overlap_events true] [--read_only|--write_only]
                   [--repeat N] [--json FILE] [--plot FILE.png] [--compare-fio] [--metrics-port N]

Times sequential O_DIRECT writes and reads of --io_size through the native engine for every setting,
checks in /proc/diskstats that the device moved the bytes, and prints the best `aio` block.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

from infinity.bench import OpSelection, SweepPlan, check_plan, parse_axes, parse_size
from infinity.bench.bench_file import FILE_PREFIX, FILE_SUFFIX
from infinity.bench.axes import DEFAULT_BLOCK_SIZES, DEFAULT_QUEUE_DEPTHS, DEFAULT_THREAD_COUNTS
from infinity.bench.fio import fio_binary
from infinity.bench.interrupt import DeferredInterrupt
from infinity.bench.plan import FioPolicy, check_output_file, check_plot_available
from infinity.bench.progress import ProgressBar
from infinity.bench.sizes import format_size
from infinity.cli.interrupts import raise_on_signals
from infinity.errors import ConfigError, InfinityError, Interrupted, Problem
from infinity.outputs import write_output

PROG = "infinity-bench"
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130  # SIGTERM: 143 (errors.Interrupted)


@dataclass(frozen=True)
class Outputs:
    json_path: str | None
    plot_path: str | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--nvme_path", "--nvme-path", required=True, metavar="DIR",
                        help="folder on the NVMe drive (the one nvme_path of your config will name)")
    parser.add_argument("--io_size", "--io-size", default="1G", metavar="SIZE",
                        help="bytes per run, such as 256M or 1G (K, M, G are powers of 1024)")
    parser.add_argument("--block_size", "--block-size", default=DEFAULT_BLOCK_SIZES, metavar="LIST",
                        help="block sizes to sweep, multiples of 4K")
    parser.add_argument("--queue_depth", "--queue-depth", default=DEFAULT_QUEUE_DEPTHS, metavar="LIST",
                        help="queue depths to sweep (requests in flight per engine thread)")
    parser.add_argument("--thread_count", "--thread-count", default=DEFAULT_THREAD_COUNTS, metavar="LIST",
                        help="engine threads (aio.intra_op_parallelism)")
    parser.add_argument("--single_submit", "--single-submit", default="false", metavar="LIST",
                        help="true, false or both (false,true)")
    parser.add_argument("--overlap_events", "--overlap-events", default="true", metavar="LIST",
                        help="true, false or both (true,false)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--read_only", "--read-only", action="store_true", help="time reads only")
    only.add_argument("--write_only", "--write-only", action="store_true", help="time writes only")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="runs per setting; the median counts")
    parser.add_argument("--json", metavar="FILE", help="write every result and the best block as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw a heat map of the sweep (needs matplotlib)")
    parser.add_argument("--compare-fio", "--compare_fio", action="store_true", dest="compare_fio",
                        help="run fio with the same settings beside each result")
    parser.add_argument("--metrics-port", "--metrics_port", type=int, metavar="N", dest="metrics_port",
                        help="serve the sweep's I/O metrics for Prometheus at http://127.0.0.1:N/metrics while it "
                             "runs (docs/metrics.md)")
    return parser


def plan_from_args(ns: argparse.Namespace) -> tuple[SweepPlan, Outputs]:
    """The checked plan; raises ConfigError or CapacityError naming the flag to change."""
    axes = parse_axes(ns.block_size, ns.queue_depth, ns.thread_count, ns.single_submit, ns.overlap_events)
    ops = OpSelection.READ_ONLY if ns.read_only else OpSelection.WRITE_ONLY if ns.write_only else OpSelection.BOTH
    plan = SweepPlan(ns.nvme_path, axes, parse_size(ns.io_size, "--io_size"), ops, ns.repeat,
                     FioPolicy.COMPARE if ns.compare_fio else FioPolicy.SKIP)
    check_plan(plan)
    if ns.metrics_port is not None and not 1 <= ns.metrics_port <= 65535:
        raise ConfigError([Problem("--metrics-port", f"must be a port, 1 to 65535, got {ns.metrics_port}")],
                          source="the command line")
    if ns.json:
        check_output_file(ns.json, "--json")
    if ns.plot:
        check_output_file(ns.plot, "--plot")
        check_plot_available()
    return plan, Outputs(ns.json, ns.plot)


def sweep_and_report(plan: SweepPlan, outputs: Outputs) -> None:
    from infinity.bench import choose_best, run_sweep, table, to_json, warnings  # torch: after the flags' checks
    from infinity.bench.report import summary

    settings = len(plan.axes.settings())
    print(f"{PROG}: {settings} settings × {', '.join(op.name.lower() for op in plan.ops.ops)} of "
          f"{format_size(plan.io_size)} each on {plan.nvme_path} (O_DIRECT, libaio), repeat {plan.repeat}")
    bar = ProgressBar(plan.run_count(with_fio=plan.fio is FioPolicy.COMPARE and fio_binary() is not None),
                      sys.stderr)

    def say_stopping(signum: int) -> None:
        if signum == signal.SIGINT:  # someone at the terminal: say why it takes up to one more run
            print(f"\n{PROG}: stopping after the run in progress (Ctrl-C again to stop now)", file=sys.stderr)

    def step(label: str) -> None:
        bar.advance(label)
        interrupt.check()

    try:
        with DeferredInterrupt(on_first=say_stopping) as interrupt:
            outcome = run_sweep(plan, progress=step)
    finally:
        bar.close()
    best = choose_best(outcome.measurements)
    print(table(outcome, best))
    for line in warnings(outcome):
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    if outputs.json_path:
        write_output(outputs.json_path, json.dumps(to_json(outcome, best), indent=2) + "\n")  # never via a symlink
    if outputs.plot_path:
        from infinity.bench.plot import write_heatmap

        write_heatmap(outcome, outputs.plot_path, best)
    print(summary(outcome, best))


@contextlib.contextmanager
def serving_metrics(port: int | None) -> Iterator[None]:
    """With a port, the exporter serves the sweep's requests (infinity_io_*, infinity_aio_info) meanwhile."""
    if port is None:
        yield
        return
    from infinity.exporter import start_exporter

    with start_exporter(port, setting="--metrics-port") as exporter:
        print(f"{PROG}: metrics at {exporter.url}", file=sys.stderr)
        yield


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse's own errors (exit 2, message printed) and --help (exit 0)
        return exit_.code if isinstance(exit_.code, int) else EXIT_INVALID
    try:
        with raise_on_signals(PROG):  # SIGINT and SIGTERM alike; the sweep defers them to a run's end
            return _plan_and_sweep(ns)
    except KeyboardInterrupt as stop:  # Interrupted (SIGINT, SIGTERM), or a KeyboardInterrupt raised in-process
        stop = stop if isinstance(stop, Interrupted) else Interrupted(signal.SIGINT)
        print(f"{PROG}: {stopped(stop.signal_name, ns.nvme_path)}", file=sys.stderr)
        return stop.exit_code


def _plan_and_sweep(ns: argparse.Namespace) -> int:
    try:
        plan, outputs = plan_from_args(ns)
    except InfinityError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_INVALID
    try:
        with serving_metrics(ns.metrics_port):
            sweep_and_report(plan, outputs)
    except (InfinityError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def stopped(signal_name: str, nvme_path: str) -> str:
    """The one line printed when a signal stopped the bench: what was interrupted, and what was removed."""
    left = sorted(glob.glob(os.path.join(glob.escape(nvme_path), f"{FILE_PREFIX}{os.getpid()}-*{FILE_SUFFIX}")))
    if left:
        return (f"the sweep was interrupted by {signal_name}; its bench file could not be removed: {', '.join(left)}; "
                "remove it by hand")
    return f"the sweep was interrupted by {signal_name}; its bench file in {nvme_path} (if it had made one) was removed"


if __name__ == "__main__":
    sys.exit(main())

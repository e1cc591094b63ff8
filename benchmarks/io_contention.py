"""What NVMe traffic alone costs the compute: the compute-only (resident) step of benchmarks/overlap.py,
timed alternately quiet and with one offloaded step's bytes moved beside it.

In the "busy" steps a thread writes and reads the bytes the overlap engine's step moves (its step report),
through that engine's own async-IO handle, in `--pieces` requests each way, starting with the step; the
resident step itself does no I/O.  busy ÷ quiet is how much slower the same compute runs while the drive
is busy: the part of overlap efficiency that no schedule can remove on that machine.

    .venv/bin/python -m benchmarks.io_contention --nvme_path swap --steps 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

from benchmarks import overlap as ov


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nvme_path", default="swap")
    p.add_argument("--steps", type=int, default=30, help="quiet and busy steps each, alternating")
    p.add_argument("--pieces", type=int, default=36, help="requests each way per step (the engine makes 36 reads)")
    args = p.parse_args(argv)
    settings = argparse.Namespace(optimizer="cpu", batch=2, sub_group_size=2e6, threads=None)
    root = Path(args.nvme_path) / "io-contention"
    resident, overlap = ov.build("resident", root, settings), ov.build("overlap", root, settings)
    batches = ov.synthetic_batches(ov.SPEC, batch=2, steps=2 * args.steps + 3, seed=1)
    try:
        ov.timed_steps(resident, batches[:3])
        ov.timed_steps(overlap, batches[:3])
        moved = overlap.step_report()
        io = ov.IoOnly(overlap, root / "overlap", max(moved.bytes_read, moved.bytes_written))
        go, done = threading.Event(), threading.Event()

        def traffic() -> None:
            while go.wait() and not done.is_set():
                go.clear()
                for _ in range(args.pieces):
                    io.seconds(moved.bytes_read // args.pieces, moved.bytes_written // args.pieces)

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        quiet, busy = [], []
        for i in range(args.steps):
            quiet += ov.timed_steps(resident, batches[3 + 2 * i:4 + 2 * i])[0]
            go.set()
            busy += ov.timed_steps(resident, batches[4 + 2 * i:5 + 2 * i])[0]
            time.sleep(0.2)  # the traffic has finished before the next quiet step
        done.set()
        go.set()
        thread.join()
    finally:
        resident.close()
        overlap.close()
    q, b = statistics.median(quiet), statistics.median(busy)
    ratios = sorted(bb / qq for qq, bb in zip(quiet, busy))
    print(f"resident step quiet {q:.4f} s, beside one step's I/O ({moved.bytes_read / 1e6:.1f} MB read, "
          f"{moved.bytes_written / 1e6:.1f} MB written) {b:.4f} s: busy / quiet {b / q:.3f} "
          f"(pairwise median {statistics.median(ratios):.3f}, quartiles "
          f"{statistics.quantiles(ratios, n=4)[0]:.3f}-{statistics.quantiles(ratios, n=4)[2]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

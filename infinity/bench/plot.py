"""A heat map of a sweep: one panel per operation, a row per block size, a column per queue depth ×
threads (× single_submit / overlap_events when those were swept), each cell annotated with its GB/s.

matplotlib is an optional extra (pip install 'infinity[plot]'), imported only here, with the Agg
backend so that no display is needed.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

from infinity.bench.sizes import format_size
from infinity.bench.sweep import Measurement, SweepOutcome
from infinity.config.aio import AioConfig
from infinity.errors import ConfigError, Problem
from infinity.io.handle import Op

log = logging.getLogger("infinity.bench")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError([Problem("--plot", "needs matplotlib, which is not installed",
                                   "pip install 'infinity[plot]'")], source="command line") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _column_label(aio: AioConfig, show_ss: bool, show_oe: bool) -> str:
    label = f"qd {aio.queue_depth}\nthreads {aio.thread_count}"
    if show_ss:
        label += f"\nss {str(aio.single_submit).lower()}"
    if show_oe:
        label += f"\noe {str(aio.overlap_events).lower()}"
    return label


def _grid(ms: list[Measurement]) -> tuple[list[int], list[tuple[Any, ...]], list[list[float]]]:
    """Block sizes (rows), column keys and GB/s values (NaN where a cell did not run)."""
    blocks = sorted({m.aio.block_size for m in ms})
    columns = sorted({(m.aio.queue_depth, m.aio.thread_count, m.aio.single_submit, m.aio.overlap_events)
                      for m in ms})
    cells = {(m.aio.block_size, (m.aio.queue_depth, m.aio.thread_count, m.aio.single_submit,
                                 m.aio.overlap_events)): m.gbps for m in ms}
    return blocks, columns, [[cells.get((b, c), math.nan) for c in columns] for b in blocks]


def write_heatmap(outcome: SweepOutcome, path: str | os.PathLike[str]) -> None:
    """Draws the sweep into path (PNG, or any format matplotlib knows by the extension)."""
    plt = _pyplot()
    ops = [op for op in (Op.WRITE, Op.READ) if any(m.op is op for m in outcome.measurements)]
    show_ss = len({m.aio.single_submit for m in outcome.measurements}) > 1
    show_oe = len({m.aio.overlap_events for m in outcome.measurements}) > 1
    ncols = max(1, len({(m.aio.queue_depth, m.aio.thread_count, m.aio.single_submit, m.aio.overlap_events)
                        for m in outcome.measurements}))
    fig, axes = plt.subplots(1, max(1, len(ops)), squeeze=False,
                             figsize=(max(4.0, 1.3 * ncols + 2) * max(1, len(ops)), 4.5))
    try:
        for ax, op in zip(axes[0], ops):
            _panel(ax, fig, [m for m in outcome.measurements if m.op is op], op, show_ss, show_oe)
        fig.suptitle(f"infinity-bench: {format_size(outcome.io_size)} sequential, O_DIRECT, libaio (GB/s)")
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=100)
    finally:
        plt.close(fig)
    log.info("heat map written to %s", os.fspath(path))


def _panel(ax: Any, fig: Any, ms: list[Measurement], op: Op, show_ss: bool, show_oe: bool) -> None:
    blocks, columns, values = _grid(ms)
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="GB/s")
    ax.set_title(op.name.lower())
    ax.set_yticks(range(len(blocks)), [format_size(b) for b in blocks])
    ax.set_ylabel("block_size")
    labels = [_column_label(AioConfig(queue_depth=q, intra_op_parallelism=t, single_submit=s, overlap_events=o),
                            show_ss, show_oe) for q, t, s, o in columns]
    ax.set_xticks(range(len(columns)), labels, fontsize=8)
    finite = [v for row in values for v in row if not math.isnan(v)]
    middle = (min(finite) + max(finite)) / 2 if finite else 0.0
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > middle else "white")

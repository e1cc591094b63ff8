"""A heat map of a sweep: one panel per operation, a row per block size, a column per queue depth ×
threads (× single_submit / overlap_events when those were swept), each cell annotated with its GB/s, on
one colour scale for every panel; the chosen setting and each operation's fastest cell are boxed.

matplotlib is an optional extra (pip install 'infinity[plot]'), imported only here, with the Agg
backend so that no display is needed.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

from infinity.bench.report import Best
from infinity.bench.sizes import format_size
from infinity.bench.sweep import Measurement, SweepOutcome
from infinity.config.aio import AioConfig
from infinity.errors import ConfigError, Problem
from infinity.io.handle import Op
from infinity.outputs import replacing

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
    columns = sorted({_column(m.aio) for m in ms})
    cells = {(m.aio.block_size, _column(m.aio)): m.gbps for m in ms}
    return blocks, columns, [[cells.get((b, c), math.nan) for c in columns] for b in blocks]


CHOSEN, FASTEST = "chosen", "fastest"  # the gids of the boxes drawn around marked cells
CHOSEN_COLOR, FASTEST_COLOR = "#d62728", "#ff40ff"


def write_heatmap(outcome: SweepOutcome, path: str | os.PathLike[str], best: Best | None = None) -> None:
    """Draws the sweep into path (PNG, or any format matplotlib knows by the extension)."""
    plt = _pyplot()
    fig = heatmap_figure(outcome, best)
    try:
        with replacing(path) as out:  # a symlink at the name is replaced, never followed
            fig.savefig(out, dpi=100, format=_format_of(path))
    finally:
        plt.close(fig)
    log.info("heat map written to %s", os.fspath(path))


def _format_of(path: str | os.PathLike[str]) -> str:
    """The image format matplotlib would take from path's extension (png when there is none)."""
    return os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"


def heatmap_figure(outcome: SweepOutcome, best: Best | None = None) -> Any:
    """The heat map as a matplotlib Figure (the caller closes it).

    [Note: one colour scale]  Every panel maps GB/s to colour with the same range (the lowest and highest
    GB/s of the whole sweep) and one colour bar serves them all, so a colour means the same speed in the
    write panel and the read panel.  A solid box marks the chosen setting (the aio block printed), a
    dashed one each operation's fastest cell."""
    plt = _pyplot()
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch

    ms = outcome.measurements
    ops = [op for op in (Op.WRITE, Op.READ) if any(m.op is op for m in ms)]
    show_ss = len({m.aio.single_submit for m in ms}) > 1
    show_oe = len({m.aio.overlap_events for m in ms}) > 1
    ncols = max(1, len({_column(m.aio) for m in ms}))
    finite = [m.gbps for m in ms if not math.isnan(m.gbps)]
    norm = Normalize(vmin=min(finite, default=0.0), vmax=max(finite, default=1.0))
    fig, axes = plt.subplots(1, max(1, len(ops)), squeeze=False, layout="constrained",
                             figsize=(max(4.0, 1.3 * ncols + 2) * max(1, len(ops)), 5.0))
    image = None
    for ax, op in zip(axes[0], ops):
        image = _panel(ax, [m for m in ms if m.op is op], op, norm, show_ss, show_oe, best)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label="GB/s (one scale for every panel)")
    fig.suptitle(f"infinity-bench: {format_size(outcome.io_size)} sequential, O_DIRECT, libaio (GB/s)")
    if best is not None:
        fig.legend(handles=[Patch(fill=False, edgecolor=CHOSEN_COLOR, linewidth=3,
                                  label="chosen: the aio block printed"),
                            Patch(fill=False, edgecolor=FASTEST_COLOR, linewidth=2, linestyle="--",
                                  label="fastest of this operation")],
                   loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    return fig


def _column(aio: AioConfig) -> tuple[int, int, bool, bool]:
    return aio.queue_depth, aio.thread_count, aio.single_submit, aio.overlap_events


def _panel(ax: Any, ms: list[Measurement], op: Op, norm: Any, show_ss: bool, show_oe: bool,
           best: Best | None) -> Any:
    blocks, columns, values = _grid(ms)
    image = ax.imshow(values, cmap="viridis", norm=norm, aspect="auto")
    ax.set_title(op.name.lower())
    ax.set_yticks(range(len(blocks)), [format_size(b) for b in blocks])
    ax.set_ylabel("block_size")
    labels = [_column_label(AioConfig(queue_depth=q, intra_op_parallelism=t, single_submit=s, overlap_events=o),
                            show_ss, show_oe) for q, t, s, o in columns]
    ax.set_xticks(range(len(columns)), labels, fontsize=8)
    middle = (norm.vmin + norm.vmax) / 2
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > middle else "white")
    for cell, gid in cells_to_mark(ms, best):
        _box(ax, blocks.index(cell[0]), columns.index(cell[1]), gid)
    return image


def cells_to_mark(ms: list[Measurement], best: Best | None) -> list[tuple[tuple[int, tuple[Any, ...]], str]]:
    """((block_size, column key), CHOSEN or FASTEST) for the cells of one panel's measurements to box."""
    if best is None:
        return []
    out = [((m.aio.block_size, _column(m.aio)), CHOSEN) for m in ms if m.aio == best.aio]
    out += [((m.aio.block_size, _column(m.aio)), FASTEST) for m in ms if any(top is m for top in best.by_op)]
    return out


def _box(ax: Any, row: int, col: int, gid: str) -> None:
    from matplotlib.patches import Rectangle

    inset = 0.04 if gid == CHOSEN else 0.12  # the fastest box inside the chosen one when a cell is both
    ax.add_patch(Rectangle((col - 0.5 + inset, row - 0.5 + inset), 1 - 2 * inset, 1 - 2 * inset, fill=False,
                           edgecolor=CHOSEN_COLOR if gid == CHOSEN else FASTEST_COLOR,
                           linewidth=3 if gid == CHOSEN else 2, linestyle="-" if gid == CHOSEN else "--",
                           gid=gid))

"""What infinity-train prints: the progress line is one step's figures, labelled so; the summary says which
steps its means cover; prefetch hit, late and miss are apart (the outcomes of infinity_prefetch_total);
bytes are GB (1e9) throughout; with several ranks it says whose figures they are."""
from __future__ import annotations

import re

import pytest

from infinity.cli.train import describe
from infinity.train import StepStats, summarize

GB = 10**9


def stats(step: int, step_s: float = 2.0, hits: int = 8, late: int = 1, misses: int = 1, **kw) -> StepStats:
    return StepStats(step=step, loss=10.0 - step, step_s=step_s, tokens=1000, bytes_read=GB // 2,
                     bytes_written=GB // 4, lr=1e-3, stall_ratio=0.25, prefetch_hits=hits, prefetch_late=late,
                     prefetch_misses=misses, peak_rss_bytes=kw.pop("rss", 3 * GB // 2), **kw)


def test_progress_line_is_the_steps_own_and_keeps_late_apart_from_hits():
    line = describe(stats(3, hits=7, late=2, misses=1))
    assert "this step:" in line and "2.00 s" in line and "500 tok/s" in line
    assert "read  0.500 GB" in line and "written  0.250 GB" in line
    assert "prefetch hit 70.0% / late 20.0% / miss 10.0% of 10 uses" in line
    assert "GiB" not in line


def test_summary_says_which_steps_it_averages_and_leaves_step_1_out():
    steps = [stats(1, step_s=100.0, hits=0, late=0, misses=10), stats(2, hits=6, late=3, misses=1),
             stats(3, hits=8, late=1, misses=1)]
    summary = summarize(steps)
    assert summary.averaged_from == 2 and summary.mean_step_s == 2.0 and summary.tokens_per_s == 500.0
    assert (summary.prefetch_hits, summary.prefetch_late, summary.prefetch_misses) == (14, 4, 2)
    line = summary.line()
    assert line.startswith("3 steps: loss 9.0000 -> 7.0000; mean of steps 2-3 (step 1, which records the "
                           "module order, left out): 2.00 s/step, 500 tokens/s")
    assert "per step 0.500 GB read and 0.250 GB written" in line
    assert "prefetch hit 70.0% / late 20.0% / miss 10.0% of 20 uses" in line
    assert "peak RSS 1.50 GB (this process)" in line
    assert re.findall(r"\bGi?B\b", line) == ["GB"] * 3  # one unit on the line: decimal GB


def test_a_one_step_run_averages_that_step_and_says_so():
    line = summarize([stats(1)]).line()
    assert "mean of step 1:" in line and "left out" not in line


def test_several_ranks_say_whose_figures_and_rss_is_the_largest():
    summary = summarize([stats(1), stats(2, rss=5 * GB)], ranks=2)
    line = summary.line()
    assert line.startswith("2 steps on 2 ranks:")
    assert "written (rank 0's)" in line and "uses (rank 0's)" in line
    assert "peak RSS 5.00 GB (the largest of 2 ranks)" in line and summary.peak_rss_gb == 5.0


def test_summarize_needs_a_step():
    from infinity.errors import UsageError
    with pytest.raises(UsageError, match="at least one step"):
        summarize([])

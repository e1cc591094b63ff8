"""The engine's gradient norm: float64 accuracy without a float64 copy of the gradient."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from infinity.zero.gradients import NORM_CHUNK, grad_norm


def test_equals_a_float64_norm_for_any_length():
    torch.manual_seed(0)
    for n in (0, 1, 199, NORM_CHUNK, 3 * NORM_CHUNK + 5):
        t = torch.randn(n) * 1e3
        assert grad_norm(t) == pytest.approx(float(torch.linalg.vector_norm(t.double())), rel=1e-12)
    assert grad_norm(torch.randn(7, 5).to(torch.bfloat16)) > 0


def test_an_inf_or_nan_anywhere_makes_it_non_finite():
    t = torch.zeros(2 * NORM_CHUNK + 1)
    t[-1] = float("inf")
    assert not math.isfinite(grad_norm(t))
    t[-1] = float("nan")
    assert not math.isfinite(grad_norm(t))


def peak_rss_kb() -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))


def test_no_float64_copy_of_the_whole_gradient():
    clear = Path("/proc/self/clear_refs")
    try:
        clear.write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs) here")
    grad = torch.randn(16 * NORM_CHUNK)  # 64 MiB fp32; a float64 copy would be 128 MiB
    clear.write_text("5")
    before = peak_rss_kb()
    grad_norm(grad)
    assert peak_rss_kb() - before < 64 * 1024  # a few 8 MiB chunks; a whole float64 copy is 128 MiB

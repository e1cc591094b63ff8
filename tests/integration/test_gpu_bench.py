"""benchmarks/gpu_bench.py's tiny CPU mode end to end (the code path benchmarks/gpu_check.sh runs on a GPU), and
gpu_check.sh itself on a machine without CUDA: it skips the CUDA phases, saying why, and exits 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_bench import device_activity, union_us

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_gpt_on_nvme_against_resident_writes_every_figure(tmp_path):
    swap = tmp_path / "swap"
    swap.mkdir()
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench", "smoke", "--out", str(tmp_path / "out"),
                    "--nvme_path", str(swap), "--steps", "2"], cwd=ROOT, check=True, timeout=120,
                   capture_output=True)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for mode in ("resident", "nvme"):
        run = json.loads((tmp_path / "out" / f"{mode}.json").read_text())
        assert run["status"] == "done" and run["device"] == "cpu" and len(run["steps"]) == 2
        assert run["summary"]["averaged_from"] == [2]
        assert run["peak_rss_bytes"] > 0 and run["peak_gpu_bytes"] is None
        assert "skipped" in run["device_activity"] and "skipped" in run["pinned_copy"]
        figures = summary[mode]
        assert figures["tokens_per_s"] > 0 and 0 <= figures["stall_share"] <= 1
    assert summary["resident"]["gb_read_per_step"] == 0 and summary["resident"]["io_backend"] is None
    assert summary["nvme"]["gb_read_per_step"] > 0 and summary["nvme"]["gb_written_per_step"] > 0
    assert summary["nvme_tokens_share_of_resident"] > 0
    assert list(swap.glob("gpu-bench-*/**/*.swp")) == []  # each engine removed its swap files


def test_gpu_busy_share_is_the_union_of_kernel_intervals():
    assert union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    events = [{"cat": "kernel", "ts": 0, "dur": 10}, {"cat": "kernel", "ts": 5, "dur": 10},
              {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 0, "dur": 4,
               "args": {"bytes": 8000}},
              {"cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 20, "dur": 2,
               "args": {"bytes": 2000}}]
    got = device_activity(events, step_s=30e-6)
    assert got["kernels"] == 2 and got["gpu_busy_share"] == pytest.approx(0.5)
    assert got["h2d"]["bytes"] == 8000 and got["h2d"]["gb_s_while_copying"] == pytest.approx(2.0)
    assert got["d2h"]["copies"] == 1 and got["d2h"]["gb_s_while_copying"] == pytest.approx(1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's path without CUDA")
def test_gpu_check_skips_the_cuda_phases_without_cuda(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "NVME_DIR": str(tmp_path / "swap")}
    subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, check=True, timeout=240,
                   capture_output=True)
    check = json.loads((tmp_path / "out" / "check.json").read_text())
    status = {p["phase"]: p for p in check["phases"]}
    assert check["cuda"] is False
    assert status["setup"]["status"] == "passed" and status["cpu_smoke"]["status"] == "passed"
    for name in ("gpu_training", "bench_nvme"):
        assert status[name]["status"] == "skipped" and "no CUDA" in status[name]["reason"]
    assert json.loads((tmp_path / "out" / "smoke-summary.json").read_text())["nvme"]["tokens_per_s"] > 0

"""SIGINT and SIGTERM, sent for real to infinity-train and infinity-bench running as processes: one line
saying what was interrupted and what was removed, the swap or bench files gone, exit 130 or 143, no
traceback (SIGTERM is what `timeout`, systemd, Kubernetes and Slurm send)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infinity.io.files import direct_io_refusal

TRAIN = ["-m", "infinity.cli.train", "--steps", "10000", "--hidden", "64", "--layers", "2", "--heads", "4",
         "--vocab", "256", "--seq", "32"]
BENCH = ["-m", "infinity.cli.bench", "--io_size", "16M", "--block_size", "256K,1M", "--queue_depth", "4,8",
         "--thread_count", "1", "--repeat", "1000"]


def wait_for(condition, what: str, proc: subprocess.Popen) -> None:
    """Polls until condition() holds (the process reached the state the test signals it in); a guard of
    ten minutes keeps a broken test from hanging, it is no timing assertion."""
    give_up = time.monotonic() + 600
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > give_up:
            proc.kill()
            pytest.fail(f"{what} did not happen: {proc.communicate()[1]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen, signum: int) -> tuple[int, list[str]]:
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err.strip().splitlines()


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_train_stopped_by_a_signal_removes_its_swap_files_and_says_so(tmp_path, signum, code):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    proc = subprocess.Popen([sys.executable, *TRAIN, "--nvme_path", str(nvme), "--json", str(tmp_path / "r.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    rank = nvme / "infinity-swap" / "rank-0"
    # in training: the run folder holds the optimizer's master weights (made at initialize, after zero.Init)
    wait_for(lambda: any(rank.glob("run-*/master.swp")) if rank.is_dir() else False, "training", proc)
    status, lines = stop(proc, signum)
    name = signal.Signals(signum).name
    assert status == code
    assert "Traceback" not in "\n".join(lines) and "KeyboardInterrupt" not in "\n".join(lines)
    assert lines[-1].startswith("infinity-train: step ") and f"was interrupted by {name}; its swap files " \
        f"under {nvme} were removed" in lines[-1]
    assert list(rank.iterdir()) == []


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_bench_stopped_by_a_signal_removes_its_file_and_says_so(tmp_path, signum, code):
    if direct_io_refusal(tmp_path):
        pytest.skip(f"tmp_path takes no O_DIRECT here: {direct_io_refusal(tmp_path)}")
    proc = subprocess.Popen([sys.executable, *BENCH, "--nvme_path", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(n.startswith("infinity-bench-") for n in os.listdir(tmp_path)), "the sweep began", proc)
    status, lines = stop(proc, signum)
    name = signal.Signals(signum).name
    assert status == code
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1] == f"infinity-bench: the sweep was interrupted by {name}; its bench file in {tmp_path} (if it " \
                        "had made one) was removed"
    assert os.listdir(tmp_path) == []

"""infinity-train end to end: a real GPT, real swap files, the progress lines and the JSON record."""
from __future__ import annotations

import json

import pytest

from infinity import metrics
from infinity.cli.train import DEFAULT_CONFIG, main

SMALL = ["--steps", "3", "--hidden", "64", "--layers", "1", "--heads", "4", "--vocab", "256", "--seq", "16",
         "--batch", "2"]


def test_trains_on_nvme_and_records_every_step(tmp_path, capsys):
    out = tmp_path / "run.json"
    swap = tmp_path / "swap"
    swap.mkdir()
    metrics.enable()  # what Prometheus would export, counted in this process
    try:
        before = metrics.TALLY.snapshot()
        assert main(["--nvme_path", str(swap), "--json", str(out), *SMALL, "--hidden", "256"]) == 0
        after = metrics.TALLY.snapshot()
    finally:
        metrics.disable()
    record = json.loads(out.read_text())
    steps = record["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["bytes_read"] > 0 and s["bytes_written"] > 0 and s["tokens"] == 2 * 16 for s in steps)
    assert all(0 <= s["stall_ratio"] <= 1 and s["peak_rss_bytes"] > 0 for s in steps)
    assert all(s["params"] > 0 and s["bytes_read_per_param"] == s["bytes_read"] / s["params"]
               and s["bytes_written_per_param"] == s["bytes_written"] / s["params"] for s in steps)
    # hit, late and miss are infinity_prefetch_total's outcomes, step by step
    for outcome, field in (("hit", "prefetch_hits"), ("late", "prefetch_late"), ("miss", "prefetch_misses")):
        key = ("infinity_prefetch_total", (outcome,))
        assert after.counters[key] - before.counters[key] == sum(s[field] for s in steps)
    assert sum(s["prefetch_hits"] + s["prefetch_late"] + s["prefetch_misses"] for s in steps) > 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "tok/s" in line]
    assert len(lines) == 3 and all("this step:" in line and " GB " in line for line in lines)
    for line, s in zip(lines, steps):  # the progress line's shares are the step's counts
        uses = s["prefetch_hits"] + s["prefetch_late"] + s["prefetch_misses"]
        assert f"({s['bytes_read_per_param']:.1f} / {s['bytes_written_per_param']:.1f} B/param)" in line
        assert (f"prefetch hit {100 * s['prefetch_hits'] / uses:.1f}% / late {100 * s['prefetch_late'] / uses:.1f}% "
                f"/ miss {100 * s['prefetch_misses'] / uses:.1f}% of {uses} uses") in line
    summary = record["summary"]
    assert summary["averaged_from"] == 2 and summary["steps"] == 3 and summary["rss_of"] == "this process"
    assert summary["prefetch_hits"] == sum(s["prefetch_hits"] for s in steps[1:])
    assert summary["peak_rss_gb"] == steps[-1]["peak_rss_bytes"] / 1e9
    assert summary["gb_read_per_step"] == pytest.approx(sum(s["bytes_read"] for s in steps[1:]) / 2 / 1e9)
    printed = captured.out.strip()
    assert printed.startswith("3 steps: loss ") and "mean of steps 2-3 (step 1" in printed
    assert f"peak RSS {summary['peak_rss_gb']:.2f} GB (this process)" in printed and "GiB" not in printed
    assert not any((swap / "infinity-swap" / "rank-0").iterdir())  # swap files removed at the end


def test_default_config_is_the_shipped_nvme_example(tmp_path, monkeypatch):
    from infinity.config import Config, OffloadDevice
    monkeypatch.chdir(tmp_path)  # a shipped name reads from the package, from any folder
    assert DEFAULT_CONFIG == "nvme-local"
    zero = Config.load(DEFAULT_CONFIG).zero_optimization
    assert zero.offload_param.device is OffloadDevice.NVME and zero.offload_param.nvme_path == "swap"


def test_trace_holds_the_last_two_steps_of_compute_io_and_optimizer(tmp_path):
    trace = tmp_path / "step.json"
    swap = tmp_path / "swap"
    swap.mkdir()
    wide = [*SMALL, "--steps", "4", "--hidden", "512", "--heads", "8"]  # blocks above the persistence threshold
    assert main(["--nvme_path", str(swap), "--trace", str(trace), *wide]) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    marks = [e["name"] for e in events if e["ph"] == "i"]
    assert marks == ["step 3", "step 4"]  # earlier steps were dropped as the run went
    spans = {(e["cat"], e["name"]) for e in events if e["ph"] == "X"}
    assert ("compute", "forward") in spans and ("compute", "backward") in spans
    assert ("optimizer", "optimizer step") in spans
    assert any(cat == "compute" and name.startswith("forward ") for cat, name in spans)  # a module's forward
    assert any(cat == "compute" and name.startswith("backward ") for cat, name in spans)
    begins = {e["id"]: e for e in events if e["ph"] == "b"}
    ends = {e["id"]: e for e in events if e["ph"] == "e"}
    assert begins.keys() == ends.keys() and begins
    names = {e["name"] for e in begins.values()}
    # the optimizer's reads and the step's parameter writes; the forward's parameters come from the master's
    # buffer, not the drive (bf16 parameters follow their master: [Note: a follower] in memory/views.py)
    assert any(n.startswith("read master") for n in names) and any(n.startswith("write param") for n in names)
    assert all(ends[i]["ts"] >= begins[i]["ts"] for i in begins)
    steps = [e for e in events if e["ph"] == "X" and e["name"] == "optimizer step"]
    assert len(steps) == 2
    # one clock: every request ends by the last step's end (an I/O span is recorded when its request is done)
    last = max(e["ts"] for e in events if e["ph"] == "i")
    # (reads ahead for a next step that after_step starts once the last step's mark is down may end later)
    assert all(ends[i]["ts"] <= last for i, b in begins.items() if b["ts"] <= last)


@pytest.mark.parametrize("args,message", [
    (["--hidden", "100", "--heads", "8"], "multiple of --heads"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--trace", "/no/such/folder/t.json"], "--trace /no/such/folder/t.json: the folder"),
    (["--nproc", "0"], "--nproc must be at least 1"),
])
def test_bad_flags_exit_2_with_the_flag_named(tmp_path, capsys, args, message):
    assert main(["--nvme_path", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_nvme_path_under_a_missing_parent_names_it_and_the_fix(tmp_path, capsys):
    missing = tmp_path / "nope" / "swap"  # only the last folder is ever created, never a chain
    assert main(["--nvme_path", str(missing), *SMALL]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "mkdir -p" in err
    assert not (tmp_path / "nope").exists()


def test_missing_nvme_path_is_created_mode_0700_under_an_existing_parent(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    assert main(["--nvme_path", "swap", *SMALL, "--steps", "1"]) == 0  # relative, as the README writes it
    assert (tmp_path / "swap").is_dir() and (tmp_path / "swap").stat().st_mode & 0o777 == 0o700
    assert "created the folder swap (mode 0700)" in caplog.text


def test_config_by_shipped_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "cpu-offload", *SMALL, "--steps", "1"]) == 0
    assert not (tmp_path / "swap").exists()  # nothing on NVMe: no folder made


def test_nproc_2_trains_two_data_parallel_ranks_under_torchrun(tmp_path):
    """--nproc 2 starts two ranks with torchrun; each writes swap files under its own rank folder and
    trains on half of each global batch; rank 0 writes the JSON and the summary line."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    out, swap = tmp_path / "run.json", tmp_path / "swap"
    swap.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    wide = [*SMALL, "--hidden", "256", "--heads", "4"]  # weights above the persistence threshold: split
    done = subprocess.run([sys.executable, "-m", "infinity.cli.train", "--nproc", "2", "--nvme_path", str(swap),
                           "--json", str(out), *wide], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 steps on 2 ranks" in done.stdout and "(rank 0's)" in done.stdout
    assert "(the largest of 2 ranks)" in done.stdout
    record = json.loads(out.read_text())
    assert all(s["tokens"] == 2 * 2 * 16 and s["bytes_read"] > 0 for s in record["steps"])  # the global batch
    assert {p.name for p in (swap / "infinity-swap").iterdir()} == {"rank-0", "rank-1"}


def test_a_config_without_batch_sizes_needs_batch(tmp_path, capsys):
    """DeepSpeed refuses a config with neither train_batch_size nor train_micro_batch_size_per_gpu; --batch
    gives the micro size."""
    cfg = tmp_path / "nobatch.json"
    cfg.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                               "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                                     "offload_optimizer": {"device": "cpu"}}}))
    small = [a for a in SMALL if a not in ("--batch", "2")]
    assert main(["--config", str(cfg), *small, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "train_micro_batch_size_per_gpu" in err and "train_batch_size" in err and "--batch N" in err
    assert main(["--config", str(cfg), *SMALL, "--steps", "1"]) == 0

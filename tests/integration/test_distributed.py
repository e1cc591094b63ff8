"""ZeRO-3 across two processes on gloo: each rank holds half of every parameter on its own NVMe folder,
all-gathers for a use and reduce-scatters gradients; the run equals one rank and plain torch."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training_reference import make_batches, plain_torch_run

from dist_worker import PERSISTENT
from tmpfs import size_limited_tmpfs

WORKER = Path(__file__).with_name("dist_worker.py")
STEPS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, world: int, tier: str, steps: int = STEPS, fault: tuple[str, ...] = (),
           waited: int | None = None, timeout: float = 240, worker: Path = WORKER,
           **env_extra: str) -> list[subprocess.CompletedProcess]:
    """world processes of worker (dist_worker.py), as torchrun would start them (RANK, WORLD_SIZE, MASTER_*).
    Waits for the first `waited` ranks (all by default) and kills the rest; timeout only guards the test."""
    port = free_port()
    procs = []
    try:
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
                   **env_extra}
            args = [sys.executable, str(worker), str(tmp_path / "run"), str(tmp_path / "nvme"), tier, str(steps)]
            procs.append(subprocess.Popen(args + list(fault), env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        done = []
        for p in procs[:waited]:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return done
    finally:
        for p in procs:
            p.kill()  # a rank left stopped by a fault test, or one that hangs past the guard
            p.communicate()


def results(tmp_path: Path, world: int) -> list[dict]:
    return [torch.load(tmp_path / f"run.rank{r}.pt", weights_only=True) for r in range(world)]


def check_ran(done: list[subprocess.CompletedProcess]) -> None:
    for p in done:
        assert p.returncode == 0, p.stderr[-3000:]


@pytest.fixture(scope="module")
def reference():
    return plain_torch_run(make_batches()[:STEPS])


@pytest.fixture(scope="module")
def nvme_runs(tmp_path_factory):
    runs = {}
    for world in (1, 2):
        folder = tmp_path_factory.mktemp(f"world{world}")
        check_ran(launch(folder, world, "nvme"))
        runs[world] = results(folder, world)
    return runs


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_two_ranks_equal_one_rank_and_plain_torch(nvme_runs, reference):
    want_losses, want_weights = reference
    one, two = nvme_runs[1][0], nvme_runs[2]
    for got in (one["losses"], two[0]["losses"], two[1]["losses"]):
        for g, w in zip(got, want_losses, strict=True):
            assert abs(g - w) <= 1e-4 * abs(w)
    for name, w in want_weights.items():
        if name.endswith("qkv.bias"):
            continue  # rounding noise becomes Adam steps there: see test_training.assert_same_weights
        for run in (one, two[0], two[1]):
            assert relative(run["weights"][name], w) <= 1e-4, name
    assert all(torch.equal(two[0]["weights"][n], two[1]["weights"][n]) for n in want_weights)
    # from step 2 on (the first records the trace) the next module's all-gathers start ahead of its use
    assert two[0]["gathered_ahead"] == two[1]["gathered_ahead"] > 0


def test_each_rank_holds_half_of_each_parameter(nvme_runs):
    """Parameters above the persistence threshold are split in two halves; the small ones are replicated."""
    two = nvme_runs[2]
    split = 0
    for (name, numel, start0, length0, rep0), (_, _, start1, length1, rep1) in zip(two[0]["shards"], two[1]["shards"]):
        if numel <= PERSISTENT:
            assert rep0 and rep1 and length0 == length1 == numel, name
            continue
        split += 1
        assert not rep0 and not rep1 and length0 == length1 == -(-numel // 2), name
        assert (start0, start1) == (0, length0), name
    assert split >= 8


def test_each_rank_moves_about_half_the_nvme_bytes(nvme_runs):
    def per_step(report_list):
        steady = report_list[3:]
        return (sum(r["bytes_read"] for r in steady) / len(steady), sum(r["bytes_written"] for r in steady) / len(steady))
    one_read, one_written = per_step(nvme_runs[1][0]["reports"])
    for rank in nvme_runs[2]:
        read, written = per_step(rank["reports"])
        assert 0.4 <= read / one_read <= 0.6, (read, one_read)
        assert 0.4 <= written / one_written <= 0.6, (written, one_written)
        assert rank["reports"][-1]["rank"] == rank["rank"]


@pytest.mark.parametrize("tier", ["cpu", "none"])
def test_two_ranks_with_host_and_compute_tiers(tmp_path, tier, reference):
    check_ran(launch(tmp_path, 2, tier, steps=4))
    want_losses, _ = reference
    for run in results(tmp_path, 2):
        for g, w in zip(run["losses"], want_losses[:4]):
            assert abs(g - w) <= 1e-4 * abs(w)


def test_a_rank_that_dies_makes_the_other_fail_clearly(tmp_path):
    done = launch(tmp_path, 2, "nvme", steps=4, fault=("2", "kill"), timeout=200)
    assert done[1].returncode == -9
    assert done[0].returncode != 0
    message = done[0].stderr
    assert "RankFailed" in message and "failed on rank 0 of 2" in message, message[-3000:]
    assert "restart every rank from the last checkpoint" in message


def test_a_rank_that_stops_answering_makes_the_other_fail_after_the_timeout(tmp_path):
    """Rank 1 is alive but silent (SIGSTOP): rank 0's next collective gives up after the process group's
    timeout (5 s here) with a RankFailed instead of waiting forever (the 200 s guard is only a backstop)."""
    rank0, = launch(tmp_path, 2, "nvme", steps=4, fault=("2", "stop", "5"), waited=1, timeout=200)
    assert rank0.returncode != 0
    assert "RankFailed" in rank0.stderr and "failed on rank 0 of 2" in rank0.stderr, rank0.stderr[-3000:]


def test_two_ranks_save_at_step_5_and_resume_in_fresh_processes_exactly(tmp_path, nvme_runs):
    """Two ranks save after step 5 (each its own rank folder); two fresh processes load it and train steps
    6-10: losses and weights equal the uninterrupted two-rank run bit for bit (fp32, CPU, gloo)."""
    ckpt = tmp_path / "ckpt"
    check_ran(launch(tmp_path / "first", 2, "nvme", steps=5, CKPT_DIR=str(ckpt), CKPT_SAVE_AT="5"))
    assert (ckpt / "latest").read_text().strip() == "global_step5"
    assert sorted(p.name for p in (ckpt / "global_step5").iterdir()) == ["rank_0", "rank_1"]
    check_ran(launch(tmp_path / "second", 2, "nvme", CKPT_DIR=str(ckpt), CKPT_RESUME="1"))
    resumed, whole = results(tmp_path / "second", 2), nvme_runs[2]
    for got, want in zip(resumed, whole):
        assert got["losses"] == want["losses"][5:]
        assert all(torch.equal(got["weights"][n], w) for n, w in want["weights"].items())


def test_a_model_built_under_zero_init_as_another_rank_is_refused_with_the_fix(tmp_path):
    """zero.Init ran as one process (WORLD_SIZE hidden), then the group of 2 started: each rank's swap file
    holds whole parameters, so initialize refuses, naming both places and the fix."""
    check_ran(launch(tmp_path, 2, "nvme", BUILD_UNDER_ZERO_INIT="alone"))
    for rank, run in enumerate(results(tmp_path, 2)):
        assert f"built under zero.Init as rank 0 of 1, but initialize runs as rank {rank} of 2" in run["refused"]
        assert "start the process group (torchrun, or infinity.init_distributed) before zero.Init" in run["refused"]


@pytest.mark.parametrize("damage", ["mixed", "missing"])
def test_rank_folders_of_two_saves_or_a_missing_one_fail_every_rank_clearly(tmp_path, damage):
    """Rank 1's folder from another save (its save id differs: what a kill between the ranks' swaps of a
    same-tag save leaves), or missing: every rank refuses the load with a CheckpointError instead of
    loading a mix or waiting for the rank that stopped."""
    import json

    ckpt = tmp_path / "ckpt"
    check_ran(launch(tmp_path / "first", 2, "nvme", steps=2, CKPT_DIR=str(ckpt), CKPT_SAVE_AT="2"))
    rank1 = ckpt / "global_step2" / "rank_1"
    if damage == "mixed":
        manifest = json.loads((rank1 / "manifest.json").read_text())
        manifest["save_id"] += 1
        (rank1 / "manifest.json").write_text(json.dumps(manifest))
    else:
        rank1.rename(rank1.with_name("elsewhere"))
    done = launch(tmp_path / "second", 2, "nvme", steps=4, CKPT_DIR=str(ckpt), CKPT_RESUME="1", timeout=200)
    for rank, p in enumerate(done):
        assert p.returncode != 0 and "CheckpointError" in p.stderr, p.stderr[-2000:]
        if damage == "mixed":
            assert "holds rank folders of different saves" in p.stderr
        elif rank == 0:
            assert "cannot be loaded by another rank" in p.stderr
        else:
            assert "rank_1: does not exist, but the save of tag 'global_step2' had 2 ranks" in p.stderr


def test_consolidating_a_two_rank_checkpoint_gives_the_models_state_dict(tmp_path, nvme_runs):
    """A checkpoint two real ranks saved after step 10, merged by infinity-consolidate, equals the two-rank
    run's parameters exactly, is within 1e-4 of the single-process run's, and loads into the plain model."""
    from safetensors.torch import load_file

    from infinity.cli.consolidate import main as consolidate
    from training_reference import fresh_model

    ckpt, out = tmp_path / "ckpt", tmp_path / "model.safetensors"
    check_ran(launch(tmp_path, 2, "nvme", CKPT_DIR=str(ckpt), CKPT_SAVE_AT=str(STEPS)))
    assert consolidate([str(ckpt), str(out)]) == 0
    merged = load_file(out)
    two, one = results(tmp_path, 2)[0]["weights"], nvme_runs[1][0]["weights"]
    assert merged.keys() == two.keys()
    assert all(torch.equal(merged[n], w) for n, w in two.items())
    assert all(relative(merged[n], w) <= 1e-4 for n, w in one.items() if not n.endswith("qkv.bias"))
    fresh_model().load_state_dict(merged, strict=True)


def test_two_ranks_with_frozen_embeddings_equal_plain_torch_and_consolidate_them_unchanged(tmp_path):
    """Frozen embeddings built under zero.Init on two ranks: each rank holds half of them and gathers them for
    each use, nothing reduces or updates them; the checkpoint's consolidation holds them whole, unchanged."""
    from safetensors.torch import load_file

    from infinity.cli.consolidate import main as consolidate
    from training_reference import fresh_model

    plain = fresh_model()
    plain.tokens.requires_grad_(False)
    plain.positions.requires_grad_(False)
    initial = {n: p.detach().clone() for n, p in plain.named_parameters()}
    want_losses, want_weights = plain_torch_run(make_batches()[:STEPS], model=plain)
    ckpt, out = tmp_path / "ckpt", tmp_path / "model.safetensors"
    check_ran(launch(tmp_path, 2, "nvme", FREEZE_EMBEDDINGS="1", BUILD_UNDER_ZERO_INIT="1", CKPT_DIR=str(ckpt),
                     CKPT_SAVE_AT=str(STEPS)))
    runs = results(tmp_path, 2)
    for run in runs:
        assert all(abs(g - w) <= 1e-4 * abs(w) for g, w in zip(run["losses"], want_losses, strict=True))
        trained = [(numel, start, length) for name, numel, start, length, _ in run["shards"]
                   if name not in ("tokens.weight", "positions.weight")]
        assert run["reports"][-1]["params"] == sum(max(0, min(n, numel - start)) for numel, start, n in trained)
    assert consolidate([str(ckpt), str(out)]) == 0
    merged = load_file(out)
    for name in ("tokens.weight", "positions.weight"):
        assert torch.equal(merged[name], initial[name]) and torch.equal(runs[1]["weights"][name], initial[name])
    assert all(relative(merged[n], w) <= 1e-4 for n, w in want_weights.items() if not n.endswith("qkv.bias"))


def test_save_16bit_model_with_two_ranks_writes_the_whole_model_once(tmp_path):
    from safetensors.torch import load_file

    from training_reference import fresh_model

    saved = tmp_path / "model"
    check_ran(launch(tmp_path, 2, "nvme", steps=2, SAVE_16BIT_DIR=str(saved)))
    files = list(saved.iterdir())
    assert [f.name for f in files] == ["pytorch_model.safetensors"]
    weights = load_file(files[0])
    want = results(tmp_path, 2)[0]["weights"]
    assert all(torch.equal(weights[n], w) for n, w in want.items())
    fresh_model().load_state_dict(weights, strict=True)


@pytest.mark.parametrize("under_zero_init", [False, True], ids=["built", "zero_init"])
def test_ranks_that_seed_differently_start_from_rank_0s_values(tmp_path, reference, under_zero_init):
    """Rank 1 builds the model from another seed; rank 0's initial values are broadcast (by the engine, or
    by zero.Init before each parameter leaves, each rank writing only its piece), so the run equals one
    rank and plain torch from rank 0's seed."""
    env = {"SEED_BY_RANK": "1"} | ({"BUILD_UNDER_ZERO_INIT": "1"} if under_zero_init else {})
    check_ran(launch(tmp_path, 2, "nvme", steps=4, **env))
    want_losses, _ = reference
    runs = results(tmp_path, 2)
    for run in runs:
        for g, w in zip(run["losses"], want_losses[:4], strict=True):
            assert abs(g - w) <= 1e-4 * abs(w)
    assert all(torch.equal(runs[0]["weights"][n], w) for n, w in runs[1]["weights"].items())
    # each rank's pieces (fp32, each extent a whole number of 4096 bytes) are their ranges of its master file
    # ([Note: a partition inside another] in memory/views.py): the engine lays out no parameter file; zero.Init
    # wrote its pieces into one before the optimizer existed, and they moved into the master once it held them
    pieces = sum(-(-length * 4 // 4096) * 4096 for _, _, _, length, replicated in runs[0]["shards"] if not replicated)
    expected = pieces if under_zero_init else 0
    assert [run["param_swap_bytes"] for run in runs] == [expected, expected]


@pytest.mark.parametrize("fault", ["enospc", "deleted nvme_path"])
def test_a_rank_whose_drive_fails_stops_every_rank_naming_it(tmp_path, fault):
    """Rank 1's drive fills up mid-run (a real 8 MiB tmpfs of its own), or its NVMe folder is gone at the
    start: rank 1 stops with its own error, and rank 0, whose next collective fails when rank 1 exits (well
    within the 20 s process-group timeout), names rank 1 and that error (zero/ranks.py, tell_failure)."""
    with contextlib.ExitStack() as stack:
        if fault == "enospc":
            (tmp_path / "nvme").mkdir()
            stack.enter_context(size_limited_tmpfs(tmp_path / "nvme" / "rank1", "8m"))
            done = launch(tmp_path, 2, "nvme", steps=4, fault=("2", "enospc", "20"), timeout=200)
            cause = "AioError: "
        else:
            done = launch(tmp_path, 2, "nvme", steps=4, fault=("-1", "kill", "20"), timeout=200,
                          DELETE_NVME_ON_RANK="1")
            cause = "NvmePathError: "
    rank0, rank1 = done
    assert rank1.returncode != 0 and cause in rank1.stderr, rank1.stderr[-3000:]
    assert rank0.returncode != 0 and "RankFailed" in rank0.stderr, rank0.stderr[-3000:]
    assert f"rank 1 of 2 failed first: {cause}" in rank0.stderr, rank0.stderr[-3000:]
    assert ("ENOSPC" if fault == "enospc" else str(tmp_path / "nvme" / "rank1")) in rank0.stderr

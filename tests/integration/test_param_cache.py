"""offload_param.max_in_cpu: parameters within the budget keep a host copy after their first read, so
later fetches skip NVMe; the optimizer's writes keep that copy and the swap file equal; results stay
those of plain PyTorch."""
from __future__ import annotations

import os

import pytest
import torch

from infinity.memory.record import State
from infinity.swap.params import NvmeHome, Tier
from infinity.zero import Engine, EngineSettings, Precision

from training_reference import ADAM, SPEC, fresh_model, make_batches, plain_torch_run

FP32 = 4


@pytest.fixture(scope="module")
def batches():
    return make_batches()


def make_engine(tmp_path, max_in_cpu: int, optimizer: Tier = Tier.NVME, **extra) -> Engine:
    """Parameters and optimizer states under separate paths, so the parameters' handle counts only them."""
    (tmp_path / "param").mkdir(parents=True, exist_ok=True)
    (tmp_path / "opt").mkdir(exist_ok=True)
    s = EngineSettings(param_tier=Tier.NVME, optimizer_tier=optimizer, param_nvme_path=str(tmp_path / "param"),
                       optimizer_nvme_path=str(tmp_path / "opt"), adam=ADAM, gradient_clipping=1.0,
                       sub_group_size=20_000, param_max_in_cpu=max_in_cpu,
                       **{"prefetch_bucket_size": 0, "max_reuse_distance": 0, **extra})  # the cache alone
    return Engine(fresh_model(), s)


def param_home(engine: Engine) -> NvmeHome:
    (home,) = {id(h): h for h in engine.run.homes if isinstance(h, NvmeHome)}.values()
    return home


def train_counting_reads(engine: Engine, batches, check_copies: bool = False) -> tuple[list[float], list[int]]:
    """Losses, and the bytes read from the parameters' swap file in each step; check_copies: after each
    step, every kept host copy equals its swap file (a lost write-through shows at the step it happens)."""
    handle = param_home(engine).manager.handle
    losses, reads = [], []
    for x, y in batches:
        before = handle.stats.bytes_read
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        reads.append(handle.stats.bytes_read - before)
        if check_copies:
            assert_host_copies_equal_swap_file(engine)
    return losses, reads


def final_weights(engine: Engine) -> dict[str, torch.Tensor]:
    return engine.parameter_values()


def assert_host_copies_equal_swap_file(engine: Engine) -> int:
    """Every kept host copy is clean and equal, byte for byte, to its extent on disk; returns their bytes."""
    home = param_home(engine)
    total = 0
    for i in home.kept:
        key = home.key(i)
        assert home.manager.state(key) is State.HOST_CLEAN
        host = home.manager.host_view(key).view(torch.uint8).numpy().tobytes()
        extent = home.manager.store.extent(key)
        with open(extent.path, "rb") as f:
            assert os.pread(f.fileno(), extent.nbytes, extent.offset) == host, engine.run.names[i]
        total += extent.nbytes
    return total


def param_bytes(engine: Engine, indices) -> int:
    return sum(engine.run.shapes[i].numel() * FP32 for i in indices)


def whole_blocks(engine: Engine, indices) -> int:
    """What reading them into kept copies moves: whole blocks of each extent (manager._host_bytes)."""
    home = param_home(engine)
    return sum(home.manager.store.extent(home.key(i)).capacity for i in indices)


@pytest.mark.parametrize("optimizer", [Tier.NVME, Tier.HOST], ids=["opt-nvme", "opt-cpu"])
def test_whole_model_in_cache_reads_parameters_once(tmp_path, batches, optimizer):
    want_losses, want_weights = plain_torch_run(batches)
    engine = make_engine(tmp_path, max_in_cpu=SPEC.parameters, optimizer=optimizer)
    try:
        losses, reads = train_counting_reads(engine, batches, check_copies=True)
        home = param_home(engine)
        assert home.kept == engine.run.offloaded
        assert reads[0] == whole_blocks(engine, engine.run.offloaded)  # the first forward reads each once
        assert reads[1:] == [0] * (len(batches) - 1)  # then never again
        cached = assert_host_copies_equal_swap_file(engine)
        engine.run.optimizer.settle()  # the last step's state writes, left in flight, hold optimizer buffers
        report = engine.memory_report()
        assert report.host_bytes == cached == SPEC.parameters * FP32 and report.compute_bytes == 0
        weights = final_weights(engine)
    finally:
        engine.close()
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses)) <= 1e-5
    h = SPEC.hidden
    for name, w in want_weights.items():  # the key bias aside (see test_training.assert_same_weights)
        g = weights[name]
        if name.endswith("qkv.bias"):
            g, w = torch.cat([g[:h], g[2 * h:]]), torch.cat([w[:h], w[2 * h:]])
        assert float((g - w).norm() / w.norm()) <= 1e-5, name


def test_partial_budget_keeps_what_fits(tmp_path, batches):
    budget = 40_000
    want_losses, _ = plain_torch_run(batches[:4])
    engine = make_engine(tmp_path, max_in_cpu=budget)
    try:
        losses, reads = train_counting_reads(engine, batches[:4])
        home = param_home(engine)
        kept = sum(engine.run.shapes[i].numel() for i in home.kept)
        assert 0 < kept <= budget and home.kept != engine.run.offloaded
        # every parameter left out would have overflowed the budget when it came (first come, first kept)
        assert all(engine.run.shapes[i].numel() > budget - kept for i in engine.run.offloaded - home.kept)
        uncached = param_bytes(engine, engine.run.offloaded - home.kept)
        assert reads[0] == whole_blocks(engine, home.kept) + 2 * uncached  # uncached: forward and backward
        assert reads[1:] == [2 * uncached] * 3
        engine.run.optimizer.settle()  # the last step's state writes, left in flight, hold optimizer buffers
        assert engine.memory_report().host_bytes == assert_host_copies_equal_swap_file(engine) == kept * FP32
    finally:
        engine.close()
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses)) <= 1e-5


def test_zero_budget_changes_nothing(tmp_path, batches):
    """Also: with the parameters under another nvme_path than the optimizer (another memory manager),
    the step still completes each parameter write before the master buffer it reads from is reused."""
    want_losses, _ = plain_torch_run(batches)
    engine = make_engine(tmp_path, max_in_cpu=0)
    try:
        losses, reads = train_counting_reads(engine, batches)
        assert param_home(engine).kept == set()
        assert reads == [2 * param_bytes(engine, engine.run.offloaded)] * len(batches)
        engine.run.optimizer.settle()  # the last step's state writes, left in flight, hold optimizer buffers
        assert engine.memory_report().host_bytes == 0
    finally:
        engine.close()
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses)) <= 1e-5


def test_half_precision_cache_changes_no_result(tmp_path, batches):
    """bf16: the kept copies hold bf16 values equal to the swap file, and training gives bit for bit the
    losses of a run that reads every parameter from NVMe."""
    runs = []
    for budget in (0, SPEC.parameters):
        engine = make_engine(tmp_path / str(budget), max_in_cpu=budget, precision=Precision.BF16)
        try:
            losses, reads = train_counting_reads(engine, batches[:6])
            assert assert_host_copies_equal_swap_file(engine) == (SPEC.parameters * 2 if budget else 0)
        finally:
            engine.close()
        runs.append((losses, reads))
    (plain, plain_reads), (cached, cached_reads) = runs
    assert cached == plain
    assert cached_reads[1:] == [0] * 5 and plain_reads[1:] == [plain_reads[0]] * 5

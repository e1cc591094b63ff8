"""offload_param.max_in_cpu on CUDA: kept host copies are page-locked, later fetches read no NVMe, and
training gives bit for bit the losses and weights of a run that reads every parameter from NVMe (the
device computes the same operations on the same values; only where the host copy comes from differs)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from infinity.memory.record import State
from infinity.swap.params import NvmeHome, Tier
from infinity.zero import Engine, EngineSettings, Precision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from training_reference import ADAM, SPEC, fresh_model, make_batches  # noqa: E402

pytestmark = pytest.mark.gpu


def run(tmp_path: Path, max_in_cpu: int, precision: Precision):
    (tmp_path / "param").mkdir(parents=True)
    (tmp_path / "opt").mkdir()
    engine = Engine(fresh_model().cuda(), EngineSettings(
        param_tier=Tier.NVME, optimizer_tier=Tier.NVME, param_nvme_path=str(tmp_path / "param"),
        optimizer_nvme_path=str(tmp_path / "opt"), adam=ADAM, gradient_clipping=1.0, sub_group_size=20_000,
        param_max_in_cpu=max_in_cpu, precision=precision))
    (home,) = {id(h): h for h in engine.run.homes if isinstance(h, NvmeHome)}.values()
    losses, reads = [], []
    try:
        for x, y in make_batches()[:8]:
            before = home.manager.handle.stats.bytes_read
            loss = engine(x.cuda(), y.cuda())
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            reads.append(home.manager.handle.stats.bytes_read - before)
        for i in home.kept:
            assert home.manager.state(home.key(i)) is State.HOST_CLEAN
            assert home.manager.host_view(home.key(i)).is_pinned()
        weights = {}
        engine.run.coordinator.settle()  # reads started ahead give their staging buffers back
        for i, name in enumerate(engine.run.names):
            weights[name] = engine.run.homes[i].fetch(i).detach().float().cpu()
            engine.run.homes[i].release(i)
        kept = len(home.kept)
    finally:
        engine.close()
    return losses, reads, weights, kept


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_kept_copies_change_no_result_on_cuda(tmp_path, precision):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        plain = run(tmp_path / "plain", 0, precision)
        kept = run(tmp_path / "kept", SPEC.parameters, precision)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert plain[3] == 0 and kept[3] > 0
    assert kept[1][1:] == [0] * (len(kept[1]) - 1) and all(r > 0 for r in plain[1])
    assert kept[0] == plain[0]
    assert all(torch.equal(kept[2][n], plain[2][n]) for n in plain[2])

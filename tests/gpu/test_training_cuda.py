"""Training on CUDA with parameters and optimizer states offloaded gives plain PyTorch-on-CUDA's results.

The small GPT of tests/integration/training_reference.py runs on device cuda twice from the same seed:
once with infinity.zero.Engine, once with torch.optim.AdamW and clip_grad_norm_.  TF32 is switched
off for the comparison, so both runs do fp32 matrix products.

[Note: the tolerances]
The two runs do not compute the same floating-point operations: ZeroLinear is a matmul plus a bias
add where torch's linear is one addmm, the engine clips with a float64 sum of per-parameter norms,
and its AdamW is torch's fused CPU kernel on master weights where the reference runs the foreach CUDA
kernel.  Each differs from the other by rounding (a few ulp, about 1e-7 relative in fp32) per step.
The bound is the one the CPU equivalence tests use, 1e-5 relative per parameter (the norm of the
difference over the norm of the weights) and per loss: a hundred times the rounding noise, yet a
hundred times smaller than one wrong step would make (lr = 1e-3 moves an entry by about 1e-3 of a
weight of 0.02 std, about 5e-2 relative).  The key bias is the exception it explains
(assert_same_weights): its gradient is rounding noise that Adam turns into steps of about lr.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from infinity.memory.host_buffer import HostBuffer, PinPolicy
from infinity.swap.optimizer import AdamSettings
from infinity.swap.params import Tier
from infinity.zero import Engine, EngineSettings, Precision
from infinity.zero.settings import dtype_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from training_reference import ADAM, SPEC, fresh_model, make_batches, train  # noqa: E402

pytestmark = pytest.mark.gpu

CLIP = 1.0
TOLERANCE = 1e-5
TIERS = [(Tier.NVME, Tier.NVME), (Tier.HOST, Tier.HOST), (Tier.COMPUTE, Tier.NVME)]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 matrix products in fp32, not TF32, for the length of one test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def batches():
    return [(x.cuda(), y.cuda()) for x, y in make_batches()]


@pytest.fixture(scope="module")
def reference(batches):
    """Plain PyTorch on CUDA: the same model and seed, torch.optim.AdamW and clip_grad_norm_."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = fresh_model().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=ADAM.lr, betas=ADAM.betas, eps=ADAM.eps,
                                weight_decay=ADAM.weight_decay)
        losses = []
        for x, y in batches:
            loss = model(x, y)
            loss.backward()
            losses.append(loss.item())
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad()
        return losses, {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def settings(tmp_path, param: Tier, optimizer: Tier, **extra) -> EngineSettings:
    base = dict(param_tier=param, optimizer_tier=optimizer, param_nvme_path=str(tmp_path),
                optimizer_nvme_path=str(tmp_path), adam=ADAM, gradient_clipping=CLIP, sub_group_size=20_000,
                optimizer_buffer_count=4)
    return EngineSettings(**{**base, **extra})


def final_weights(engine: Engine) -> dict[str, torch.Tensor]:
    engine.run.coordinator.settle()  # reads started ahead give their staging buffers back
    out = {}
    for i, name in enumerate(engine.run.names):
        values = engine.run.homes[i].fetch(i)
        assert values.device.type == "cuda", name
        out[name] = values.detach().float().cpu()
        engine.run.homes[i].release(i)
    return out


def weight_differences(got, want, steps: int) -> dict[str, tuple[float, float]]:
    """name -> (max abs difference, relative difference of norms), the key bias's free half left out."""
    h = SPEC.hidden
    out = {}
    for name, w in want.items():
        g = got[name]
        if name.endswith("qkv.bias"):
            assert float((g[h:2 * h] - w[h:2 * h]).abs().max()) <= 2 * ADAM.lr * steps, name
            g, w = torch.cat([g[:h], g[2 * h:]]), torch.cat([w[:h], w[2 * h:]])
        out[name] = float((g - w).abs().max()), float((g - w).norm() / w.norm())
    return out


@pytest.mark.parametrize("param,optimizer", TIERS, ids=[f"param-{p.value}-opt-{o.value}" for p, o in TIERS])
def test_fp32_matches_plain_pytorch_on_cuda(tmp_path, batches, reference, param, optimizer):
    want_losses, want_weights = reference
    engine = Engine(fresh_model().cuda(), settings(tmp_path, param, optimizer))
    try:
        assert engine.run.device.type == "cuda"
        losses = train(engine, batches)
        weights = final_weights(engine)
    finally:
        engine.close()
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses))
    diffs = weight_differences(weights, want_weights, len(batches))
    worst_abs = max(a for a, _ in diffs.values())
    worst_rel, worst_name = max((r, n) for n, (_, r) in diffs.items())
    print(f"\nCUDA param={param.value} optimizer={optimizer.value}: losses max rel {loss_rel:.2e}; weights max abs "
          f"{worst_abs:.2e}, max rel (norm) {worst_rel:.2e} in {worst_name}")
    assert loss_rel <= TOLERANCE
    assert worst_rel <= TOLERANCE, worst_name


@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP16])
def test_half_precision_trains_on_cuda(tmp_path, batches, precision):
    engine = Engine(fresh_model().cuda(), settings(tmp_path, Tier.NVME, Tier.NVME, precision=precision,
                                                   adam=AdamSettings(lr=3e-3)))
    try:
        losses = train(engine, batches)
        assert all(p.dtype == dtype_of(precision) and p.device.type == "cuda" for p in engine.run.params)
        weights = final_weights(engine)
    finally:
        engine.close()
    print(f"\nCUDA {precision.value}: mean loss of the first 3 steps {sum(losses[:3]) / 3:.4f}, "
          f"of the last 3 {sum(losses[-3:]) / 3:.4f}")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_staging_buffers_are_pinned_under_cuda(tmp_path, batches):
    engine = Engine(fresh_model().cuda(), settings(tmp_path, Tier.NVME, Tier.NVME))
    try:
        train(engine, batches[:1])
        pools = engine.run.pools()
        assert len(pools) == 2  # parameters and optimizer states
        for pool in pools:
            assert all(b.pinned and b.tensor.is_pinned() for b in pool._all), pool.name
    finally:
        engine.close()
    assert HostBuffer(1 << 20, pin=PinPolicy.AUTO).tensor.is_pinned()
    assert not HostBuffer(1 << 20, pin=PinPolicy.PAGEABLE).tensor.is_pinned()


def test_host_copies_of_parameters_are_pinned_under_cuda(tmp_path, batches):
    engine = Engine(fresh_model().cuda(), settings(tmp_path, Tier.HOST, Tier.HOST))
    try:
        train(engine, batches[:1])
        assert engine.run.offloaded
        for i in engine.run.offloaded:
            assert engine.run.homes[i]._host[i].is_pinned(), engine.run.names[i]
    finally:
        engine.close()

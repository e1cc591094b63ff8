"""Training with parameters and optimizer states offloaded gives plain PyTorch's results."""
from __future__ import annotations

import pytest
import torch

from infinity.errors import ConfigError
from infinity.swap.params import Tier
from infinity.zero import Engine, EngineSettings, Precision, UsageError
from infinity.zero.settings import dtype_of

from training_reference import ADAM, SPEC, fresh_model, make_batches, plain_torch_run, train


@pytest.fixture(scope="module")
def batches():
    return make_batches()

TIERS = [(Tier.NVME, Tier.NVME), (Tier.NVME, Tier.HOST), (Tier.HOST, Tier.NVME), (Tier.HOST, Tier.HOST),
         (Tier.COMPUTE, Tier.COMPUTE)]


def settings(tmp_path, param: Tier, optimizer: Tier, **extra) -> EngineSettings:
    base = dict(param_tier=param, optimizer_tier=optimizer, param_nvme_path=str(tmp_path),
                optimizer_nvme_path=str(tmp_path), adam=ADAM, gradient_clipping=1.0, sub_group_size=20_000,
                optimizer_buffer_count=4)
    return EngineSettings(**{**base, **extra})


def final_weights(engine: Engine) -> dict[str, torch.Tensor]:
    return engine.parameter_values()


def assert_same_weights(got, want, steps, rel: float = 1e-5):
    """Per-parameter relative error at most rel, except in the key bias.

    [Note: the key bias]  Adding b to every key shifts all of a query's attention scores by the same
    q.b, which softmax ignores: the key bias's gradient is zero but for rounding noise, and Adam turns
    noise into steps of about lr with random sign.  No two implementations agree there element by
    element; its entries stay within lr x steps of each other instead.
    """
    for name, w in want.items():
        g = got[name]
        if name.endswith("qkv.bias"):
            h = w.shape[0] // 3  # queries, keys, values: the model's hidden size each
            assert float((g[h:2 * h] - w[h:2 * h]).abs().max()) <= 2 * ADAM.lr * steps
            g, w = torch.cat([g[:h], g[2 * h:]]), torch.cat([w[:h], w[2 * h:]])
        assert float((g - w).norm() / w.norm()) <= rel, name


@pytest.mark.parametrize("param,optimizer", TIERS, ids=[f"param-{p.value}-opt-{o.value}" for p, o in TIERS])
def test_fp32_matches_plain_pytorch(tmp_path, batches, param, optimizer):
    want_losses, want_weights = plain_torch_run(batches)
    engine = Engine(fresh_model(), settings(tmp_path, param, optimizer))
    try:
        losses = train(engine, batches)
        weights = final_weights(engine)
    finally:
        engine.close()
    for got, want in zip(losses, want_losses):
        assert abs(got - want) <= 1e-5 * abs(want)
    assert_same_weights(weights, want_weights, len(batches))


def test_gradient_accumulation_matches_plain_pytorch(tmp_path, batches):
    want_losses, want_weights = plain_torch_run(batches, accumulation=2)
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, gradient_accumulation_steps=2))
    try:
        losses = train(engine, batches)
        assert engine.global_steps == len(batches) // 2
        weights = final_weights(engine)
    finally:
        engine.close()
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses)) <= 1e-5
    assert_same_weights(weights, want_weights, len(batches) // 2)


def test_parameters_leave_the_compute_tier(tmp_path, batches):
    # max_reuse_distance 0: forward's copies are not kept for backward (the default keeps this small model whole)
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, max_reuse_distance=0))
    try:
        assert all(p.data.numel() == 0 for p in engine.run.params)  # nothing resident before the first forward
        train(engine, batches[:2])
        report = engine.memory_report()
        total = report.nvme_bytes
        assert report.compute_bytes == 0  # all released after the step
        pool = engine.run.param_pool  # host memory holds the next step's first reads, started after the step,
        optimizer_pool = engine.run.pools()[1]  # and the optimizer's last state writes, left in flight
        assert 0 < report.host_bytes <= pool.buffer_count * pool.buffer_bytes + \
            optimizer_pool.buffer_count * optimizer_pool.buffer_bytes
        engine.run.optimizer.settle()
        assert 0 < engine.memory_report().host_bytes <= pool.buffer_count * pool.buffer_bytes
        assert 0 < report.peak_compute_bytes < SPEC.parameters * 4  # never the whole model at once
        assert total >= SPEC.parameters * 4 * 4  # params + master + two moments (+ grads) on NVMe
    finally:
        engine.close()


@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP16])
def test_half_precision_trains(tmp_path, batches, precision):
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, precision=precision,
                                            adam=type(ADAM)(lr=3e-3)))
    try:
        losses = train(engine, batches)
        assert all(p.dtype == dtype_of(precision) for p in engine.run.params)
    finally:
        engine.close()
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_fp16_skips_a_step_on_overflow(tmp_path, batches):
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, precision=Precision.FP16))
    try:
        train(engine, batches[:2])
        before = final_weights(engine)
        scale = engine.scaler.scale
        x, y = batches[2]
        loss = engine(x, y)
        engine.backward(loss * 1e30)  # overflows fp16 gradients
        engine.step()
        # As DeepSpeed's, global_steps counts the skipped step; skipped_steps counts it apart
        assert engine.scaler.skipped_steps == 1 == engine.skipped_steps and engine.global_steps == 3
        assert not engine.was_step_applied() and engine.get_global_grad_norm() == float("inf")
        after = final_weights(engine)
        assert all(torch.equal(before[n], after[n]) for n in before)  # the step was skipped
        train(engine, batches[3:5])
        assert engine.global_steps == 5 and engine.scaler.scale <= scale and engine.was_step_applied()
    finally:
        engine.close()


def test_step_before_backward(tmp_path, batches):
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME))
    try:
        with pytest.raises(UsageError, match="backward"):
            engine.step()
    finally:
        engine.close()


def test_parameter_added_after_initialize(tmp_path, batches):
    model = fresh_model()
    engine = Engine(model, settings(tmp_path, Tier.NVME, Tier.NVME))
    try:
        model.extra = torch.nn.Linear(2, 2)
        with pytest.raises(UsageError, match="added after infinity.initialize"):
            engine(*batches[0])
    finally:
        engine.close()


def test_buffer_size_below_largest_parameter_names_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, param_buffer_size=1000))
    assert "offload_param.buffer_size" in str(err.value) and "tokens.weight" in str(err.value)
    assert f"at least {SPEC.vocab * SPEC.hidden}" in str(err.value)

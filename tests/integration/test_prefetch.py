"""The stage-3 coordinator on a real model with real swap files: prefetch along the trace, the live
budget, divergence, and the per-step report — with results still equal to plain PyTorch."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from infinity.swap.params import Tier
from infinity.zero import Engine

from test_training import assert_same_weights, final_weights, settings, train
from training_reference import SPEC, fresh_model, make_batches, plain_torch_run


@pytest.fixture(scope="module")
def batches():
    return make_batches()


def largest_module(engine: Engine) -> int:
    return max(sum(engine.run.coordinator.sizes[i] for i in mine) for mine in engine.run.coordinator._mine)


@pytest.mark.parametrize("bucket", [0, 50_000_000], ids=["on-demand", "prefetch"])
def test_prefetch_on_or_off_gives_plain_pytorchs_results(tmp_path, batches, bucket):
    want_losses, want_weights = plain_torch_run(batches)
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, prefetch_bucket_size=bucket))
    try:
        losses = train(engine, batches)
        weights = final_weights(engine)
        report = engine.step_report()
    finally:
        engine.close()
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, want_losses))
    assert_same_weights(weights, want_weights, len(batches))
    uses = report.prefetch_hits + report.prefetch_late + report.prefetch_misses
    if bucket:
        assert report.prefetch_misses == 0, report  # every use was read ahead or kept from forward
    else:
        # nothing is read ahead: every forward use misses; backward finds forward's copies kept
        assert report.prefetch_late == 0 and report.prefetch_misses * 2 == uses, report


def test_steady_state_hit_ratio_with_a_fixed_trace(tmp_path, batches):
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, max_reuse_distance=0))
    try:
        ratios = []
        for x, y in batches[:6]:
            engine.backward(engine(x, y))
            engine.step()
            report = engine.step_report()
            ratios.append(report.hit_ratio + report.late_ratio)  # read ahead, in time or late
            assert report.prefetch_hits + report.prefetch_late + report.prefetch_misses > 0
        assert engine.run.coordinator.cursor.invalidations == 0
    finally:
        engine.close()
    assert min(ratios[2:]) >= 0.95, ratios  # from step 3 on


def test_live_elements_never_pass_max_live(tmp_path, batches):
    probe = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME))
    budget = largest_module(probe) + 1
    probe.close()
    want_losses, _ = plain_torch_run(batches[:6])
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, max_live_parameters=budget))
    try:
        peaks, losses = [], []
        for x, y in batches[:6]:
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            peaks.append(engine.step_report().peak_live_elements)
    finally:
        engine.close()
    assert 0 < max(peaks) <= budget
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, want_losses))


def test_max_live_below_one_module_is_a_config_error(tmp_path):
    from infinity.errors import ConfigError
    with pytest.raises(ConfigError, match="stage3_max_live_parameters"):
        Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, max_live_parameters=10))
    assert not [f for f in tmp_path.rglob("*") if f.is_file()]  # no swap files left behind


def test_parameter_values_between_forward_and_backward_is_refused(tmp_path, batches):
    from infinity.errors import UsageError
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME))
    try:
        x, y = batches[0]
        loss = engine(x, y)  # forward keeps its parameters for backward (stage3_max_reuse_distance 1e9)
        with pytest.raises(UsageError, match=r"between a forward and its backward.*after backward\(\) or step\(\)"):
            engine.parameter_values()
        engine.backward(loss)
        engine.step()
        assert set(engine.parameter_values()) == set(engine.run.names)
    finally:
        engine.close()


class Skippy(nn.Module):
    """Data-dependent control flow: the middle layer runs only for some batches."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if x[0, 0] > 0:
            h = torch.tanh(self.b(h))
        return self.c(h).pow(2).mean()


def test_divergence_falls_back_and_retraces(tmp_path, caplog):
    torch.manual_seed(0)
    data = [torch.randn(4, 16) for _ in range(8)]
    for k, x in enumerate(data):
        x[0, 0] = 1.0 if k not in (3, 6) else -1.0  # steps 4 and 7 skip layer b
    torch.manual_seed(1)
    plain = Skippy()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.01)
    want = []
    for x in data:
        loss = plain(x)
        loss.backward()
        for p in plain.parameters():  # the engine steps a parameter without a gradient as if it were zero
            if p.grad is None:         # (as DeepSpeed's stage 3 does; docs/engine.md)
                p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        want.append(loss.item())
    torch.manual_seed(1)
    engine = Engine(Skippy(), settings(tmp_path, Tier.NVME, Tier.NVME))
    got, invalidated = [], []
    try:
        with caplog.at_level(logging.WARNING, logger="infinity.schedule"):
            for x in data:
                loss = engine(x)
                engine.backward(loss)
                engine.step()
                got.append(loss.item())
                invalidated.append(engine.step_report().trace_invalidations)
        assert engine.run.coordinator.cursor.invalidations == sum(invalidated) >= 2
        assert invalidated[3] == 1 and invalidated[:3] == [0, 0, 0]  # step 4 skips b: left the trace
    finally:
        engine.close()
    assert sum("left the recorded module order" in r.message for r in caplog.records) == 1
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want))


def test_step_report_adds_up_and_is_logged_every_step_with_wall_clock_breakdown(tmp_path, batches, caplog):
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, report_every=1))
    try:
        with caplog.at_level(logging.INFO, logger="infinity.zero"):
            train(engine, batches[:3])
        report = engine.step_report()
    finally:
        engine.close()
    assert report.step == 3 and report.bytes_read > 0 and report.bytes_written > 0
    # other_s is the remainder; what can fail is that the measured parts overlap (a wait counted twice,
    # or inside the optimizer's time) and so pass the step's own wall clock
    measured = report.read_wait_s + report.write_wait_s + report.optimizer_s
    assert min(report.read_wait_s, report.write_wait_s) >= 0 and report.optimizer_s > 0
    assert measured < report.step_s and report.other_s == pytest.approx(report.step_s - measured)
    assert report.optimizer_io_wait_s <= report.optimizer_s
    assert 0 < report.peak_live_elements <= SPEC.parameters
    assert sum(r.message.startswith("step ") for r in caplog.records) == 3

"""Training with the CPU compute tier's copies taken out: staging buffers lent as compute copies, and the
next step's first parameters held in host memory after the optimizer step, with results still equal to
plain PyTorch (also for a module whose op saves its weight for backward, so a lent buffer is still
viewed when its parameter is released)."""
from __future__ import annotations

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


class SavesWeight(nn.Module):
    """x @ W.t(): matmul saves the view W.t() for backward, so it keeps the memory W's data had in forward
    (saving the Parameter itself would follow its .data instead)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n) / n ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight.t())


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(SPEC.vocab, 64)
        self.mix = SavesWeight(64)
        self.head = nn.Linear(64, SPEC.vocab)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.mix(self.embed(x)))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def test_lent_buffers_and_held_values_give_plain_pytorchs_results(tmp_path, batches):
    want_losses, want_weights = plain_torch_run(batches)
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, max_reuse_distance=0))
    pool = engine.run.param_pool
    lent = []
    manager = engine.run.homes[next(iter(engine.run.offloaded))].manager
    real = manager.to_compute

    def to_compute(key):  # counts what to_compute lends, so the test sees the path it covers taken
        values = real(key)
        lent.append(any(values.untyped_storage().data_ptr() == b.tensor.untyped_storage().data_ptr()
                        for b in pool._all))
        return values
    manager.to_compute = to_compute
    held = []
    read_ahead = engine.run.coordinator.read_ahead_of_next_step

    def read_ahead_of_next_step(arrived=()):  # what the optimizer step held for the next step's first modules
        held.append(arrived)
        read_ahead(arrived)
    engine.run.coordinator.read_ahead_of_next_step = read_ahead_of_next_step
    try:
        losses = train(engine, batches)
        weights = final_weights(engine)
        # parameter_values gave every held and read-ahead buffer back, then read ahead again: only those hold one
        assert pool.in_use == len(engine.run.coordinator.residence.reading())
    finally:
        engine.close()
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, want_losses))
    assert_same_weights(weights, want_weights, len(batches))
    assert sum(lent) > len(lent) // 2 and pool.replaced == 0  # ZeroLinear and Embedding save no weight view
    assert len(held) == len(batches) + 1 and all(0 < len(h) <= pool.buffer_count // 2 for h in held[:-1])


def test_held_first_parameters_are_not_read_again(tmp_path, batches):
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, max_reuse_distance=0))
    try:
        train(engine, batches[:4])
        held = engine.run.coordinator.first_reads(engine.run._holdable())
        read_before = engine.io_stats().bytes_read
        train(engine, batches[4:5])
        report = engine.step_report()
        offloaded = sum(engine.run.coordinator.sizes[i] * 4 for i in engine.run.offloaded)  # fp32 bytes
        saved = sum(engine.run.coordinator.sizes[i] * 4 for i in held)
    finally:
        engine.close()
    assert held and report.prefetch_misses == 0
    # every offloaded parameter is read for forward and for backward, but the held ones once only
    assert engine.io_stats().bytes_read - read_before <= 2 * offloaded - saved + 4096 * 2 * len(engine.run.offloaded)
    assert report.bytes_read >= 2 * offloaded - saved


def test_a_lent_buffer_viewed_by_autograd_at_release_is_replaced_and_results_stay_equal(tmp_path, batches):
    want_losses, want_weights = plain_torch_run(batches[:6], model=Tiny())
    engine = Engine(Tiny(), settings(tmp_path, Tier.NVME, Tier.NVME, max_reuse_distance=0))
    try:
        losses = train(engine, batches[:6])
        weights = final_weights(engine)
        replaced = engine.run.param_pool.replaced
    finally:
        engine.close()
    assert replaced > 0  # matmul's saved weight still viewed the lent buffer when forward released it
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, want_losses))
    for name, w in want_weights.items():
        assert float((weights[name] - w).norm() / w.norm()) <= 1e-5, name


def test_parameters_kept_from_forward_to_backward_hold_no_staging_buffer(tmp_path, batches):
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME))  # reuse distance 1e9: all kept
    try:
        train(engine, batches[:3])
        x, y = batches[3]
        loss = engine(x, y)
        kept = engine.run.coordinator.residence.kept()
        assert kept and not any(engine.run.homes[i].manager.lent(engine.run.homes[i].key(i)) for i in kept)
        assert engine.run.param_pool.in_use == len(engine.run.coordinator.residence.reading())  # only reads ahead hold buffers
        engine.backward(loss)
        engine.step()
    finally:
        engine.close()

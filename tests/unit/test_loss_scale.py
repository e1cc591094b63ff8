"""fp16 loss scaling step for step as DeepSpeed 0.19.8's DynamicLossScaler.

The sequences were produced by DeepSpeed itself:
    DS_ACCELERATOR=cpu ../dsvenv/bin/python benchmarks/ds_parity_worker.py   (key "loss_scale")
(benchmarks/ds_parity.py prints them beside infinity's; docs/benchmarks.md records a run)."""
from __future__ import annotations

import pytest

from infinity import LossScaleAtMinimum
from infinity.config.training import Unscale
from infinity.zero.loss_scale import LossScaler, LossScaleSettings

OVERFLOWS = (2, 3, 4, 9, 13, 14)  # 0-based optimizer steps with forced overflows
# The scale each step used (× 1024): window 3, hysteresis 2, initial 2**16.
DEEPSPEED = [64, 64, 64, 64, 32, 16, 16, 16, 16, 32, 32, 32, 32, 32, 16, 8]
DEEPSPEED_CONSECUTIVE = [64, 64, 64, 64, 32, 16, 16, 16, 16, 32, 32, 32, 32, 32, 32, 16]


def scales(consecutive: bool) -> list[float]:
    scaler = LossScaler(LossScaleSettings(window=3, hysteresis=2, consecutive_hysteresis=consecutive))
    seen = []
    for k in range(16):
        seen.append(scaler.scale / 1024)
        scaler.update(k in OVERFLOWS)
    return seen


@pytest.mark.parametrize("consecutive, want", [(False, DEEPSPEED), (True, DEEPSPEED_CONSECUTIVE)])
def test_the_scale_follows_deepspeeds_sequence(consecutive, want):
    assert scales(consecutive) == want


def test_skipped_steps_are_counted():
    scaler = LossScaler(LossScaleSettings(window=3, hysteresis=2))
    for k in range(16):
        scaler.update(k in OVERFLOWS)
    assert scaler.skipped_steps == len(OVERFLOWS)


def test_an_overflow_at_the_minimum_stops_the_run_as_deepspeed_does():
    scaler = LossScaler(LossScaleSettings(initial_scale_power=1, hysteresis=1, min_scale=1.0))
    scaler.update(True)  # 2 -> 1
    assert scaler.scale == 1.0
    with pytest.raises(LossScaleAtMinimum, match="min_loss_scale"):
        scaler.update(True)


def test_gradients_are_unscaled_by_the_updated_scale_unless_asked_otherwise():
    deepspeed = LossScaler(LossScaleSettings(window=1, hysteresis=2))
    corrected = LossScaler(LossScaleSettings(window=1, hysteresis=2, unscale=Unscale.STEP_SCALE))
    for scaler in (deepspeed, corrected):
        scaler.update(False)  # the first good step: no growth yet
        scaler.update(False)  # the second: the scale doubles
    assert deepspeed.unscale_by(2.0 ** 16) == 2.0 ** 17  # DeepSpeed's ZeRO-3 divides by the new scale
    assert corrected.unscale_by(2.0 ** 16) == 2.0 ** 16

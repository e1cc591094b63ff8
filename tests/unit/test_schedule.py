"""The config's schedulers give DeepSpeed 0.19.8's learning rates, step for step and bit for bit.

DEEPSPEED holds the lr DeepSpeed's engine used at each optimizer step of each case of
benchmarks/ds_parity_cases.py (SCHEDULERS), as printed by
    DS_ACCELERATOR=cpu ../dsvenv/bin/python benchmarks/ds_parity_worker.py   (key "schedules")
(benchmarks/ds_parity.py prints them beside infinity's; docs/benchmarks.md records a run)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from infinity.config import Config
from infinity.zero.from_config import settings_from_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ds_parity_cases as cases  # noqa: E402

DEEPSPEED = {
    'WarmupLR log': [0.0001, 0.0001, 0.003929842791621962, 0.006170157208378039, 0.007759685583243923, 0.008992619576868878, 0.009999999999999998, 0.01, 0.01, 0.01, 0.01, 0.01],
    'WarmupLR linear': [0.0001, 0.0001, 0.00175, 0.0034, 0.005050000000000001, 0.0067, 0.00835, 0.01, 0.01, 0.01, 0.01, 0.01],
    'WarmupLR no max': [0.0, 0.0, 0.0038685280723454152, 0.006131471927654584, 0.0077370561446908305, 0.00898244401703927, 0.009999999999999998, 0.01, 0.01, 0.01, 0.01, 0.01],
    'WarmupDecayLR': [0.0001, 0.0001, 0.005050000000000001, 0.007945564378569723, 0.01, 0.01, 0.00835, 0.0067, 0.005050000000000001, 0.0034, 0.00175, 0.0001],
    'WarmupCosineLR': [0.0, 0.001, 0.0055000000000000005, 0.008132331253245204, 0.01, 0.009363620667976085, 0.007625, 0.00525, 0.002875000000000001, 0.0011363793320239163, 0.0005, 0.0005],
    'OneCycle': [0.001, 0.0032499999999999994, 0.005499999999999999, 0.007750000000000002, 0.010000000000000002, 0.0069999999999999975, 0.003999999999999998, 0.001, 0.0008, 0.0006666666666666666, 0.0005714285714285715, 0.0005],
    'LRRangeTest': [0.001, 0.001, 0.001, 0.003, 0.003, 0.003, 0.005, 0.005, 0.005, 0.007, 0.007, 0.007],
}
# OneCycle's betas at each step (cycle_momentum defaults to true; DeepSpeed sets beta2 to 0.99).
DEEPSPEED_ONECYCLE_BETAS = [(0.8, 0.99), (0.875, 0.99), (0.8500000000000001, 0.99), (0.8250000000000001, 0.99), (0.8, 0.99), (0.8333333333333334, 0.99), (0.8666666666666667, 0.99), (0.9, 0.99), (0.9450000000000001, 0.99), (0.9900000000000001, 0.99), (1.035, 0.99), (1.08, 0.99)]


def schedule(name: str, **scheduler):
    cfg = cases.config(name)
    cfg["scheduler"] = {**cfg["scheduler"], **scheduler}
    return settings_from_config(Config.load(cfg)).schedule


@pytest.mark.parametrize("name", list(DEEPSPEED))
def test_each_step_uses_deepspeeds_lr(name):
    s = schedule(name)
    assert [s.lr(k) for k in range(cases.STEPS)] == DEEPSPEED[name]


def test_onecycle_cycles_the_betas_as_deepspeed():
    s = schedule("OneCycle")
    assert [s.betas(k) for k in range(cases.STEPS)] == DEEPSPEED_ONECYCLE_BETAS


def test_the_first_value_once_on_request():
    """scheduler.first_step "schedule": step k uses iteration k, so DeepSpeed's sequence one step ahead."""
    s = schedule("WarmupLR linear", first_step="schedule")
    assert [s.lr(k) for k in range(cases.STEPS - 1)] == DEEPSPEED["WarmupLR linear"][1:]


def test_warmup_lr_without_max_warms_up_to_the_optimizers_lr():
    s = schedule("WarmupLR no max")
    assert s.curve.max_lr == cases.LR and s.lr(1000) == cases.LR


def test_last_batch_iteration_keeps_the_optimizers_lr_for_the_first_step():
    s = schedule("WarmupLR linear", params={**cases.SCHEDULERS["WarmupLR linear"]["params"], "last_batch_iteration": 2})
    assert s.lr(0) == cases.LR and s.lr(1) == DEEPSPEED["WarmupLR linear"][4]

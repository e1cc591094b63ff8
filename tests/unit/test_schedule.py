"""The config's schedulers give DeepSpeed's learning rates (formulas from its documentation)."""
from __future__ import annotations

import math

import pytest

from infinity.config import Config
from infinity.zero.from_config import settings_from_config


def schedule(kind, **params):
    cfg = Config.load({"optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
                       "scheduler": {"type": kind, "params": params}})
    return settings_from_config(cfg).schedule


def test_warmup_decay_falls_linearly_to_the_minimum():
    s = schedule("WarmupDecayLR", warmup_min_lr=0.001, warmup_max_lr=0.005, warmup_num_steps=10,
                 total_num_steps=30, warmup_type="linear")
    assert s.curve.value(0) == pytest.approx(0.001) and s.curve.value(5) == pytest.approx(0.003)
    assert s.curve.value(10) == pytest.approx(0.005)
    assert s.curve.value(20) == pytest.approx(0.001 + 0.004 * 10 / 20) and s.curve.value(30) == pytest.approx(0.001)


def test_warmup_cosine_is_a_ratio_of_the_optimizer_lr():
    s = schedule("WarmupCosineLR", warmup_min_ratio=0.1, warmup_num_steps=4, total_num_steps=20,
                 cos_min_ratio=0.01, warmup_type="log")
    assert s.curve.value(0) == pytest.approx(0.001)  # 0.1 × lr
    assert s.curve.value(2) == pytest.approx(0.01 * (0.1 + 0.9 * math.log(3) / math.log(4)))
    done = (10 - 4 + 1) / 16
    assert s.curve.value(10) == pytest.approx(0.01 * (0.01 + 0.99 * (1 + math.cos(math.pi * done)) / 2))
    assert s.curve.value(19) == pytest.approx(0.01 * 0.01)


def test_warmup_lr_defaults_are_deepspeeds():
    s = schedule("WarmupLR")
    c = s.curve  # without warmup_max_lr, DeepSpeed's WarmupLR warms up to the optimizer's lr
    assert (c.min_lr, c.max_lr, c.warmup.steps, c.warmup.type.value) == (0.0, 0.01, 1000, "log")
    assert s.lr(5000) == 0.01

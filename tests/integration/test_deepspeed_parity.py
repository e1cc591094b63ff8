"""The engine's counters, losses and API against DeepSpeed 0.19.8's, the same small model and config
(benchmarks/ds_parity_cases.py); infinity with parameters and optimizer states on NVMe.

The pinned values are DeepSpeed's own, printed by
    DS_ACCELERATOR=cpu ../dsvenv/bin/python benchmarks/ds_parity_worker.py   (keys "counters", "losses")
(benchmarks/ds_parity.py prints them beside infinity's; docs/benchmarks.md records a run)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

import infinity
from infinity import ConfigError, UsageError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ds_parity_cases as cases  # noqa: E402

# Per micro-batch, gradient_accumulation_steps 4: micro_steps, is_gradient_accumulation_boundary() and
# global_steps between backward and step; global_steps, was_step_applied() and global_samples after it.
DEEPSPEED_COUNTERS = [[0, False, 0, 0, False, 0], [1, False, 0, 0, False, 0], [2, False, 0, 0, False, 0], [3, True, 0, 1, True, 16], [4, False, 1, 1, False, 16], [5, False, 1, 1, False, 16], [6, False, 1, 1, False, 16], [7, True, 1, 2, True, 32], [8, False, 2, 2, False, 32], [9, False, 2, 2, False, 32], [10, False, 2, 2, False, 32], [11, True, 2, 3, True, 48]]
# fp32 losses of 12 steps with gradient_clipping absent (DeepSpeed's default 1.0 clips them).
DEEPSPEED_LOSSES = [0.5770200490951538, 1.5526385307312012, 1.3793144226074219, 1.365574836730957, 0.9898297190666199, 1.057310938835144, 0.9514296650886536, 2.168156862258911, 1.0327134132385254, 1.1307367086410522, 1.2718206644058228, 1.9890843629837036]


def config(case: str, tmp_path: Path, **extra) -> dict:
    cfg = cases.config(case, **extra)
    cfg["optimizer"]["params"].pop("torch_adam")
    cfg["zero_optimization"] = {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)},
                                "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}
    return cfg


def engine_for(case: str, tmp_path: Path, **extra):
    engine, *_ = infinity.initialize(model=cases.model(), config=config(case, tmp_path, **extra))
    return engine


def test_counters_between_backward_and_step_are_deepspeeds(tmp_path):
    engine = engine_for("counters", tmp_path)
    try:
        rows = cases.train(engine, 3, gas=4)
    finally:
        engine.close()
    keys = ("micro_steps", "boundary", "global_steps_before", "global_steps", "applied", "samples")
    assert [[r[k] for k in keys] for r in rows] == DEEPSPEED_COUNTERS


def test_losses_with_the_clipping_default_are_deepspeeds(tmp_path):
    engine = engine_for("losses", tmp_path)
    try:
        assert engine.gradient_clipping() == 1.0
        rows = cases.train(engine, cases.STEPS)
    finally:
        engine.close()
    assert [r["loss"] for r in rows] == pytest.approx(DEEPSPEED_LOSSES, rel=1e-6)
    assert all(r["grad_norm"] > 1.0 for r in rows)  # every step was clipped


def test_batch_sizes_are_derived_or_refused_as_deepspeed(tmp_path):
    engine = engine_for("derived micro", tmp_path)
    try:
        assert (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(),
                engine.train_batch_size()) == (8, 4, 32)  # DeepSpeed: 32 // 1 // 4
    finally:
        engine.close()
    with pytest.raises(ConfigError) as err:
        engine_for("mismatch", tmp_path)
    text = str(err.value)
    assert all(k in text for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                   "gradient_accumulation_steps"))


def test_engine_api_answers_as_deepspeed(tmp_path, caplog):
    engine = engine_for("losses", tmp_path)
    try:
        assert engine.get_global_grad_norm() is None and not engine.was_step_applied()
        assert (engine.zero_optimization_stage(), engine.global_rank, engine.world_size, engine.local_rank) == (3, 0, 1, 0)
        assert engine.get_mom() == [(0.9, 0.999)] and engine.lr_scheduler is None
        cases.train(engine, 1)
        assert engine.global_samples == 4 and engine.skipped_steps == 0 and engine.was_step_applied()
        with pytest.raises(UsageError, match="ZeRO stage 3"):
            with engine.no_sync():
                pass
        with caplog.at_level(logging.WARNING, logger="infinity.zero"):
            assert engine.load_checkpoint(str(tmp_path / "none")) == (None, None)
            assert engine.load_checkpoint(str(tmp_path), tag="global_step9") == (None, None)
        assert sum("None, None" in r.getMessage() for r in caplog.records) == 2
        with pytest.raises(UsageError, match="custom_load_fn"):
            engine.load_checkpoint(str(tmp_path), custom_load_fn=lambda *a: None)
        engine.save_checkpoint(str(tmp_path / "ckpt"))
        folder, client = engine.load_checkpoint(str(tmp_path / "ckpt"), load_optimizer_states=True,
                                                load_lr_scheduler_states=True, load_module_only=False)
        assert folder.endswith("global_step1") and engine.global_steps == 1
    finally:
        engine.close()


def test_zero_init_takes_deepspeeds_keywords(tmp_path, caplog):
    cfg = config("losses", tmp_path)
    with caplog.at_level(logging.WARNING, logger="infinity.zero"):
        with infinity.zero.Init(remote_device="cpu", pin_memory=True, config_dict_or_path=cfg, dtype=None, mpu=None):
            model = cases.model()
    assert any("remote_device" in r.getMessage() for r in caplog.records)
    engine, *_ = infinity.initialize(model=model, config=cfg)
    engine.close()

"""infinity.Config: loading DeepSpeed JSON, "auto", aliases, every problem at once, round trips."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from infinity import Config, ConfigError
from infinity.config import AUTO, Backend, OffloadDevice, Precision, Source, TrainingArgs
from infinity.config.auto import Unfilled

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIR = ROOT / "infinity" / "config" / "shipped"  # package data (infinity.config.shipped)
REFERENCE = SHIPPED_DIR / "hf-zero3-nvme.json"
ARGS = TrainingArgs(learning_rate=3e-5, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.01,
                    max_grad_norm=1.0, per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=2,
                    hidden_size=4096, precision=Precision.FP16, warmup_steps=100)


def problems_of(source, **kw) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        Config.load(source, **kw)
    return {p.key: f"{p.message} ({p.fix})" for p in info.value.problems}


def test_reference_is_the_transformers_example_byte_for_byte():
    shared = Path("/work/shared/reference/hf-zero3-nvme.json")
    if shared.exists():
        assert REFERENCE.read_bytes() == shared.read_bytes()


def test_reference_loads_and_resolves():
    config = Config.load(REFERENCE)
    assert "optimizer.params.lr" in config.pending_auto
    resolved = config.resolve(ARGS)
    assert resolved.pending_auto == []
    zero = resolved.zero_optimization
    assert zero.stage3_prefetch_bucket_size == int(0.9 * 4096 * 4096)
    assert zero.stage3_param_persistence_threshold == 10 * 4096
    assert zero.reduce_bucket_size == 4096 * 4096
    assert zero.sub_group_size == 1_000_000_000 and isinstance(zero.sub_group_size, int)
    assert zero.offload_param.buffer_size == 100_000_000 and isinstance(zero.offload_param.buffer_size, int)
    assert zero.offload_param.device is OffloadDevice.NVME and zero.offload_param.nvme_path == "/local_nvme"
    params = resolved.optimizer.params
    assert (params.lr, params.betas, params.eps, params.weight_decay) == (3e-5, (0.9, 0.999), 1e-8, 0.01)
    assert resolved.scheduler.params.warmup_max_lr == 3e-5 and resolved.scheduler.params.warmup_min_lr == 0.0
    assert resolved.scheduler.params.warmup_num_steps == 100
    assert (resolved.train_micro_batch_size_per_gpu, resolved.gradient_accumulation_steps) == (4, 2)
    assert resolved.train_batch_size == 4 * 2 * 2 and resolved.gradient_clipping == 1.0
    assert resolved.precision is Precision.FP16
    assert resolved.aio.intra_op_parallelism == 1 and resolved.aio.queue_depth == 32
    assert resolved.sources["optimizer.params.lr"] is Source.AUTO
    assert resolved.sources["zero_optimization.sub_group_size"] is Source.FILE
    assert resolved.sources["aio.use_gds"] is Source.DEFAULT


def test_load_in_one_call_with_args():
    assert Config.load(REFERENCE, args=ARGS) == Config.load(REFERENCE).resolve(ARGS)


SHIPPED = sorted(SHIPPED_DIR.glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = Config.load(path)
    kept = config.resolve(TrainingArgs(), Unfilled.KEEP)
    assert set(kept.pending_auto) <= set(config.pending_auto)
    if not config.pending_auto:
        assert kept == config


def test_round_trip_config_to_json_to_config():
    resolved = Config.load(REFERENCE, args=ARGS)
    again = Config.load(json.loads(resolved.to_json()))
    assert again == resolved
    assert Config.load(resolved.to_json()) == resolved  # a JSON string loads too
    assert Config.load(again.to_dict()).to_dict() == resolved.to_dict()


def test_counts_written_as_floats_become_integers_and_fractions_are_errors():
    config = Config.load({"zero_optimization": {"stage": 3, "sub_group_size": 1e8}})
    assert config.zero_optimization.sub_group_size == 100_000_000
    assert type(config.zero_optimization.sub_group_size) is int
    found = problems_of({"zero_optimization": {"sub_group_size": 1.5e3 + 0.5}})
    assert "whole number" in found["zero_optimization.sub_group_size"]


def test_auto_without_a_value_names_the_key_and_the_argument():
    with pytest.raises(ConfigError) as info:
        Config.load(REFERENCE).resolve(TrainingArgs(learning_rate=1e-4))
    by_key = {p.key: p for p in info.value.problems}
    assert "hidden_size" in by_key["zero_optimization.stage3_prefetch_bucket_size"].message
    assert "--hidden-size" in by_key["zero_optimization.reduce_bucket_size"].fix
    assert "optimizer.params.lr" not in by_key
    assert "adam_epsilon" in by_key["optimizer.params.eps"].message


def test_auto_refused_where_nothing_could_fill_it():
    assert "auto" in problems_of({"zero_optimization": {"stage": "auto"}})["zero_optimization.stage"]


def test_written_value_that_disagrees_with_the_arguments_is_an_error():
    config = Config.load({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "train_batch_size": 64,
                          "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})
    with pytest.raises(ConfigError) as info:
        config.resolve(TrainingArgs(learning_rate=3e-5, world_size=2))
    assert {"optimizer.params.lr", "train_batch_size"} <= set(info.value.keys)


def test_defaults_take_the_arguments():
    config = Config.load({"zero_optimization": {"stage": 3}}).resolve(
        TrainingArgs(gradient_accumulation_steps=4, precision=Precision.BF16))
    assert config.gradient_accumulation_steps == 4 and config.precision is Precision.BF16
    assert config.sources["gradient_accumulation_steps"] is Source.AUTO


def test_thread_count_alias_warns_once_and_takes_effect(caplog):
    with caplog.at_level(logging.WARNING, logger="infinity.config"):
        config = Config.load({"aio": {"thread_count": 4}})
    assert config.aio.intra_op_parallelism == 4
    assert len([r for r in caplog.records if "thread_count" in r.getMessage()]) == 1


def test_block_pasted_from_the_deepspeed_tuner_takes_effect(caplog):
    tuner = {"aio": {"block_size": 1048576, "queue_depth": 16, "single_submit": "false",
                     "overlap_events": "true", "num_threads": 8}}
    with caplog.at_level(logging.WARNING, logger="infinity.config"):
        config = Config.load(tuner)
    assert config.aio.intra_op_parallelism == 8 and config.aio.queue_depth == 16
    assert config.aio.single_submit is False and config.aio.overlap_events is True
    messages = [r.getMessage() for r in caplog.records]
    assert sum("num_threads" in m for m in messages) == 1
    assert sum("'false'" in m for m in messages) == 1 and sum("'true'" in m for m in messages) == 1


def test_string_booleans_elsewhere_warn_and_take_effect(caplog):
    with caplog.at_level(logging.WARNING, logger="infinity.config"):
        config = Config.load({"wall_clock_breakdown": "true"})
    assert config.wall_clock_breakdown is True
    assert any("wall_clock_breakdown" in r.getMessage() for r in caplog.records)


def test_nested_aio_of_the_transformers_guide_is_taken(caplog):
    with caplog.at_level(logging.WARNING, logger="infinity.config"):
        config = Config.load({"zero_optimization": {"aio": {"block_size": 262144}}})
    assert config.aio.block_size == 262144
    assert any("zero_optimization.aio" in r.getMessage() for r in caplog.records)
    assert "zero_optimization.aio" in problems_of(
        {"aio": {}, "zero_optimization": {"aio": {"block_size": 262144}}})


def test_aio_backend():
    assert Config.load({"aio": {"backend": "posix"}}).aio.backend is Backend.POSIX
    found = problems_of({"aio": {"backend": "io_uring"}})
    assert "io_uring" in found["aio.backend"]  # this build ships no io_uring backend


def test_three_unknown_keys_in_three_blocks_in_one_error():
    found = problems_of({"zero_optimization": {"stage": 3, "sub_grup_size": 1e9},
                         "aio": {"queue_dept": 8}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas1": 1}},
                         "steps_per_prnt": 10})
    assert "did you mean 'sub_group_size'?" in found["zero_optimization.sub_grup_size"]
    assert "did you mean 'queue_depth'?" in found["aio.queue_dept"]
    assert "did you mean 'betas'?" in found["optimizer.params.betas1"]
    assert "did you mean 'steps_per_print'?" in found["steps_per_prnt"]
    assert len(found) == 4


def test_wrong_types_and_ranges_all_reported():
    found = problems_of({"zero_optimization": {"stage": 4, "offload_param": {"buffer_count": "five"},
                                               "offload_optimizer": {"ratio": 1.5, "device": "disk"}},
                         "optimizer": {"params": {"lr": -1, "betas": [0.9]}},
                         "prometheus": {"port": 70000, "labels": {"job": 1}}, "fp16": []})
    assert set(found) == {"zero_optimization.stage", "zero_optimization.offload_param.buffer_count",
                          "zero_optimization.offload_optimizer.ratio", "zero_optimization.offload_optimizer.device",
                          "optimizer.params.lr", "optimizer.params.betas", "prometheus.port", "prometheus.labels",
                          "fp16"}
    assert "at most 3" in found["zero_optimization.stage"]


@pytest.mark.parametrize("block, key, words", [
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
     "zero_optimization.offload_param.nvme_path", "no nvme_path"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}},
     "zero_optimization.offload_param.device", "needs stage 3"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/n", "buffer_count": 2}}},
     "zero_optimization.offload_optimizer.buffer_count", "4 tensors"),
    ({"aio": {"block_size": 1000}}, "aio.block_size", "multiple of 4096"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "bf16.enabled", "both enabled"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1e-3}}},
     "scheduler.params.total_num_steps", "needs"),
])
def test_cross_field_rules(block, key, words):
    assert words in problems_of(block)[key]


def test_cross_field_rules_stay_quiet_about_keys_already_rejected():
    found = problems_of({"zero_optimization": {"stage": "three", "offload_param": {"device": "nvme",
                                                                                     "nvme_path": "/n"}}})
    assert list(found) == ["zero_optimization.stage"]


def test_unknown_top_level_key_and_prometheus_block():
    config = Config.load({"prometheus": {"enabled": True, "labels": {"job": "llama"}}})
    assert config.prometheus.port == 9400 and config.prometheus.label_dict == {"job": "llama"}
    assert "did you mean 'prometheus'?" in problems_of({"prometheus_": {}})["prometheus_"]


def test_keys_without_effect_are_logged_once_each(caplog):
    with caplog.at_level(logging.WARNING, logger="infinity.config"):
        Config.load({"zero_optimization": {"overlap_comm": True, "allgather_bucket_size": 2e8}})
    lines = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert len(lines) == 2  # one warning per key
    assert "overlap_comm" in lines[1] and "allgather_bucket_size" in lines[0]


def test_deepspeed_stage3_logging_key_loads_and_is_named_as_without_effect_but_the_save_key_is_used(caplog):
    with caplog.at_level(logging.WARNING, logger="infinity.config"):
        Config.load({"zero_optimization": {"stage": 3, "log_trace_cache_warnings": True,
                                           "stage3_gather_16bit_weights_on_model_save": True}})
    lines = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert len(lines) == 1 and "log_trace_cache_warnings" in lines[0]
    assert "stage3_gather_16bit_weights_on_model_save" not in lines[0]  # engine.save_16bit_model reads it


def test_keys_of_optional_blocks_written_at_their_default_are_not_named_as_without_effect(caplog):
    # optimizer and scheduler are None in a default Config: their keys' defaults are their blocks' own.
    with caplog.at_level(logging.WARNING, logger="infinity.config"):
        Config.load({"optimizer": {"type": "AdamW", "params": {"torch_adam": False, "lr": 1e-3}}})
        assert Config.load({"optimizer": {"params": {"torch_adam": False}}}).no_effect() == []
        assert Config.load({"fp16": {"enabled": True, "auto_cast": False}}).no_effect() == []
    assert [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()] == []
    with caplog.at_level(logging.WARNING, logger="infinity.config"):
        config = Config.load({"optimizer": {"params": {"torch_adam": True}}})
    assert [key for key, _ in config.no_effect()] == ["optimizer.params.torch_adam"]
    assert any("torch_adam" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="infinity.config"):
        config = Config.load({"fp16": {"enabled": True, "auto_cast": True}})
    assert [key for key, _ in config.no_effect()] == ["fp16.auto_cast"]  # accepted, not implemented: said so


def test_json_mistakes_are_config_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps_per_print": 1,}')
    assert "not valid JSON" in problems_of(bad)[str(bad)]
    assert "twice" in problems_of('{"steps_per_print": 1, "steps_per_print": 2}')["steps_per_print"]
    assert "cannot be read" in problems_of(tmp_path / "missing.json")[str(tmp_path / "missing.json")]


def test_overrides_mark_their_source():
    config = Config.load(REFERENCE, overrides={"zero_optimization.offload_param.buffer_count": 8,
                                               "aio.queue_depth": 64})
    assert config.zero_optimization.offload_param.buffer_count == 8 and config.aio.queue_depth == 64
    assert config.sources["zero_optimization.offload_param.buffer_count"] is Source.OVERRIDE
    assert config.sources["aio.queue_depth"] is Source.OVERRIDE


def test_pending_auto_is_the_auto_marker():
    assert Config.load(REFERENCE).optimizer.params.lr is AUTO


def test_every_key_is_documented():
    doc = (ROOT / "docs" / "config.md").read_text()
    keys = Config.load({"optimizer": {}, "scheduler": {}}).sources
    missing = [key for key in keys if f"`{key}`" not in doc]
    assert missing == []


def test_a_config_that_is_neither_a_file_nor_a_shipped_name_names_the_path_and_the_shipped_ones(tmp_path):
    from infinity.config import shipped

    missing = tmp_path / "nvme-locl.json"
    with pytest.raises(ConfigError) as caught:
        Config.load(str(missing))
    message = str(caught.value)
    assert str(missing) in message and "cannot be read" in message
    assert all(name in message for name in ("nvme-local", "cpu-offload", "hf-zero3-nvme"))
    with pytest.raises(ConfigError, match="'nvme-locl' is not a shipped config.*name one of cpu-offload"):
        shipped.read_text("nvme-locl")
    assert shipped.read_text("nvme-local") == (SHIPPED_DIR / "nvme-local.json").read_text(encoding="utf-8")

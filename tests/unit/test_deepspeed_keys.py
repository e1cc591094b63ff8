"""Every key of DeepSpeed 0.19.8's configuration is known: read, or accepted with one warning of its own
saying it has no effect here (infinity/config/deepspeed_keys.py).  Misspellings stay errors.

ZERO_FP16_BF16 is DeepSpeed's own list, printed by
    DS_ACCELERATOR=cpu ../dsvenv/bin/python benchmarks/ds_parity_worker.py   (key "keys": its pydantic models)
TOP_LEVEL are the top-level keys of DeepSpeed's config-json documentation and runtime/constants.py."""
from __future__ import annotations

import logging

import pytest

from infinity import ConfigError
from infinity.config import Config
from infinity.config.deepspeed_keys import FOREIGN, foreign

TOP_LEVEL = [
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "managed_gradient_accumulation", "optimizer", "scheduler", "communication_data_type",
    "seq_parallel_communication_data_type", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
    "fp16", "bf16", "amp", "gradient_clipping", "zero_optimization", "aio", "steps_per_print",
    "wall_clock_breakdown", "dump_state", "flops_profiler", "activation_checkpointing", "sparse_attention",
    "data_efficiency", "curriculum_learning", "tensorboard", "wandb", "csv_monitor", "comet", "elasticity",
    "comms_logger", "compression_training", "checkpoint", "data_types", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "autotuning", "memory_breakdown", "disable_allgather", "dataloader_drop_last",
    "pipeline", "weight_quantization", "hybrid_engine", "nebula", "torch_autocast", "tensor_parallel", "compile",
    "timers", "graph_harvesting", "use_data_before_expert_parallelism", "disable_python_gc", "eigenvalue",
    "progressive_layer_drop", "quantize_training",
]
ZERO_FP16_BF16 = [
    "bf16.bf16_master_weights_and_grads", "bf16.bf16_optimizer_states", "bf16.check_grad_overflow", "bf16.enabled",
    "bf16.immediate_grad_update", "fp16.auto_cast", "fp16.consecutive_hysteresis", "fp16.enabled",
    "fp16.fp16_master_weights_and_grads", "fp16.hysteresis", "fp16.initial_scale_power", "fp16.loss_scale",
    "fp16.loss_scale_window", "fp16.min_loss_scale",
] + [f"zero_optimization.{k}" for k in (
    "allgather_bucket_size", "allgather_partitions", "compute_grad_norm", "contiguous_gradients", "cpu_offload",
    "cpu_offload_param", "cpu_offload_use_pin_memory", "elastic_checkpoint", "enable_sanity_checks",
    "ignore_unused_parameters", "leaf_module.classes", "leaf_module.name_suffixes", "leaf_module.names",
    "legacy_stage1", "load_from_fp32_weights", "log_trace_cache_warnings", "memory_efficient_linear",
    "offload_optimizer.buffer_count", "offload_optimizer.cpuadam_cores_perc", "offload_optimizer.device",
    "offload_optimizer.fast_init", "offload_optimizer.nvme_path", "offload_optimizer.pin_memory",
    "offload_optimizer.pipeline_read", "offload_optimizer.pipeline_write", "offload_optimizer.ratio",
    "offload_optimizer.super_offload", "offload_param.buffer_count", "offload_param.buffer_size",
    "offload_param.device", "offload_param.max_in_cpu", "offload_param.nvme_path", "offload_param.pin_memory",
    "overlap_comm", "override_module_apply", "parameter_alignment", "pipeline_loading_checkpoint", "reduce_bucket_size",
    "reduce_scatter", "round_robin_gradients", "save_muon_momentum_buffer_in_memory", "stage",
    "stage3_allgather_sequential", "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "stage3_model_persistence_threshold", "stage3_module_granularity_threshold", "stage3_param_persistence_threshold",
    "stage3_prefetch_bucket_size", "stage3_use_all_reduce_for_fetch_params", "sub_group_size",
    "use_multi_rank_bucket_allreduce", "zenflow.auto_ratio", "zenflow.full_warm_up_rounds", "zenflow.offload",
    "zenflow.overlap_step", "zenflow.pt_reserved_cores_perc", "zenflow.select_interval", "zenflow.select_strategy",
    "zenflow.steps_per_epoch", "zenflow.topk_ratio", "zenflow.update_interval", "zero_hpz_partition_size",
    "zero_quantized_gradients", "zero_quantized_nontrainable_weights", "zero_quantized_weights",
    "mics_shard_size", "mics_hierarchical_params_gather")]
ALIASES = {"zero_optimization.stage3_gather_fp16_weights_on_model_save"}  # another spelling infinity reads


def read_here() -> set[str]:
    """Every dotted key (and block) infinity's schema reads."""
    keys = set(Config.load({"optimizer": {}, "scheduler": {}}).sources)
    return keys | {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}


def known(key: str) -> bool:
    parts = key.split(".")
    return (key in read_here() or key in ALIASES
            or any(foreign(".".join(parts[:i])) for i in range(1, len(parts) + 1)))


@pytest.mark.parametrize("key", TOP_LEVEL + ZERO_FP16_BF16)
def test_every_deepspeed_key_is_known(key):
    assert known(key), f"{key} is neither read nor listed in infinity/config/deepspeed_keys.py"


def nested(paths: list[str]) -> dict:
    out: dict = {}
    for path in paths:
        *parents, last = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = {"enabled": True} if "." not in path else 1
    return out


def test_a_config_with_every_foreign_key_loads_with_one_warning_each(caplog):
    with caplog.at_level(logging.WARNING, logger="infinity.config"):
        config = Config.load(nested(list(FOREIGN)))
    warned = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert len(warned) == len(FOREIGN) and len(set(warned)) == len(FOREIGN)
    assert "tensorboard: accepted, but no effect on this build" in "\n".join(warned)
    assert "Prometheus" in dict(config.no_effect())["wandb"]


def test_a_misspelled_deepspeed_key_is_still_an_error_with_did_you_mean():
    with pytest.raises(ConfigError) as err:
        Config.load({"tensorbaord": {"enabled": True}, "zero_optimization": {"round_robin_gradient": True}})
    text = str(err.value)
    assert "did you mean 'tensorboard'?" in text and "did you mean 'round_robin_gradients'?" in text


def test_every_foreign_key_is_documented():
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    assert [k for k in FOREIGN if f"`{k}`" not in doc] == []

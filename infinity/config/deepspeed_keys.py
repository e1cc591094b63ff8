"""DeepSpeed keys that have no effect here, each with why and what infinity offers instead.

A key of DeepSpeed 0.19.8's configuration (its config-json documentation and the pydantic models of
deepspeed/runtime/zero/config.py, precision_config.py and monitor/config.py) that infinity does not
read is accepted and named in one warning of its own when the config loads (Config.load), so that a
DeepSpeed user's config loads unchanged.  An entry that names a block takes the whole block, whatever
it holds.  A key in neither the schema nor this table stays an error with "did you mean".
"""
from __future__ import annotations

_MONITOR = "DeepSpeed's monitor; infinity exports its step metrics to Prometheus instead (the prometheus block)"
_COMM = "DeepSpeed communication knob; infinity reduces each gradient in fp32 once per accumulation window"
_ZERO = "DeepSpeed ZeRO knob that infinity's stage-3 engine has no counterpart for"
_OFFLOAD = "old spelling of the offload blocks; use zero_optimization.offload_param / offload_optimizer"
_QUANT = "infinity does not quantize weights or gradients"
_FEATURE = "a DeepSpeed feature infinity does not have"
_OPTIMIZER = "infinity runs its own optimizer over the offloaded states (the config's optimizer block)"
_PRECISION = "infinity keeps fp32 master weights and optimizer states, and reduces gradients in fp32"

FOREIGN: dict[str, str] = {
    # whole blocks
    "tensorboard": _MONITOR,
    "wandb": _MONITOR,
    "csv_monitor": _MONITOR,
    "comet": _MONITOR,
    "flops_profiler": "use torch.profiler; infinity's step report (steps_per_print) and infinity-train --trace "
                      "show where each step's time went",
    "activation_checkpointing": "checkpoint activations in the model with torch.utils.checkpoint; infinity "
                                "does not partition or offload activations",
    "comms_logger": "infinity counts its collectives in the step report and the Prometheus metrics",
    "autotuning": "tune the aio block with infinity-bench",
    "elasticity": _FEATURE,
    "compression_training": _FEATURE,
    "data_efficiency": _FEATURE,
    "curriculum_learning": _FEATURE,
    "sparse_attention": _FEATURE,
    "pipeline": "infinity has no pipeline parallelism",
    "amp": "use bf16 or fp16 blocks; infinity does not use apex",
    "nebula": "infinity writes its own durable checkpoints (checkpoint block)",
    "hybrid_engine": _FEATURE,
    "tensor_parallel": "infinity has no tensor parallelism",
    "weight_quantization": _QUANT,
    "quantize_training": _QUANT,
    "eigenvalue": _FEATURE,
    "progressive_layer_drop": _FEATURE,
    "compile": "compile the model with torch.compile yourself",
    "data_types": _PRECISION,
    "torch_autocast": "use the bf16 or fp16 block",
    "timers": "infinity's step report gives the step's timings",
    "zero_optimization.zenflow": _FEATURE,
    "zero_optimization.leaf_module": _ZERO,
    # top-level keys
    "zero_allow_untested_optimizer": _OPTIMIZER,
    "zero_force_ds_cpu_optimizer": _OPTIMIZER,
    "communication_data_type": _COMM,
    "seq_parallel_communication_data_type": _COMM,
    "prescale_gradients": _COMM,
    "gradient_predivide_factor": _COMM,
    "sparse_gradients": _COMM,
    "disable_allgather": _COMM,
    "memory_breakdown": "engine.memory_report() gives host, pinned and NVMe bytes",
    "dump_state": "infinity-config check prints the resolved config",
    "dataloader_drop_last": "initialize's data loader keeps the last batch; pass your own loader to drop it",
    "graph_harvesting": _FEATURE,
    "use_data_before_expert_parallelism": _FEATURE,
    "disable_python_gc": _FEATURE,
    "managed_gradient_accumulation": "infinity always tracks micro-steps: call step() after every backward",
    # nested keys
    "fp16.fp16_master_weights_and_grads": _PRECISION,
    "bf16.immediate_grad_update": "infinity hands each gradient to the optimizer as it is made",
    "bf16.check_grad_overflow": "infinity skips every step whose gradient norm is not finite, in any precision",
    "bf16.bf16_master_weights_and_grads": _PRECISION,
    "bf16.bf16_optimizer_states": _PRECISION,
    "optimizer.legacy_fusion": _OPTIMIZER,
    "zero_optimization.use_multi_rank_bucket_allreduce": _COMM,
    "zero_optimization.compute_grad_norm": "infinity always computes the gradient norm (get_global_grad_norm())",
    "zero_optimization.load_from_fp32_weights": "infinity's checkpoints restore the fp32 master weights",
    "zero_optimization.elastic_checkpoint": "use infinity-consolidate to change the world size of a checkpoint",
    "zero_optimization.offload_optimizer.super_offload": _FEATURE,
    "zero_optimization.offload_optimizer.cpuadam_cores_perc": "torch's intra-op threads run the host update",
    "zero_optimization.cpu_offload": _OFFLOAD,
    "zero_optimization.cpu_offload_param": _OFFLOAD,
    "zero_optimization.cpu_offload_use_pin_memory": _OFFLOAD,
    "zero_optimization.stage3_module_granularity_threshold": _ZERO,
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": _ZERO,
    "zero_optimization.stage3_allgather_sequential": _ZERO,
    "zero_optimization.ignore_unused_parameters": "a parameter without a gradient gets none in infinity's step",
    "zero_optimization.legacy_stage1": _ZERO,
    "zero_optimization.round_robin_gradients": _ZERO,
    "zero_optimization.parameter_alignment": _ZERO,
    "zero_optimization.zero_hpz_partition_size": _ZERO,
    "zero_optimization.mics_shard_size": _ZERO,
    "zero_optimization.mics_hierarchical_params_gather": _ZERO,
    "zero_optimization.zero_quantized_weights": _QUANT,
    "zero_optimization.zero_quantized_nontrainable_weights": _QUANT,
    "zero_optimization.zero_quantized_gradients": _QUANT,
    "zero_optimization.memory_efficient_linear": _ZERO,
    "zero_optimization.pipeline_loading_checkpoint": _ZERO,
    "zero_optimization.override_module_apply": _ZERO,
    "zero_optimization.enable_sanity_checks": _ZERO,
    "zero_optimization.save_muon_momentum_buffer_in_memory": _OPTIMIZER,
}


def foreign(path: str) -> str | None:
    """Why the DeepSpeed key at dotted path has no effect here, or None when it is not one of them."""
    return FOREIGN.get(path)


def names_under(prefix: str) -> list[str]:
    """The foreign keys directly inside the block at prefix ("" for the top level), for "did you mean"."""
    start = f"{prefix}." if prefix else ""
    return [k[len(start):] for k in FOREIGN if k.startswith(start) and "." not in k[len(start):]]

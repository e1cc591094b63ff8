"""What a model will need on each tier (accelerator, host, NVMe) before the user tries.

    rows = infinity.estimate.estimate(ModelSize(2_783_000_000, 65_000_000), Cluster(gpus_per_node=8))
"""
from __future__ import annotations

from dataclasses import dataclass

from infinity.config import Config
from infinity.estimate.sizes import Cluster, ModelSize, build_on_meta, count_module
from infinity.estimate.tiers import (FP32, OPTIMIZER_BYTES, OPTIONS, Basis, Need, Option, Traffic, ZeroInit,
                                    largest_partition, need, optimizer_pipeline, traffic)

__all__ = ["Basis", "Cluster", "Estimate", "ModelSize", "Need", "Option", "Row", "Traffic", "ZeroInit",
           "build_on_meta", "count_module", "estimate"]


MIXED_PRECISION_DEFAULTS = Config.load({"bf16": {"enabled": True}})


@dataclass(frozen=True)
class Row:
    option: Option
    need: Need
    traffic: Traffic | None
    chosen: bool  # the option the given config selects


@dataclass(frozen=True)
class Estimate:
    size: ModelSize
    cluster: Cluster
    rows: tuple[Row, ...]
    notes: tuple[str, ...]


def estimate(size: ModelSize, cluster: Cluster, config: Config | None = None,
             step_seconds: float | None = None) -> Estimate:
    """One row per offload option.  `config` supplies the NVMe settings (buffer pools, max_in_cpu,
    sub_group_size, accumulation steps, precision) and marks its own option; without it the defaults
    are used, in mixed precision (2-byte parameters) as DeepSpeed's estimator assumes."""
    chosen_config = config
    config = config or MIXED_PRECISION_DEFAULTS
    rows = tuple(Row(option, need(option, size, cluster, config),
                     traffic(option, size, cluster, config, step_seconds) if step_seconds else None,
                     chosen_config is not None and option.matches(chosen_config)) for option in OPTIONS)
    return Estimate(size, cluster, rows, tuple(_notes(size, cluster, config)))


def _notes(size: ModelSize, cluster: Cluster, config: Config) -> list[str]:
    """Settings that would fail with this model, said before the run rather than deep inside a step."""
    notes = []
    buffer_size = config.zero_optimization.offload_param.buffer_size
    largest, what = ((size.largest_param, "largest parameter") if size.largest_param is not None
                     else (size.largest_layer_params, "largest layer (an upper bound on the largest parameter)"))
    partition = -(-largest // cluster.world_size)
    if partition > buffer_size:
        notes.append(f"offload_param.buffer_size {buffer_size} elements is smaller than the partition of the "
                     f"{what}, {partition} elements: parameters on NVMe need buffer_size >= {partition}")
    optimizer = config.zero_optimization.offload_optimizer
    part = -(-size.trained // cluster.world_size)
    depth, group = optimizer_pipeline(config, part, largest_partition(size, cluster))
    pool = optimizer.buffer_count * depth * group * FP32
    if pool > OPTIMIZER_BYTES * part // 4 and pool >= 2 ** 30:  # large, and large next to what it streams
        notes.append(f"with offload_optimizer on nvme, sub-groups of {group} elements make the optimizer pool "
                     f"{pool / 2 ** 30:.2f} GiB per GPU (buffer_count {optimizer.buffer_count} x {depth} in flight "
                     f"x {group} x 4 bytes); a smaller sub_group_size shrinks it, in more and smaller I/O requests")
    return notes

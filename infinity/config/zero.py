"""The `zero_optimization` block: partitioning stage, the stage-3 scheduler, and the offload tiers."""
from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from typing import ClassVar

from infinity.config._schema import Auto, Block, Kind, spec


class OffloadDevice(enum.Enum):
    """Where a partitioned state lives between uses."""

    NONE = "none"  # on the accelerator
    CPU = "cpu"  # in host memory (pinned when pin_memory)
    NVME = "nvme"  # in swap files under nvme_path, streamed through pinned buffer pools


# Adam and AdamW swap four tensors per sub-group: fp32 parameter, gradient, exp_avg, exp_avg_sq.
ADAM_SWAPPED_STATES = 4


@dataclass(frozen=True)
class OffloadParamConfig(Block):
    """`zero_optimization.offload_param`: where the 16-bit parameter partitions live (stage 3 only)."""

    KEY: ClassVar[str] = "zero_optimization.offload_param"

    device: OffloadDevice = spec(OffloadDevice.NONE, Kind.CHOICE, choices=OffloadDevice)
    nvme_path: str | None = spec(None, Kind.TEXT)
    buffer_count: int = spec(5, Kind.COUNT, at_least=1)
    buffer_size: int = spec(100_000_000, Kind.COUNT, at_least=1)  # ELEMENTS per buffer, not bytes
    max_in_cpu: int = spec(1_000_000_000, Kind.COUNT, at_least=0)  # elements kept in host memory
    pin_memory: bool = spec(True, Kind.BOOL)


@dataclass(frozen=True)
class OffloadOptimizerConfig(Block):
    """`zero_optimization.offload_optimizer`: where fp32 master weights and Adam moments live.

    [Note: buffer_count counts buffers per sub-group in flight and must cover the tensors the
    optimizer swaps per sub-group (4 for Adam).  The pipeline keeps 1 + pipeline_read +
    pipeline_write sub-groups in flight, never more than there are, so the pool holds
    buffer_count × min(pipeline_depth, sub-groups) buffers of the largest sub-group
    (infinity/swap/optimizer.py's pool_buffers).  DeepSpeed shares buffer_count between the stages and fails
    mid-step ("Not enough buffers"); here the Transformers example's 4 works with both pipelines.]
    """

    KEY: ClassVar[str] = "zero_optimization.offload_optimizer"

    device: OffloadDevice = spec(OffloadDevice.NONE, Kind.CHOICE, choices=OffloadDevice)
    nvme_path: str | None = spec(None, Kind.TEXT)
    buffer_count: int = spec(ADAM_SWAPPED_STATES, Kind.COUNT, at_least=1)
    pin_memory: bool = spec(True, Kind.BOOL)
    pipeline_read: bool = spec(True, Kind.BOOL)
    pipeline_write: bool = spec(True, Kind.BOOL)
    fast_init: bool = spec(False, Kind.BOOL)
    ratio: float = spec(1.0, Kind.NUMBER, at_least=0.0, at_most=1.0)

    @property
    def pipeline_depth(self) -> int:
        """Sub-groups in flight at once: the one being updated, plus the next read and the last written."""
        return 1 + int(self.pipeline_read) + int(self.pipeline_write)


@dataclass(frozen=True)
class ZeroConfig(Block):
    """`zero_optimization`.  Field names keep DeepSpeed's spelling so the JSON round-trips."""

    KEY: ClassVar[str] = "zero_optimization"

    stage: int = spec(0, Kind.COUNT, at_least=0, at_most=3)
    sub_group_size: int = spec(1_000_000_000, Kind.COUNT, at_least=1)
    stage3_prefetch_bucket_size: int | Auto = spec(
        50_000_000, Kind.COUNT, at_least=0, auto="hidden_size", aliases=("prefetch_bucket_size",))
    stage3_param_persistence_threshold: int | Auto = spec(
        100_000, Kind.COUNT, at_least=0, auto="hidden_size", aliases=("param_persistence_threshold",))
    stage3_model_persistence_threshold: int = spec(
        sys.maxsize, Kind.COUNT, at_least=0, aliases=("model_persistence_threshold",))
    stage3_max_live_parameters: int = spec(1_000_000_000, Kind.COUNT, at_least=0, aliases=("max_live_parameters",))
    stage3_max_reuse_distance: int = spec(1_000_000_000, Kind.COUNT, at_least=0, aliases=("max_reuse_distance",))
    stage3_gather_16bit_weights_on_model_save: bool = spec(
        False, Kind.BOOL, aliases=("stage3_gather_fp16_weights_on_model_save", "gather_16bit_weights_on_model_save"))
    log_trace_cache_warnings: bool = spec(False, Kind.BOOL)
    overlap_comm: bool = spec(False, Kind.BOOL)
    contiguous_gradients: bool = spec(True, Kind.BOOL)
    reduce_scatter: bool = spec(True, Kind.BOOL)
    allgather_partitions: bool = spec(True, Kind.BOOL)
    reduce_bucket_size: int | Auto = spec(500_000_000, Kind.COUNT, above=0, auto="hidden_size")
    allgather_bucket_size: int = spec(500_000_000, Kind.COUNT, at_least=0)
    offload_param: OffloadParamConfig = spec(OffloadParamConfig, Kind.BLOCK, block=OffloadParamConfig)
    offload_optimizer: OffloadOptimizerConfig = spec(OffloadOptimizerConfig, Kind.BLOCK, block=OffloadOptimizerConfig)

    @property
    def uses_nvme(self) -> bool:
        return OffloadDevice.NVME in (self.offload_param.device, self.offload_optimizer.device)

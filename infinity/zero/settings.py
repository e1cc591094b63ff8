"""What the engine needs to know, as one frozen object (built from a Config by infinity.zero.from_config)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from infinity.config.aio import AioConfig
from infinity.config.training import Precision
from infinity.swap.optimizer import AdamSettings, Pipeline
from infinity.swap.params import Tier
from infinity.zero.loss_scale import LossScaleSettings
from infinity.zero.schedule import LrSchedule


DTYPES = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def dtype_of(precision: Precision) -> torch.dtype:
    """The dtype of parameters and gradients on the compute tier."""
    return DTYPES[precision]


@dataclass(frozen=True)
class EngineSettings:
    param_tier: Tier = Tier.COMPUTE
    optimizer_tier: Tier = Tier.COMPUTE
    param_nvme_path: str | None = None
    optimizer_nvme_path: str | None = None
    param_buffer_count: int = 5
    param_buffer_size: int = 100_000_000  # elements, as DeepSpeed counts them
    optimizer_buffer_count: int = 4
    pin_memory: bool = True
    sub_group_size: int = 1_000_000_000
    pipeline: Pipeline = field(default_factory=Pipeline)
    aio: AioConfig = field(default_factory=AioConfig)
    precision: Precision = Precision.FP32
    adam: AdamSettings = field(default_factory=AdamSettings)
    schedule: LrSchedule | None = None  # None: adam.lr throughout
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 0.0
    loss_scale: LossScaleSettings = field(default_factory=LossScaleSettings)
    persistence_threshold: int = 0  # parameters of at most this many elements stay on the compute tier
    param_max_in_cpu: int = 0  # parameter elements on NVMe that also keep a host copy (offload_param.max_in_cpu)
    rank: int = 0

"""What the engine needs to know, as one frozen object (built from a Config by infinity.zero.from_config)."""
from __future__ import annotations

import enum
import logging
import sys
from dataclasses import dataclass, field

import torch

from infinity.config.aio import AioConfig
from infinity.config.rules import missing_nvme_path
from infinity.config.training import Precision
from infinity.memory.integrity import Integrity
from infinity.schedule import Budgets
from infinity.swap.optimizer import AdamSettings, Pipeline
from infinity.swap.params import Tier
from infinity.swap.rules import OptimizerKind
from infinity.zero.loss_scale import LossScaleSettings
from infinity.zero.lr_schedule import LrSchedule
from infinity.errors import ConfigError

log = logging.getLogger("infinity.zero")


DTYPES = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def dtype_of(precision: Precision) -> torch.dtype:
    """The dtype of parameters and gradients on the compute tier."""
    return DTYPES[precision]


# [Note: half precision on a CPU without it]  torch's CPU matrix products in bf16 or fp16 run through fast
# kernels only where the CPU has native instructions for that format; elsewhere they fall back to a
# reference loop.  Measured (torch 2.13, a (1024 x 8192) @ (8192 x 512) product): on an AMD EPYC with AVX2,
# 9.3 s in bf16 against 0.10 s in fp32; on an AMD EPYC with AVX-512 and AVX512-BF16, 0.029 s in bf16,
# 0.058 s in fp32 and 7.75 s in fp16.  torch's capability string says "AVX512" on that second CPU either
# way, so the instructions are asked for one by one (`cpu_features`).  The run is correct, only ~100x
# slower, so say so once.
NATIVE = {"bf16": ("avx512_bf16", "amx_tile"), "fp16": ("amx_fp16",)}  # CPU features with fast GEMMs
NATIVE_HALF = ("AVX512_BF16", "AMX")  # torch.backends.cpu.get_cpu_capability() values with fast 16-bit GEMMs
_warned_half: set[str] = set()
# torch.cpu's feature checks (private, present in torch 2.13); a missing one counts as absent
_CHECKS = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
           "amx_fp16": "_is_amx_fp16_supported"}


def cpu_features() -> frozenset[str]:
    """The 16-bit matrix-product features this CPU has, as torch detects them (NATIVE's names)."""
    return frozenset(name for name, check in _CHECKS.items() if getattr(torch.cpu, check, lambda: False)())


def slow_half_precision(precision: Precision, device: torch.device, capability: str,
                        features: frozenset[str] = frozenset()) -> str | None:
    """The warning for 16-bit compute on a CPU with no native products in that format, or None."""
    if precision is Precision.FP32 or device.type != "cpu":
        return None
    key = precision.value
    if any(f in features for f in NATIVE[key]) or (key == "bf16" and any(c in capability for c in NATIVE_HALF)):
        return None
    return (f"{key} compute on this CPU (torch capability {capability}, no native {key} matrix products) runs "
            f"its matrix products about 100x slower than fp32; for CPU training here set {key}.enabled false "
            f"(fp32), or train on a CPU with {'AVX512-BF16/AMX' if key == 'bf16' else 'AMX-FP16'} or a GPU")


def warn_slow_half_precision(precision: Precision, device: torch.device) -> None:
    """Logs slow_half_precision's warning once per process and precision."""
    message = slow_half_precision(precision, device, torch.backends.cpu.get_cpu_capability(), cpu_features())
    if message is not None and precision.value not in _warned_half:
        _warned_half.add(precision.value)
        log.warning("%s", message)


class NonFinite(enum.Enum):
    """What a NaN or infinite loss or gradient norm does (stop_on_nonfinite)."""

    WARN = "warn"  # a warning naming the step, the step report and a metric; the run goes on
    STOP = "stop"  # the same, then NonFiniteError: the run stops


class ModelSave(enum.Enum):
    """What engine.save_16bit_model does (zero_optimization.stage3_gather_16bit_weights_on_model_save)."""

    GATHER = "gather"  # gathers each parameter whole, one at a time, and streams the file (rank 0 writes)
    SKIP = "skip"  # writes nothing, warns and returns False: DeepSpeed's answer under stage 3 with the key off


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
    adam: AdamSettings = field(default_factory=AdamSettings)  # the config's optimizer.params (lr, betas, ...)
    optimizer_kind: OptimizerKind = OptimizerKind.ADAM  # the config's optimizer.type (Adam/AdamW: adam.decoupled)
    schedule: LrSchedule | None = None  # None: adam.lr throughout
    gradient_accumulation_steps: int = 1
    train_batch_size: int | None = None  # None: micro_batch_size × gradient_accumulation_steps × world
    micro_batch_size: int = 1  # train_micro_batch_size_per_gpu
    gradient_clipping: float = 0.0
    loss_scale: LossScaleSettings = field(default_factory=LossScaleSettings)
    persistence_threshold: int = 0  # parameters of at most this many elements stay on the compute tier
    model_persistence_threshold: int = sys.maxsize  # ... until they total this many elements
    prefetch_bucket_size: int = 50_000_000  # elements read ahead along the trace; 0: fetch on demand only
    max_live_parameters: int = 1_000_000_000  # elements of offloaded parameters on the compute tier at once
    max_reuse_distance: int = 1_000_000_000  # keep a parameter used again within this many elements
    report_every: int = 10  # log the step report every this many steps (steps_per_print; 1: wall_clock_breakdown)
    param_max_in_cpu: int = 0  # parameter elements on NVMe that also keep a host copy (offload_param.max_in_cpu)
    rank: int = 0
    model_save: ModelSave = ModelSave.GATHER
    integrity: Integrity = Integrity.NONE  # swap_checksum: crc32c of every swap write, checked at each read
    nonfinite: NonFinite = NonFinite.WARN  # stop_on_nonfinite: what a NaN or infinite loss or gradient norm does

    def __post_init__(self) -> None:
        """Settings built by hand get config/rules.py's nvme_path rule too (from_config's already passed it)."""
        problems = [p for p in (missing_nvme_path("offload_param", self.param_tier is Tier.NVME, self.param_nvme_path),
                                missing_nvme_path("offload_optimizer", self.optimizer_tier is Tier.NVME,
                                                  self.optimizer_nvme_path)) if p is not None]
        if problems:
            raise ConfigError(problems)


def budgets_of(settings: EngineSettings) -> Budgets:
    """The stage-3 planner's budgets (infinity/schedule), from the settings."""
    return Budgets(prefetch_elements=settings.prefetch_bucket_size, max_live_elements=settings.max_live_parameters,
                   max_reuse_distance=settings.max_reuse_distance, persistence_threshold=settings.persistence_threshold,
                   model_persistence_threshold=settings.model_persistence_threshold)

"""The training blocks: fp16/bf16, optimizer, scheduler, checkpoint."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from infinity.config._schema import Auto, Block, Kind, spec


class Precision(enum.Enum):
    """The 16-bit format of parameters and gradients on the compute tier."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


@dataclass(frozen=True)
class Fp16Config(Block):
    """`fp16`: half precision with a loss scaler (loss_scale 0 means dynamic)."""

    KEY: ClassVar[str] = "fp16"

    enabled: bool | Auto = spec(False, Kind.BOOL, auto="precision")
    auto_cast: bool = spec(False, Kind.BOOL)
    loss_scale: float = spec(0.0, Kind.NUMBER, at_least=0.0)
    initial_scale_power: int = spec(16, Kind.COUNT, at_least=0, at_most=64)
    loss_scale_window: int = spec(1000, Kind.COUNT, at_least=1)
    hysteresis: int = spec(2, Kind.COUNT, at_least=1)
    consecutive_hysteresis: bool = spec(False, Kind.BOOL)
    min_loss_scale: float = spec(1.0, Kind.NUMBER, above=0.0)


@dataclass(frozen=True)
class Bf16Config(Block):
    """`bf16`: bfloat16, no loss scaling."""

    KEY: ClassVar[str] = "bf16"

    enabled: bool | Auto = spec(False, Kind.BOOL, auto="precision")


class OptimizerType(enum.Enum):
    """Optimizers whose states the optimizer swapper knows how to stream (DeepSpeed's CPU optimizers)."""

    ADAM = "Adam"
    ADAMW = "AdamW"
    LION = "Lion"  # DeepSpeed's CPU Lion (params: lr, betas, weight_decay)
    ADAGRAD = "Adagrad"  # torch's Adagrad, as DeepSpeed's CPU Adagrad (params: lr, eps, weight_decay)


@dataclass(frozen=True)
class AdamParams(Block):
    """`optimizer.params` for Adam and AdamW (Lion reads lr, betas and weight_decay; Adagrad lr, eps and
    weight_decay)."""

    KEY: ClassVar[str] = "optimizer.params"

    lr: float | Auto = spec(1e-3, Kind.NUMBER, above=0.0, auto="learning_rate")
    betas: tuple[float, float] | Auto = spec((0.9, 0.999), Kind.PAIR, at_least=0.0, below=1.0,
                                            auto="adam_beta1, adam_beta2")
    eps: float | Auto = spec(1e-8, Kind.NUMBER, above=0.0, auto="adam_epsilon")
    weight_decay: float | Auto = spec(0.0, Kind.NUMBER, at_least=0.0, auto="weight_decay")
    bias_correction: bool = spec(True, Kind.BOOL)
    adam_w_mode: bool = spec(True, Kind.BOOL)  # DeepSpeed: type Adam with this true decays weights as AdamW
    torch_adam: bool = spec(False, Kind.BOOL)


@dataclass(frozen=True)
class OptimizerConfig(Block):
    KEY: ClassVar[str] = "optimizer"

    type: OptimizerType = spec(OptimizerType.ADAMW, Kind.CHOICE, choices=OptimizerType)
    params: AdamParams = spec(AdamParams, Kind.BLOCK, block=AdamParams)

    @property
    def decoupled_weight_decay(self) -> bool:
        return self.type is OptimizerType.ADAMW or self.params.adam_w_mode


class SchedulerType(enum.Enum):
    WARMUP_LR = "WarmupLR"
    WARMUP_DECAY_LR = "WarmupDecayLR"
    WARMUP_COSINE_LR = "WarmupCosineLR"


class WarmupType(enum.Enum):
    LOG = "log"
    LINEAR = "linear"


@dataclass(frozen=True)
class SchedulerParams(Block):
    """`scheduler.params`: the union of the three schedulers' keys; `rules` checks which type takes which."""

    KEY: ClassVar[str] = "scheduler.params"

    warmup_min_lr: float | Auto | None = spec(None, Kind.NUMBER, at_least=0.0, auto="warmup_min_lr")
    warmup_max_lr: float | Auto | None = spec(None, Kind.NUMBER, at_least=0.0, auto="learning_rate")
    warmup_num_steps: int | Auto | None = spec(None, Kind.COUNT, at_least=0, auto="warmup_steps")
    warmup_type: WarmupType | None = spec(None, Kind.CHOICE, choices=WarmupType)
    total_num_steps: int | Auto | None = spec(None, Kind.COUNT, at_least=1, auto="max_steps")
    warmup_min_ratio: float | None = spec(None, Kind.NUMBER, at_least=0.0, at_most=1.0)
    cos_min_ratio: float | None = spec(None, Kind.NUMBER, at_least=0.0, at_most=1.0)
    last_batch_iteration: int | None = spec(None, Kind.COUNT, at_least=-1)


# Which scheduler.params keys each scheduler takes, and which of those it cannot do without.
SCHEDULER_KEYS: dict[SchedulerType, tuple[frozenset[str], frozenset[str]]] = {
    SchedulerType.WARMUP_LR: (frozenset({"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                                         "last_batch_iteration"}), frozenset()),
    SchedulerType.WARMUP_DECAY_LR: (frozenset({"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                                               "last_batch_iteration", "total_num_steps"}),
                                    frozenset({"total_num_steps"})),
    SchedulerType.WARMUP_COSINE_LR: (frozenset({"warmup_min_ratio", "warmup_num_steps", "warmup_type",
                                                "last_batch_iteration", "total_num_steps", "cos_min_ratio"}),
                                     frozenset({"total_num_steps"})),
}


@dataclass(frozen=True)
class SchedulerConfig(Block):
    KEY: ClassVar[str] = "scheduler"

    type: SchedulerType = spec(SchedulerType.WARMUP_LR, Kind.CHOICE, choices=SchedulerType)
    params: SchedulerParams = spec(SchedulerParams, Kind.BLOCK, block=SchedulerParams)


class TagValidation(enum.Enum):
    """What to do when ranks disagree on a checkpoint tag."""

    IGNORE = "Ignore"
    WARN = "Warn"
    FAIL = "Fail"


@dataclass(frozen=True)
class ParallelWriteConfig(Block):
    KEY: ClassVar[str] = "checkpoint.parallel_write"

    pipeline_stage: bool = spec(False, Kind.BOOL)


@dataclass(frozen=True)
class CheckpointConfig(Block):
    KEY: ClassVar[str] = "checkpoint"

    tag_validation: TagValidation = spec(TagValidation.WARN, Kind.CHOICE, choices=TagValidation)
    load_universal: bool = spec(False, Kind.BOOL)
    use_node_local_storage: bool = spec(False, Kind.BOOL)
    parallel_write: ParallelWriteConfig = spec(ParallelWriteConfig, Kind.BLOCK, block=ParallelWriteConfig)


@dataclass(frozen=True)
class PrometheusConfig(Block):
    """`prometheus`: the metrics exporter (infinity's own block; DeepSpeed has none)."""

    KEY: ClassVar[str] = "prometheus"

    enabled: bool = spec(False, Kind.BOOL)
    port: int = spec(9400, Kind.COUNT, at_least=1, at_most=65535)
    bind_address: str = spec("127.0.0.1", Kind.TEXT)
    labels: tuple[tuple[str, str], ...] = spec((), Kind.LABELS)

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)

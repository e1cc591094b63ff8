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


class Unscale(enum.Enum):
    """`fp16.unscale_with`: which scale a step's gradients are divided by (infinity/zero/loss_scale.py)."""

    UPDATED_SCALE = "updated_scale"  # DeepSpeed's: the scale after this step's update (doubled at a growth step)
    STEP_SCALE = "step_scale"  # the scale this step's loss was multiplied with


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
    unscale_with: Unscale = spec(Unscale.UPDATED_SCALE, Kind.CHOICE, choices=Unscale)  # infinity's own key


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
    ONE_CYCLE = "OneCycle"
    LR_RANGE_TEST = "LRRangeTest"


class WarmupType(enum.Enum):
    LOG = "log"
    LINEAR = "linear"


class FirstStep(enum.Enum):
    """`scheduler.first_step`: DeepSpeed's first optimizer step uses the lr its scheduler's constructor set
    and step k the value of iteration k - 1 (the first value spent twice); "schedule": step k uses k's."""

    DEEPSPEED = "deepspeed"
    SCHEDULE = "schedule"


@dataclass(frozen=True)
class SchedulerParams(Block):
    """`scheduler.params`: the union of the five schedulers' keys; `rules` checks which type takes which.
    Defaults left out here are DeepSpeed's constructors' (infinity.zero.from_config)."""

    KEY: ClassVar[str] = "scheduler.params"

    warmup_min_lr: float | Auto | None = spec(None, Kind.NUMBER, at_least=0.0, auto="warmup_min_lr")
    warmup_max_lr: float | Auto | None = spec(None, Kind.NUMBER, at_least=0.0, auto="learning_rate")
    warmup_num_steps: int | Auto | None = spec(None, Kind.COUNT, at_least=0, auto="warmup_steps")
    warmup_type: WarmupType | None = spec(None, Kind.CHOICE, choices=WarmupType)
    total_num_steps: int | Auto | None = spec(None, Kind.COUNT, at_least=1, auto="max_steps")
    warmup_min_ratio: float | None = spec(None, Kind.NUMBER, at_least=0.0, at_most=1.0)
    cos_min_ratio: float | None = spec(None, Kind.NUMBER, at_least=0.0, at_most=1.0)
    last_batch_iteration: int | None = spec(None, Kind.COUNT, at_least=-1)
    cycle_min_lr: float | None = spec(None, Kind.NUMBER, at_least=0.0)
    cycle_max_lr: float | None = spec(None, Kind.NUMBER, at_least=0.0)
    decay_lr_rate: float | None = spec(None, Kind.NUMBER, at_least=0.0)
    cycle_first_step_size: int | None = spec(None, Kind.COUNT, at_least=1)
    cycle_second_step_size: int | None = spec(None, Kind.COUNT, at_least=0)
    cycle_first_stair_count: int | None = spec(None, Kind.COUNT, at_least=0)
    cycle_second_stair_count: int | None = spec(None, Kind.COUNT, at_least=0)
    decay_step_size: int | None = spec(None, Kind.COUNT, at_least=0)
    cycle_momentum: bool | None = spec(None, Kind.BOOL)
    cycle_min_mom: float | None = spec(None, Kind.NUMBER, at_least=0.0, below=1.0)
    cycle_max_mom: float | None = spec(None, Kind.NUMBER, at_least=0.0, below=1.0)
    decay_mom_rate: float | None = spec(None, Kind.NUMBER, at_least=0.0)
    lr_range_test_min_lr: float | None = spec(None, Kind.NUMBER, above=0.0)
    lr_range_test_step_size: int | None = spec(None, Kind.COUNT, at_least=1)
    lr_range_test_step_rate: float | None = spec(None, Kind.NUMBER)
    lr_range_test_staircase: bool | None = spec(None, Kind.BOOL)


_WARMUP = frozenset({"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"})
_CYCLE = frozenset({"cycle_min_lr", "cycle_max_lr", "decay_lr_rate", "cycle_first_step_size", "cycle_second_step_size",
                    "cycle_first_stair_count", "cycle_second_stair_count", "decay_step_size", "cycle_momentum",
                    "cycle_min_mom", "cycle_max_mom", "decay_mom_rate", "last_batch_iteration"})
_RANGE = frozenset({"lr_range_test_min_lr", "lr_range_test_step_size", "lr_range_test_step_rate",
                    "lr_range_test_staircase", "last_batch_iteration"})
# Which scheduler.params keys each scheduler takes, and which of those it cannot do without.
SCHEDULER_KEYS: dict[SchedulerType, tuple[frozenset[str], frozenset[str]]] = {
    SchedulerType.WARMUP_LR: (_WARMUP, frozenset()),
    SchedulerType.WARMUP_DECAY_LR: (_WARMUP | {"total_num_steps"}, frozenset({"total_num_steps"})),
    SchedulerType.WARMUP_COSINE_LR: (frozenset({"warmup_min_ratio", "warmup_num_steps", "warmup_type",
                                                "last_batch_iteration", "total_num_steps", "cos_min_ratio"}),
                                     frozenset({"total_num_steps"})),
    SchedulerType.ONE_CYCLE: (_CYCLE, frozenset({"cycle_min_lr", "cycle_max_lr"})),
    SchedulerType.LR_RANGE_TEST: (_RANGE, frozenset()),
}


@dataclass(frozen=True)
class SchedulerConfig(Block):
    KEY: ClassVar[str] = "scheduler"

    type: SchedulerType = spec(SchedulerType.WARMUP_LR, Kind.CHOICE, choices=SchedulerType)
    params: SchedulerParams = spec(SchedulerParams, Kind.BLOCK, block=SchedulerParams)
    first_step: FirstStep = spec(FirstStep.DEEPSPEED, Kind.CHOICE, choices=FirstStep)


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

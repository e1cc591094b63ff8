"""EngineSettings from a validated Config: the one place that reads the config for the engine."""
from __future__ import annotations

from typing import Any

from infinity.config import Config
from infinity.config.batch import batch_sizes
from infinity.config.training import (OptimizerConfig, OptimizerType, SchedulerConfig, SchedulerParams,
                                      SchedulerType, WarmupType)
from infinity.config.zero import OffloadDevice
from infinity.errors import ConfigError, Problem
from infinity.swap.optimizer import AdamSettings, Pipeline
from infinity.swap.params import Tier
from infinity.swap.rules import OptimizerKind
from infinity.zero.loss_scale import LossScaleSettings
from infinity.zero.lr_schedule import (Curve, LrSchedule, LRRangeTest, OneCycle, Warmup, WarmupCosineLR,
                                      WarmupDecayLR, WarmupLR, warmup_steps)
from infinity.memory.integrity import Integrity
from infinity.zero.ranks import current
from infinity.zero.settings import EngineSettings, ModelSave, NonFinite

TIERS = {OffloadDevice.NONE: Tier.COMPUTE, OffloadDevice.CPU: Tier.HOST, OffloadDevice.NVME: Tier.NVME}

# DeepSpeed's defaults for keys its schedulers take but a config may leave out.
WARMUP_STEPS = 1000
WARMUP_DECAY_MAX_LR = 0.001  # WarmupDecayLR's default warmup_max_lr (WarmupLR's is the optimizer's lr)
COS_MIN_RATIO = 0.0001


def settings_from_config(config: Config, rank: int = 0, world: int | None = None) -> EngineSettings:
    """The engine's settings; a ConfigError when a key is still "auto", no optimizer is named or the batch
    sizes disagree.  world: the data-parallel world size (None: torch.distributed's, 1 without it)."""
    zero = config.zero_optimization
    param, opt = zero.offload_param, zero.offload_optimizer
    adam = _adam(_check_ready(config))
    batches = batch_sizes(config, current().world if world is None else world)
    return EngineSettings(
        param_tier=TIERS[param.device], optimizer_tier=TIERS[opt.device],
        param_nvme_path=param.nvme_path, optimizer_nvme_path=opt.nvme_path,
        param_buffer_count=param.buffer_count, param_buffer_size=param.buffer_size,
        param_max_in_cpu=param.max_in_cpu if param.device is OffloadDevice.NVME else 0,
        optimizer_buffer_count=opt.buffer_count,
        pin_memory=param.pin_memory and opt.pin_memory,
        sub_group_size=zero.sub_group_size,
        pipeline=Pipeline(read=opt.pipeline_read, write=opt.pipeline_write),
        aio=config.aio, precision=config.precision, adam=adam, optimizer_kind=_kind(config.optimizer),
        schedule=_schedule(config.scheduler, adam),
        gradient_accumulation_steps=batches.gradient_accumulation_steps,
        train_batch_size=batches.train_batch_size, micro_batch_size=batches.micro_batch_size,
        gradient_clipping=float(config.gradient_clipping),
        loss_scale=LossScaleSettings(static_scale=config.fp16.loss_scale,
                                     initial_scale_power=config.fp16.initial_scale_power,
                                     window=config.fp16.loss_scale_window, hysteresis=config.fp16.hysteresis,
                                     consecutive_hysteresis=config.fp16.consecutive_hysteresis,
                                     min_scale=config.fp16.min_loss_scale, unscale=config.fp16.unscale_with),
        persistence_threshold=int(zero.stage3_param_persistence_threshold) if zero.stage == 3 else 0,
        model_persistence_threshold=zero.stage3_model_persistence_threshold,
        prefetch_bucket_size=int(zero.stage3_prefetch_bucket_size),
        max_live_parameters=zero.stage3_max_live_parameters, max_reuse_distance=zero.stage3_max_reuse_distance,
        report_every=1 if config.wall_clock_breakdown else config.steps_per_print,
        rank=rank,
        model_save=_model_save(config),
        integrity=Integrity.CRC32C if config.swap_checksum else Integrity.NONE,
        nonfinite=NonFinite.STOP if config.stop_on_nonfinite else NonFinite.WARN,
    )


def _model_save(config: Config) -> ModelSave:
    """DeepSpeed gathers a stage-3 model for save_16bit_model only with the key on; below stage 3 the
    weights are whole anyway."""
    zero = config.zero_optimization
    return ModelSave.GATHER if zero.stage3_gather_16bit_weights_on_model_save or zero.stage != 3 else ModelSave.SKIP


def _check_ready(config: Config) -> OptimizerConfig:
    """The optimizer block, once nothing is left "auto" and an optimizer is named."""
    problems = [Problem(key, 'is still "auto"', "pass training_args=infinity.TrainingArgs(...) to fill it, or "
                        "write the value") for key in config.pending_auto]
    if config.optimizer is None:
        problems.append(Problem("optimizer", "no optimizer is named; infinity steps its own optimizer",
                                'add "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}'))
    if problems or config.optimizer is None:
        raise ConfigError(problems, source="config given to the engine")
    return config.optimizer


def _adam(block: OptimizerConfig) -> AdamSettings:
    p = block.params
    return AdamSettings(lr=float(p.lr), betas=(float(p.betas[0]), float(p.betas[1])),  # type: ignore[index]
                        eps=float(p.eps), weight_decay=float(p.weight_decay),
                        decoupled=block.type is OptimizerType.ADAMW or p.adam_w_mode)


def _kind(block: OptimizerConfig | None) -> OptimizerKind:
    """Adam and AdamW are one kind (AdamSettings.decoupled tells them apart)."""
    if block is None or block.type in (OptimizerType.ADAM, OptimizerType.ADAMW):
        return OptimizerKind.ADAM
    return OptimizerKind(block.type.value)


def _schedule(block: SchedulerConfig | None, adam: AdamSettings) -> LrSchedule | None:
    """The config's schedule, with DeepSpeed's constructor defaults for the keys it leaves out."""
    if block is None:
        return None
    p = block.params
    start = p.last_batch_iteration if p.last_batch_iteration is not None else -1
    return LrSchedule(_curve(block.type, p, adam.lr), base_lr=adam.lr, base_betas=adam.betas,
                      last_batch_iteration=start, first_step=block.first_step)


def _curve(kind: SchedulerType, p: SchedulerParams, lr: float) -> Curve:
    def given(value: Any, default: Any) -> Any:
        return value if value is not None else default

    warmup = Warmup(warmup_steps(int(given(p.warmup_num_steps, WARMUP_STEPS))),
                    given(p.warmup_type, WarmupType.LOG))
    low = float(given(p.warmup_min_lr, 0.0))
    if kind is SchedulerType.WARMUP_LR:  # without warmup_max_lr, DeepSpeed warms up to the optimizer's lr
        return WarmupLR(min_lr=low, max_lr=float(given(p.warmup_max_lr, lr)), warmup=warmup)
    if kind is SchedulerType.WARMUP_DECAY_LR:  # ... but WarmupDecayLR's own default is 0.001
        return WarmupDecayLR(min_lr=low, max_lr=float(given(p.warmup_max_lr, WARMUP_DECAY_MAX_LR)), warmup=warmup,
                             total_steps=int(p.total_num_steps))  # type: ignore[arg-type]
    if kind is SchedulerType.WARMUP_COSINE_LR:
        return WarmupCosineLR(base_lr=lr, total_steps=int(p.total_num_steps),  # type: ignore[arg-type]
                              warmup_min_ratio=given(p.warmup_min_ratio, 0.0),
                              cos_min_ratio=given(p.cos_min_ratio, COS_MIN_RATIO), warmup=warmup)
    if kind is SchedulerType.LR_RANGE_TEST:
        return LRRangeTest(min_lr=given(p.lr_range_test_min_lr, 1e-3), step_size=given(p.lr_range_test_step_size, 2000),
                           step_rate=given(p.lr_range_test_step_rate, 1.0),
                           staircase=given(p.lr_range_test_staircase, False))
    first = float(given(p.cycle_first_step_size, 2000))
    first_stairs = given(p.cycle_first_stair_count, 0)
    return OneCycle(min_lr=float(p.cycle_min_lr), max_lr=float(p.cycle_max_lr),  # type: ignore[arg-type]
                    decay_lr_rate=given(p.decay_lr_rate, 0.0), first_step_size=first,
                    second_step_size=float(given(p.cycle_second_step_size, first)),
                    first_stair_count=first_stairs, second_stair_count=given(p.cycle_second_stair_count, first_stairs),
                    decay_step_size=given(p.decay_step_size, 0), cycle_momentum=given(p.cycle_momentum, True),
                    min_mom=given(p.cycle_min_mom, 0.8), max_mom=given(p.cycle_max_mom, 0.9),
                    decay_mom_rate=given(p.decay_mom_rate, 0.0))

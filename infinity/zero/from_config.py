"""EngineSettings from a validated Config: the one place that reads the config for the engine."""
from __future__ import annotations

from infinity.config import Config
from infinity.config.training import OptimizerConfig, OptimizerType, SchedulerConfig, SchedulerType
from infinity.config.zero import OffloadDevice
from infinity.errors import ConfigError, Problem
from infinity.swap.optimizer import AdamSettings, Pipeline
from infinity.swap.params import Tier
from infinity.zero.loss_scale import LossScaleSettings
from infinity.zero.lr_schedule import Decay, LrSchedule, Warmup
from infinity.memory.integrity import Integrity
from infinity.zero.settings import EngineSettings, ModelSave, NonFinite

TIERS = {OffloadDevice.NONE: Tier.COMPUTE, OffloadDevice.CPU: Tier.HOST, OffloadDevice.NVME: Tier.NVME}

# DeepSpeed's defaults for keys its schedulers take but a config may leave out.
WARMUP_STEPS = 1000
WARMUP_MAX_LR = 0.001  # WarmupLR and WarmupDecayLR set the lr themselves; they do not read optimizer.params.lr
COS_MIN_RATIO = 0.0001


def settings_from_config(config: Config, rank: int = 0) -> EngineSettings:
    """The engine's settings; a ConfigError when a key is still "auto" or no optimizer is named."""
    zero = config.zero_optimization
    param, opt = zero.offload_param, zero.offload_optimizer
    adam = _adam(_check_ready(config))
    return EngineSettings(
        param_tier=TIERS[param.device], optimizer_tier=TIERS[opt.device],
        param_nvme_path=param.nvme_path, optimizer_nvme_path=opt.nvme_path,
        param_buffer_count=param.buffer_count, param_buffer_size=param.buffer_size,
        param_max_in_cpu=param.max_in_cpu if param.device is OffloadDevice.NVME else 0,
        optimizer_buffer_count=opt.buffer_count,
        pin_memory=param.pin_memory and opt.pin_memory,
        sub_group_size=zero.sub_group_size,
        pipeline=Pipeline(read=opt.pipeline_read, write=opt.pipeline_write),
        aio=config.aio, precision=config.precision, adam=adam,
        schedule=_schedule(config.scheduler, adam.lr),
        gradient_accumulation_steps=int(config.gradient_accumulation_steps),
        gradient_clipping=float(config.gradient_clipping),
        loss_scale=LossScaleSettings(static_scale=config.fp16.loss_scale,
                                     initial_scale_power=config.fp16.initial_scale_power,
                                     window=config.fp16.loss_scale_window, hysteresis=config.fp16.hysteresis,
                                     min_scale=config.fp16.min_loss_scale),
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


def _schedule(block: SchedulerConfig | None, lr: float) -> LrSchedule | None:
    if block is None:
        return None
    p = block.params
    warmup = Warmup(p.warmup_type.value) if p.warmup_type is not None else Warmup.LOG
    steps = int(p.warmup_num_steps) if p.warmup_num_steps is not None else WARMUP_STEPS
    total = int(p.total_num_steps) if p.total_num_steps is not None else None
    if block.type is SchedulerType.WARMUP_COSINE_LR:
        low = p.warmup_min_ratio if p.warmup_min_ratio is not None else 0.0
        floor = p.cos_min_ratio if p.cos_min_ratio is not None else COS_MIN_RATIO
        return LrSchedule(max_lr=lr, min_lr=lr * low, warmup_steps=steps, warmup=warmup, total_steps=total,
                          decay=Decay.COSINE, floor_lr=lr * floor)
    decay = Decay.LINEAR if block.type is SchedulerType.WARMUP_DECAY_LR else Decay.NONE
    high = float(p.warmup_max_lr) if p.warmup_max_lr is not None else WARMUP_MAX_LR
    low = float(p.warmup_min_lr) if p.warmup_min_lr is not None else 0.0
    return LrSchedule(max_lr=high, min_lr=low, warmup_steps=steps, warmup=warmup, total_steps=total, decay=decay)


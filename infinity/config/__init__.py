"""DeepSpeed-style configuration as frozen, validated dataclasses.

    config = infinity.Config.load("ds_config.json", args=TrainingArgs(learning_rate=3e-5, hidden_size=4096, ...))
"""
from infinity.config._schema import AUTO, Source
from infinity.config._values import Problems, as_count
from infinity.config.aio import DIRECT_ALIGNMENT, AioConfig, Backend, parse_aio
from infinity.config.auto import TrainingArgs
from infinity.config.config import Config
from infinity.config.training import (AdamParams, Bf16Config, CheckpointConfig, Fp16Config, OptimizerConfig,
                                      OptimizerType, Precision, PrometheusConfig, SchedulerConfig, SchedulerType)
from infinity.config.zero import OffloadDevice, OffloadOptimizerConfig, OffloadParamConfig, ZeroConfig

__all__ = [
    "AUTO", "AdamParams", "AioConfig", "Backend", "Bf16Config", "CheckpointConfig", "Config", "DIRECT_ALIGNMENT",
    "Fp16Config", "OffloadDevice", "OffloadOptimizerConfig", "OffloadParamConfig", "OptimizerConfig",
    "OptimizerType", "Precision", "PrometheusConfig", "SchedulerConfig", "SchedulerType", "Source", "TrainingArgs",
    "ZeroConfig", "Problems", "as_count", "parse_aio",
]

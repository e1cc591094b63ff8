"""infinity: ZeRO-Infinity NVMe offload for PyTorch.

The public API lives here; everything else is reached through its subpackages.
"""
from typing import Any

from infinity.config import Config
from infinity.config.auto import TrainingArgs
from infinity.config.aio import AioConfig, Backend
from infinity.errors import (
    AioError,
    AlignmentError,
    CapacityError,
    CheckpointError,
    ConfigError,
    EngineFailed,
    ExternalParameterError,
    InfinityError,
    LossScaleAtMinimum,
    NativeUnavailable,
    NonFiniteError,
    NvmePathError,
    RankFailed,
    ShortTransferError,
    SwapChecksumError,
    UsageError,
)
from infinity.exporter import ExporterError, MetricsPortInUse

__version__ = "0.1.0"

__all__ = [
    "AioConfig", "AioError", "AlignmentError", "Backend", "CapacityError", "CheckpointError", "Config", "ConfigError",
    "EngineFailed", "ExporterError", "ExternalParameterError", "InfinityError", "LossScaleAtMinimum", "MetricsPortInUse", "NativeUnavailable", "NvmePathError",
    "ShortTransferError", "TrainingArgs", "UsageError", "RankFailed", "NonFiniteError", "SwapChecksumError", "__version__", "init_distributed",
    "initialize", "zero",
]


def __getattr__(name: str) -> Any:
    """initialize and zero import torch; the config and bench tools do without it, so they load lazily."""
    if name == "initialize":
        from infinity.zero.initialize import initialize
        return initialize
    if name == "init_distributed":
        from infinity.zero.ranks import init_distributed
        return init_distributed
    if name == "zero":
        import infinity.zero as zero
        return zero
    raise AttributeError(f"module 'infinity' has no attribute {name!r}")

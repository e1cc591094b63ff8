"""infinity: ZeRO-Infinity NVMe offload for PyTorch.

The public API lives here; everything else is reached through its subpackages.
"""
from infinity.config import Config
from infinity.config.aio import AioConfig, Backend
from infinity.errors import (
    AioError,
    AlignmentError,
    CapacityError,
    ConfigError,
    InfinityError,
    NativeUnavailable,
    NvmePathError,
    ShortTransferError,
)

__version__ = "0.1.0"

__all__ = [
    "AioConfig", "AioError", "AlignmentError", "Backend", "CapacityError", "Config", "ConfigError", "InfinityError",
    "NativeUnavailable", "NvmePathError", "ShortTransferError", "__version__",
]

"""DeepSpeed-style configuration as frozen, validated dataclasses."""
from infinity.config.aio import DIRECT_ALIGNMENT, AioConfig, Backend, parse_aio

__all__ = ["AioConfig", "Backend", "DIRECT_ALIGNMENT", "parse_aio"]

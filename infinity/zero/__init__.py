"""ZeRO stage 3 on one process: the engine, its settings and its hooks."""
from infinity.zero.engine import Engine, UsageError
from infinity.zero.settings import EngineSettings, Precision

__all__ = ["Engine", "EngineSettings", "Precision", "UsageError"]

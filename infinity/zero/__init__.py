"""ZeRO stage 3 on one process: the engine, its settings, its hooks, zero.Init and initialize."""
from infinity.errors import UsageError
from infinity.zero.engine import Engine
from infinity.zero.external import register_external_parameter
from infinity.zero.gathered import GatheredParameters
from infinity.zero.init import Init
from infinity.zero.initialize import initialize
from infinity.zero.settings import EngineSettings, NonFinite, Precision

__all__ = ["Engine", "EngineSettings", "GatheredParameters", "Init", "NonFinite", "Precision", "UsageError", "initialize",
           "register_external_parameter"]

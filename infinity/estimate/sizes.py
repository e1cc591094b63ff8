"""What is being estimated: the model's size and the machines it runs on."""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any

from infinity.errors import ConfigError, Problem


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts.  largest_layer_params is the most parameters one module owns directly;
    largest_param, when known (from a model), the biggest single tensor; trained_params those with
    requires_grad (None: all), the only ones with optimizer states (frozen ones live on the param tier)."""

    total_params: int
    largest_layer_params: int
    largest_param: int | None = None
    trained_params: int | None = None

    @property
    def trained(self) -> int:
        """Parameters with optimizer states: trained_params, or all of them."""
        return self.total_params if self.trained_params is None else self.trained_params

    def __post_init__(self) -> None:
        problems = []
        if self.total_params < 1:
            problems.append(Problem("--params", f"must be at least 1, got {self.total_params}", "give N > 0"))
        if not 0 <= self.largest_layer_params <= self.total_params:
            problems.append(Problem("--largest-layer", f"must be between 0 and --params ({self.total_params}), got "
                                    f"{self.largest_layer_params}", "give the parameters of the largest layer"))
        if self.trained_params is not None and not 0 <= self.trained_params <= self.total_params:
            problems.append(Problem("--trained-params", f"must be between 0 and --params ({self.total_params}), "
                                    f"got {self.trained_params}", "give the parameters with requires_grad"))
        if problems:
            raise ConfigError(problems, source="model size")


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int = 1
    nodes: int = 1

    def __post_init__(self) -> None:
        problems = [Problem(f"--{name}", f"must be at least 1, got {value}", f"set --{name} to 1 or more")
                    for name, value in (("num-gpus", self.gpus_per_node), ("num-nodes", self.nodes)) if value < 1]
        if problems:
            raise ConfigError(problems, source="cluster")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


def count_module(module: Any) -> ModelSize:
    """Sizes of an nn.Module.  A parameter shared by several modules is counted once in the total
    (module.parameters() yields it once), and in every layer that owns it, as DeepSpeed does."""
    params = list(module.parameters())
    largest_layer = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    total, trained = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    return ModelSize(total_params=total, largest_layer_params=largest_layer,
                     largest_param=max((p.numel() for p in params), default=0),
                     trained_params=None if trained == total else trained)


def build_on_meta(target: str) -> Any:
    """Calls `module:factory` (the factory may be dotted, such as `pkg.mod:Model.small`) under
    torch's meta device, so that no parameter memory is allocated; returns the nn.Module."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise _model_error(target, "is not module:factory", "write it as my_models:build_llama")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # so a module in the working directory can be named
    try:
        factory: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as err:
        raise _model_error(target, f"cannot be found: {err}", "check the module path and the factory name") from err
    import torch

    with torch.device("meta"):
        model = factory()
    if not isinstance(model, torch.nn.Module):
        raise _model_error(target, f"returned {type(model).__name__}, not an nn.Module", "return the model")
    return model


def _model_error(target: str, message: str, fix: str) -> ConfigError:
    return ConfigError([Problem("--model", f"{target!r} {message}", fix)], source="command line")

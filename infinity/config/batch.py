"""The batch sizes of a config, by DeepSpeed's rules: what the engine and `infinity-config check` both apply."""
from __future__ import annotations

from dataclasses import dataclass

from infinity.config.config import Config
from infinity.config._schema import Source
from infinity.errors import ConfigError, Problem


@dataclass(frozen=True)
class BatchSizes:
    train_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def batch_sizes(config: Config, world: int) -> BatchSizes:
    """DeepSpeed's rules (runtime/config.py, _set_batch_related_parameters): the keys left out are derived
    from those given, and train_batch_size must equal micro × accumulation × world.  Neither
    train_batch_size nor train_micro_batch_size_per_gpu given is a ConfigError, as DeepSpeed refuses it
    ("Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided"); "auto" filled from
    Transformers' arguments counts as given."""
    given = {k: int(getattr(config, k)) for k in BATCH_KEYS  # type: ignore[arg-type]
             if config.sources.get(k, Source.DEFAULT) is not Source.DEFAULT and getattr(config, k) is not None}
    train, micro, gas = (given.get(k) for k in BATCH_KEYS)
    if train is None and micro is None:
        raise ConfigError([Problem("train_micro_batch_size_per_gpu", "neither it nor train_batch_size is given; "
                                   "DeepSpeed refuses such a config too (one of the two is needed)",
                                   'add "train_micro_batch_size_per_gpu": N (the samples each rank takes per '
                                   'micro-step), or "train_batch_size": N (the samples per optimizer step, all '
                                   'ranks together)')], source="batch sizes")
    if train is not None and micro is not None and gas is None:
        gas = max(train // micro // world, 1)
    elif train is not None and micro is None:
        gas = gas or 1
        micro = max(train // world // gas, 1)
    micro, gas = micro or 1, gas or 1
    if train is None:
        train = micro * gas * world
    if train != micro * gas * world:
        raise ConfigError([Problem("train_batch_size", f"{train} is not train_micro_batch_size_per_gpu {micro} × "
                                   f"gradient_accumulation_steps {gas} × world size {world} = {micro * gas * world}",
                                   "make the three agree, or leave one of them out to have it derived "
                                   "(DeepSpeed refuses this config too)")], source="batch sizes")
    return BatchSizes(train, micro, gas)

"""Rules that tie keys of different blocks together, and the keys that are read but change nothing.

Both take the whole Config.  A rule whose keys were already rejected (Source.INVALID) stays
quiet, so one mistake is reported once and not again through its consequences.
"""
from __future__ import annotations

import re
from dataclasses import is_dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from infinity.config._schema import Source, spec_fields, spec_of
from infinity.config.aio import events_problem
from infinity.config.training import SCHEDULER_KEYS, OptimizerType
from infinity.config.zero import ADAM_SWAPPED_STATES, OffloadDevice
from infinity.errors import Problem

if TYPE_CHECKING:
    from infinity.config.config import Config

ZERO = "zero_optimization"
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def check(config: "Config") -> list[Problem]:
    """Every cross-field problem of `config`."""
    return [problem for rule in RULES for problem in rule(config)]


def _rejected(config: "Config", *keys: str) -> bool:
    """Whether any of `keys` (or a key inside one of those blocks) was rejected already."""
    return any(s is Source.INVALID and (k in keys or any(k.startswith(key + ".") for key in keys))
               for k, s in config.sources.items())


def missing_nvme_path(name: str, on_nvme: bool, nvme_path: object) -> Problem | None:
    """The rule that an offload on NVMe names its folder: name is offload_param or offload_optimizer.
    Config checks it here; EngineSettings built by hand (infinity.zero.settings) calls it too."""
    if on_nvme and not nvme_path:
        return Problem(f"{ZERO}.{name}.nvme_path", "device is nvme but no nvme_path is given",
                       f"set {ZERO}.{name}.nvme_path to a folder on the NVMe drive, or device to cpu")
    return None


def _nvme_paths(config: "Config") -> Iterator[Problem]:
    for name in ("offload_param", "offload_optimizer"):
        block, prefix = getattr(config.zero_optimization, name), f"{ZERO}.{name}"
        if _rejected(config, f"{prefix}.device", f"{prefix}.nvme_path"):
            continue
        problem = missing_nvme_path(name, block.device is OffloadDevice.NVME, block.nvme_path)
        if problem is not None:
            yield problem


def _stages(config: "Config") -> Iterator[Problem]:
    zero = config.zero_optimization
    if _rejected(config, f"{ZERO}.stage", f"{ZERO}.offload_param", f"{ZERO}.offload_optimizer"):
        return
    if zero.offload_param.device is not OffloadDevice.NONE and zero.stage != 3:
        yield Problem(f"{ZERO}.offload_param.device",
                      f"parameter offload to {zero.offload_param.device.value} needs stage 3, stage is {zero.stage}",
                      f"set {ZERO}.stage to 3, or offload_param.device to none")
    device = zero.offload_optimizer.device
    if device is OffloadDevice.NVME and zero.stage != 3:
        yield Problem(f"{ZERO}.offload_optimizer.device", f"optimizer offload to nvme needs stage 3, stage is "
                      f"{zero.stage}", f"set {ZERO}.stage to 3, or offload_optimizer.device to cpu")
    elif device is OffloadDevice.CPU and zero.stage == 0:
        yield Problem(f"{ZERO}.offload_optimizer.device", "optimizer offload needs ZeRO stage 1, 2 or 3, stage is 0",
                      f"set {ZERO}.stage to 3, or offload_optimizer.device to none")


def _optimizer_buffers(config: "Config") -> Iterator[Problem]:
    block = config.zero_optimization.offload_optimizer
    if block.device is not OffloadDevice.NVME or block.buffer_count >= ADAM_SWAPPED_STATES:
        return
    if _rejected(config, f"{ZERO}.offload_optimizer"):
        return
    kind = config.optimizer.type.value if config.optimizer else OptimizerType.ADAMW.value
    yield Problem(f"{ZERO}.offload_optimizer.buffer_count",
                  f"{block.buffer_count} buffers cannot hold the {ADAM_SWAPPED_STATES} tensors {kind} swaps per "
                  "sub-group (fp32 parameter, gradient, exp_avg, exp_avg_sq)",
                  f"set buffer_count to {ADAM_SWAPPED_STATES}; the pipeline multiplies it by its depth itself")


def _precision(config: "Config") -> Iterator[Problem]:
    if config.fp16.enabled is True and config.bf16.enabled is True:
        yield Problem("bf16.enabled", "fp16 and bf16 are both enabled", "enable one of them")


def _scheduler(config: "Config") -> Iterator[Problem]:
    if config.scheduler is None or _rejected(config, "scheduler"):
        return
    kind, params = config.scheduler.type, config.scheduler.params
    takes, needs = SCHEDULER_KEYS[kind]
    for name in sorted(vars(params)):
        if getattr(params, name) is not None and name not in takes:
            yield Problem(f"scheduler.params.{name}", f"{kind.value} does not take this key",
                          f"{kind.value} takes {', '.join(sorted(takes))}")
    for name in sorted(needs):
        if getattr(params, name) is None:
            yield Problem(f"scheduler.params.{name}", f"{kind.value} needs this key",
                          f'set scheduler.params.{name} (or "auto" to take it from the training arguments)')


def _prometheus(config: "Config") -> Iterator[Problem]:
    for name, _ in config.prometheus.labels:
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            yield Problem(f"prometheus.labels.{name}", "is not a valid Prometheus label name",
                          "use letters, digits and underscores, not starting with a digit or __")
    if not config.prometheus.bind_address:
        yield Problem("prometheus.bind_address", "is empty", 'use "127.0.0.1", or "0.0.0.0" for every interface')


def _aio_events(config: "Config") -> Iterator[Problem]:
    """The libaio events the engine will take against those the machine has free (aio.events_problem);
    only when something goes to NVMe, since nothing else starts the engine."""
    zero = config.zero_optimization
    on_nvme = OffloadDevice.NVME in (zero.offload_param.device, zero.offload_optimizer.device)
    if on_nvme and not _rejected(config, "aio"):
        problem = events_problem(config.aio)
        if problem is not None:
            yield problem


RULES: tuple[Callable[["Config"], Iterator[Problem]], ...] = (
    _nvme_paths, _stages, _optimizer_buffers, _precision, _scheduler, _prometheus, _aio_events)

_COMMUNICATION = "DeepSpeed communication knob; infinity does not bucket or overlap collectives this way"
_CHECKPOINT = "infinity always writes one durable checkpoint folder per rank"
# Keys read from the file that change nothing on this build, whatever their value.
INERT: dict[str, str] = {
    **{f"{ZERO}.{k}": _COMMUNICATION for k in ("overlap_comm", "contiguous_gradients", "reduce_scatter",
                                               "allgather_partitions", "reduce_bucket_size", "allgather_bucket_size")},
    "optimizer.params.torch_adam": "infinity's optimizer swapper runs its own Adam update",
    "fp16.auto_cast": "inputs reach the model as given: cast floating-point inputs to torch.float16 yourself",
    f"{ZERO}.log_trace_cache_warnings": "infinity always warns once when a step leaves the recorded module order",
    f"{ZERO}.offload_optimizer.fast_init": "infinity has one initialisation path for optimizer states on NVMe",
    "checkpoint.load_universal": _CHECKPOINT,
    "checkpoint.use_node_local_storage": _CHECKPOINT,
    "checkpoint.parallel_write.pipeline_stage": _CHECKPOINT,
}


def no_effect(config: "Config") -> list[tuple[str, str]]:
    """(key, why) for every key given in the file or overrides that changes nothing here."""
    default = type(config)()
    given = {k for k, s in config.sources.items() if s in (Source.FILE, Source.OVERRIDE, Source.AUTO)
             and _value_at(config, k) != _default_at(default, k)}
    found = {k: why for k, why in INERT.items() if k in given}
    found.update(config.foreign)
    zero = config.zero_optimization
    for name in ("offload_param", "offload_optimizer"):
        block = getattr(zero, name)
        prefix = f"{ZERO}.{name}"
        if block.device is not OffloadDevice.NVME:
            for key in ("nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "pipeline_read", "pipeline_write"):
                if f"{prefix}.{key}" in given:
                    found[f"{prefix}.{key}"] = f"used only when {prefix}.device is nvme"
    if f"{ZERO}.offload_optimizer.ratio" in given:
        found[f"{ZERO}.offload_optimizer.ratio"] = "infinity runs the whole optimizer update on the host"
    if zero.stage != 3:
        for key in sorted(given):
            if key.startswith(f"{ZERO}.stage3_"):
                found[key] = "read only with stage 3"
    return sorted(found.items())


def _value_at(block: object, path: str) -> object:
    for key in path.split("."):
        block = getattr(block, key, None)
    return block


def _default_at(default: object, path: str) -> object:
    """The default of the key at path, read from a default Config.
    [Note: optional blocks] `optimizer` and `scheduler` are None in a default Config, so the defaults of
    their keys (optimizer.params.torch_adam: false) are those of a default instance of the block's class;
    reading None there would count every key written at its default as given."""
    block = default
    for key in path.split("."):
        f = next((f for f in spec_fields(block) if f.name == key), None) if is_dataclass(block) else None
        block = getattr(block, key, None)
        if block is None and f is not None and spec_of(f).block is not None:
            block = spec_of(f).block()
    return block

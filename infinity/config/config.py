"""The one frozen config object: `Config.load(path | shipped name | JSON string | dict, overrides=, args=)`."""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, Union

from infinity.config import auto, rules, shipped
from infinity.config._schema import Auto, Block, Kind, Reader, Source, auto_paths, mark_defaults, parse_block, spec
from infinity.config._values import Problems
from infinity.config.aio import THREAD_ALIASES, AioConfig, parse_aio
from infinity.config.auto import TrainingArgs, Unfilled
from infinity.config.training import (Bf16Config, CheckpointConfig, Fp16Config, OptimizerConfig, Precision,
                                      PrometheusConfig, SchedulerConfig)
from infinity.config.zero import ZeroConfig
from infinity.errors import ConfigError, Problem

log = logging.getLogger("infinity.config")

ConfigSource = Union[str, os.PathLike, Mapping[str, Any]]


def _read_aio(raw: Any, path: str, reader: Reader) -> AioConfig:
    """The aio block through its own reader (infinity.config.aio), with provenance recorded."""
    parsed = parse_aio(raw, reader.problems, path)
    if parsed is None:
        mark_defaults(AioConfig, path, reader, Source.INVALID)
        return AioConfig()
    for f in fields(AioConfig):
        names = (f.name, *THREAD_ALIASES) if f.name == "intra_op_parallelism" else (f.name,)
        key = f"{path}.{f.name}"
        reader.sources[key] = reader.given(key) if any(n in raw for n in names) else Source.DEFAULT
    return parsed


@dataclass(frozen=True)
class Config(Block):
    """A whole DeepSpeed-style configuration, validated, every problem reported at once.

    `sources` says where each dotted key's value came from; it is not part of equality.
    """

    KEY: ClassVar[str] = ""

    train_batch_size: int | Auto | None = spec(
        None, Kind.COUNT, at_least=1, auto="per_device_train_batch_size × gradient_accumulation_steps × world_size")
    train_micro_batch_size_per_gpu: int | Auto = spec(1, Kind.COUNT, at_least=1, auto="per_device_train_batch_size")
    gradient_accumulation_steps: int | Auto = spec(1, Kind.COUNT, at_least=1, auto="gradient_accumulation_steps")
    gradient_clipping: float | Auto = spec(1.0, Kind.NUMBER, at_least=0.0, auto="max_grad_norm")  # DeepSpeed's default
    steps_per_print: int = spec(10, Kind.COUNT, at_least=1)
    wall_clock_breakdown: bool = spec(False, Kind.BOOL)
    swap_checksum: bool = spec(False, Kind.BOOL)  # infinity only: crc32c of every swap write, checked at each read
    stop_on_nonfinite: bool = spec(False, Kind.BOOL)  # infinity only: a NaN/inf loss or gradient norm stops the run
    fp16: Fp16Config = spec(Fp16Config, Kind.BLOCK, block=Fp16Config)
    bf16: Bf16Config = spec(Bf16Config, Kind.BLOCK, block=Bf16Config, aliases=("bfloat16",))
    optimizer: OptimizerConfig | None = spec(None, Kind.BLOCK, block=OptimizerConfig)
    scheduler: SchedulerConfig | None = spec(None, Kind.BLOCK, block=SchedulerConfig)
    zero_optimization: ZeroConfig = spec(ZeroConfig, Kind.BLOCK, block=ZeroConfig)
    aio: AioConfig = spec(AioConfig, Kind.BLOCK, block=AioConfig, parse=_read_aio)
    checkpoint: CheckpointConfig = spec(CheckpointConfig, Kind.BLOCK, block=CheckpointConfig)
    prometheus: PrometheusConfig = spec(PrometheusConfig, Kind.BLOCK, block=PrometheusConfig)
    sources: Mapping[str, Source] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)
    # DeepSpeed keys given that have no effect here (infinity/config/deepspeed_keys.py): path -> why.
    foreign: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = rules.check(self)
        if problems:
            raise ConfigError(problems)

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def load(cls, source: ConfigSource, *, overrides: Mapping[str, Any] | None = None,
             args: TrainingArgs | None = None) -> "Config":
        """Reads, validates and (when `args` is given) resolves "auto".  Raises one ConfigError with
        every problem.  Keys that change nothing on this build are logged here, one warning each."""
        data, label = read_source(source)
        hoisting = Problems()
        data = _hoist_nested_aio(data, hoisting)  # before the overrides, so that aio.* reaches it
        overridden = apply_overrides(data, overrides or {}, label)
        config = build(data, label, overridden, problems=hoisting)
        if args is not None:
            config = config.resolve(args)
        for key, why in rules.no_effect(config):  # one warning per key
            log.warning("%s: accepted, but no effect on this build (%s)", key, why)
        return config

    def resolve(self, args: TrainingArgs, unfilled: Unfilled = Unfilled.ERROR) -> "Config":
        """A copy with every "auto" filled from `args`.  An "auto" nothing fills is an error naming
        the key and the argument; a key written out that the arguments give differently is an
        error; a key left at its default takes the arguments' value (see auto.fill_in)."""
        data = self.to_dict()
        by_source = {s: [p for p in auto.FILLERS if self.sources.get(p) is s] for s in Source}
        filled, problems = auto.fill_in(data, self.pending_auto, by_source[Source.DEFAULT], args,
                                         unfilled)
        problems += auto.mismatches(data, by_source[Source.FILE] + by_source[Source.OVERRIDE], args)
        sources = {**self.sources, **{path: Source.AUTO for path in filled}}
        try:
            resolved = build(data, "config", sources=sources, foreign=self.foreign)
        except ConfigError as err:
            problems += list(err.problems)
            resolved = None
        if problems or resolved is None:
            raise ConfigError(problems, source="config resolved from the training arguments")
        return resolved

    # -- reading ----------------------------------------------------------------------------------
    @property
    def pending_auto(self) -> list[str]:
        """Keys still written as "auto"."""
        return auto_paths(self)

    @property
    def precision(self) -> Precision:
        if self.bf16.enabled is True:
            return Precision.BF16
        return Precision.FP16 if self.fp16.enabled is True else Precision.FP32

    def no_effect(self) -> list[tuple[str, str]]:
        return rules.no_effect(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def build(data: Mapping[str, Any], label: str, overridden: frozenset[str] = frozenset(),
          sources: dict[str, Source] | None = None, problems: Problems | None = None,
          foreign: Mapping[str, str] | None = None) -> Config:
    """A Config from a JSON object, or one ConfigError with every problem of it (those already in
    `problems` included): parse problems first, then the cross-field rules (run by Config itself)
    on what did parse."""
    problems = problems if problems is not None else Problems()
    reader = Reader(problems, overridden=overridden)
    try:
        # reader.sources fills in while the parse runs; the Config keeps a read-only view of it.
        seen = MappingProxyType(reader.sources if sources is None else sources)
        config = parse_block(Config, data, "", reader, sources=seen,
                             foreign=MappingProxyType(reader.foreign if foreign is None else dict(foreign)))
    except ConfigError as err:
        problems.items.extend(err.problems)
        config = None
    if problems or config is None:
        raise ConfigError(problems.items, source=label)
    return config


def _hoist_nested_aio(data: dict[str, Any], problems: Problems) -> dict[str, Any]:
    """The Transformers guide writes `aio` inside zero_optimization; DeepSpeed reads it only at
    the top level (recent versions reject it there).  infinity takes it, with a warning."""
    zero = data.get("zero_optimization")
    if not isinstance(zero, Mapping) or "aio" not in zero:
        return data
    zero = dict(zero)
    nested = zero.pop("aio")
    data["zero_optimization"] = zero
    if "aio" in data:
        problems.add("zero_optimization.aio", "an aio block is given both here and at the top level",
                     "keep only the top-level aio block")
    else:
        log.warning("zero_optimization.aio: the aio block belongs at the top level; it was taken as that")
        data["aio"] = nested
    return data


def read_source(source: ConfigSource) -> tuple[dict[str, Any], str]:
    """The JSON object of a dict, a JSON string, a file or a shipped config's name (a path that exists
    wins), and a label naming where it came from."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source)), "dict"
    if isinstance(source, str) and source.lstrip().startswith("{"):
        text, label = source, "JSON string"
    elif (bundled := shipped.find(source)) is not None:
        text, label = bundled.read_text(encoding="utf-8"), f"{os.fspath(source)} (shipped: {bundled})"
    else:
        label = str(source)
        try:
            raw = Path(source).read_bytes()
        except OSError as err:
            raise ConfigError([Problem(label, f"cannot be read: {err.strerror or err}",
                                       "check the path of the config file, or name a shipped config: "
                                       + ", ".join(shipped.names()))], source=label) from err
        text = _utf8(raw, label)
    return _parse_json(text, label), label


def _utf8(raw: bytes, label: str) -> str:
    """A config file's text: JSON files are UTF-8, and anything else is a problem naming the file and byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([Problem(label, f"is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start} "
                                   "cannot start or continue a UTF-8 character); a JSON config is UTF-8",
                                   "save it as UTF-8, or check that the path names the config and not a "
                                   "binary file")], source=label) from None


def _parse_json(text: str, label: str) -> dict[str, Any]:
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as err:
        raise ConfigError([Problem(label, f"is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}",
                                   "JSON takes no comments and no trailing commas")], source=label) from err
    problems = [Problem(key, "is given twice in one object; JSON would keep only the last", "remove one")
                for key in duplicates]
    if not isinstance(data, dict):
        problems.append(Problem(label, f"must hold a JSON object, got {type(data).__name__}", "write {...}"))
    if problems:
        raise ConfigError(problems, source=label)
    return data


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any], label: str) -> frozenset[str]:
    """Sets each dotted key of `overrides` in `data` (in place); returns the keys set."""
    problems = Problems()
    for path, value in overrides.items():
        *parents, last = path.split(".")
        node: Any = data
        for i, key in enumerate(parents):
            node = node.setdefault(key, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                problems.add(path, f"{'.'.join(parents[:i + 1])} is not a block", "override a key inside a block")
                break
        else:
            node[last] = value
    if problems:
        raise ConfigError(problems.items, source=f"overrides of {label}")
    return frozenset(overrides)

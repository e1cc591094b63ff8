"""The machinery every config block shares: field specs, one parser, provenance, and the JSON form.

A block is a frozen dataclass whose fields carry a `Spec` in their metadata (see `spec()`).
`parse_block` reads a JSON object against it, adding every problem to one `Problems` and
recording where each value came from; `block_to_dict` writes the block back in the same spelling.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import operator
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping

from infinity.config.deepspeed_keys import foreign, names_under
from infinity.config._values import Problems, as_bool, as_choice, as_count, as_number, as_text, did_you_mean
from infinity.errors import ConfigError

log = logging.getLogger("infinity.config")


class Auto(enum.Enum):
    """The value of a key written as "auto" and not yet filled from the training arguments."""

    AUTO = "auto"

    def __repr__(self) -> str:
        return "AUTO"


AUTO = Auto.AUTO


class Source(enum.Enum):
    """Where a resolved value came from."""

    FILE = "file"
    DEFAULT = "default"
    AUTO = "auto"  # written as "auto" and filled from the training arguments (or still pending)
    OVERRIDE = "override"  # --set on the command line, or overrides= in Config.load
    INVALID = "invalid"  # the file's value was rejected; only seen while problems are collected


class Kind(enum.Enum):
    COUNT = "count"  # whole number; 1e8 accepted
    NUMBER = "number"  # real number
    BOOL = "bool"  # true/false; "true"/"false" accepted with a warning
    TEXT = "text"
    CHOICE = "choice"  # an enum member, matched on its value without regard to case
    PAIR = "pair"  # two real numbers, such as Adam's betas
    LABELS = "labels"  # {str: str}, kept as sorted pairs so the block stays hashable
    BLOCK = "block"  # a nested block (spec.block)


@dataclass(frozen=True)
class Spec:
    """How one key is read: its kind, its range, what fills "auto", and other spellings."""

    kind: Kind
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    auto: str | None = None  # the TrainingArgs field that fills "auto"; None: "auto" is refused
    choices: type[enum.Enum] | None = None
    block: type | None = None
    aliases: tuple[str, ...] = ()
    parse: Callable[[Any, str, "Reader"], Any] | None = None  # a block with its own reader (aio)


def spec(default: Any, kind: Kind, **kw: Any) -> Any:
    """A dataclass field that carries its Spec; blocks pass their class as `block` and default to it."""
    meta = {"spec": Spec(kind, **kw)}
    if kind is Kind.BLOCK and default is not None:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def spec_of(f: dataclasses.Field) -> Spec:
    return f.metadata["spec"]


def spec_fields(cls_or_block: Any) -> tuple[dataclasses.Field, ...]:
    """The fields that are config keys (a block may carry others, such as Config.sources)."""
    return tuple(f for f in fields(cls_or_block) if "spec" in f.metadata)


class Block:
    """Base of the config blocks: the ranges in the specs are checked on construction too, so a
    block built in code is as safe as one read from JSON.  KEY is the block's dotted key."""

    KEY: ClassVar[str] = ""

    def __post_init__(self) -> None:
        problems = Problems()
        for f in spec_fields(self):
            value, s = getattr(self, f.name), spec_of(f)
            if value is not None and value is not AUTO and s.kind in (Kind.COUNT, Kind.NUMBER, Kind.PAIR):
                check_range(s, value, _join(self.KEY, f.name), problems)
        if problems:
            raise ConfigError(problems.items, source=self.KEY or "config")

    def to_dict(self) -> dict[str, Any]:
        return block_to_dict(self)


@dataclass
class Reader:
    """What one parse collects: problems, provenance of every leaf key, and keys that were given."""

    problems: Problems
    sources: dict[str, Source] = field(default_factory=dict)
    overridden: frozenset[str] = frozenset()
    foreign: dict[str, str] = field(default_factory=dict)  # DeepSpeed keys with no effect here: path -> why

    def given(self, path: str) -> Source:
        return Source.OVERRIDE if path in self.overridden else Source.FILE


def parse_block(cls: type, raw: Any, prefix: str, reader: Reader, **extra: Any) -> Any:
    """An instance of block class `cls` read from `raw`; invalid values fall back to defaults
    (marked Source.INVALID) so that the rest of the config can still be checked.  `extra` goes
    to the constructor as it is."""
    if not isinstance(raw, Mapping):
        reader.problems.add(prefix or "config", f"must be an object, got {raw!r}", "write it as {...}")
        mark_defaults(cls, prefix, reader, Source.INVALID)
        return cls(**extra)
    by_name = {f.name: f for f in spec_fields(cls)}
    by_alias = {a: f.name for f in spec_fields(cls) for a in spec_of(f).aliases}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = _join(prefix, key)
        name = by_alias.get(key, key)
        if name not in by_name:
            why = foreign(path)
            if why is not None:
                reader.foreign[path] = why
            else:
                reader.problems.add(path, "unknown key",
                                    did_you_mean(key, list(by_name) + list(by_alias) + names_under(prefix)))
            continue
        if name != key:
            if name in raw:
                reader.problems.add(path, f"given together with {_join(prefix, name)}, its other spelling",
                                    f"keep only {name}")
                continue
            log.warning("%s is another spelling of %s; it was taken as that", path, _join(prefix, name))
        parsed = _parse_value(by_name[name], value, _join(prefix, name), reader)
        if parsed is not _REJECTED:
            values[name] = parsed
    given = {by_alias.get(k, k) for k in raw}
    for name, f in by_name.items():
        if name not in given:
            _mark_default(f, _join(prefix, name), reader)
    return cls(**values, **extra)


_REJECTED = object()


def _parse_value(f: dataclasses.Field, value: Any, path: str, reader: Reader) -> Any:
    s, problems = spec_of(f), reader.problems
    if s.parse is not None:
        return s.parse(value, path, reader)
    if s.kind is Kind.BLOCK:
        if value is None and f.default is None:
            reader.sources[path] = reader.given(path)
            return None
        return parse_block(s.block, value, path, reader)
    if isinstance(value, str) and value == "auto":
        if s.auto is None:
            problems.add(path, 'does not take "auto"', "write a value")
            reader.sources[path] = Source.INVALID
            return _REJECTED
        reader.sources[path] = Source.AUTO
        return AUTO
    before = len(problems)
    parsed = coerce(s, value, path, problems) if not (value is None and f.default is None) else None
    if len(problems) == before and parsed is not None:
        check_range(s, parsed, path, problems)
    if len(problems) > before:
        reader.sources[path] = Source.INVALID
        return _REJECTED
    reader.sources[path] = reader.given(path)
    return parsed


def coerce(s: Spec, value: Any, path: str, problems: Problems) -> Any:
    """The Python value of a JSON value of kind s.kind, or None with a problem added."""
    readers: dict[Kind, Callable[[], Any]] = {
        Kind.COUNT: lambda: as_count(value, path, problems),
        Kind.NUMBER: lambda: as_number(value, path, problems),
        Kind.BOOL: lambda: as_bool(value, path, problems),
        Kind.TEXT: lambda: as_text(value, path, problems),
        Kind.CHOICE: lambda: as_choice(value, path, problems, s.choices),
        Kind.PAIR: lambda: _as_pair(value, path, problems),
        Kind.LABELS: lambda: _as_labels(value, path, problems),
    }
    return readers[s.kind]()


_BOUNDS = (("at_least", operator.ge, "at least"), ("above", operator.gt, "above"),
           ("at_most", operator.le, "at most"), ("below", operator.lt, "below"))


def check_range(s: Spec, value: Any, path: str, problems: Problems) -> None:
    for number in value if s.kind is Kind.PAIR else (value,):
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            return
        for attr, ok, words in _BOUNDS:
            bound = getattr(s, attr)
            if bound is not None and not ok(number, bound):
                problems.add(path, f"must be {words} {_plain(bound)}, got {_plain(value)}",
                             f"set {path} to a value {words} {_plain(bound)}")
                return


def _as_pair(value: Any, path: str, problems: Problems) -> tuple[float, float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        problems.add(path, f"must be a list of two numbers, got {value!r}", "write it as [0.9, 0.999]")
        return None
    pair = tuple(as_number(v, f"{path}[{i}]", problems) for i, v in enumerate(value))
    return None if None in pair else pair  # type: ignore[return-value]


def _as_labels(value: Any, path: str, problems: Problems) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        problems.add(path, f"must be an object of strings, got {value!r}", 'write it as {"job": "llama"}')
        return None
    return tuple(sorted((str(k), v) for k, v in value.items()))


def _mark_default(f: dataclasses.Field, path: str, reader: Reader) -> None:
    s = spec_of(f)
    if s.kind is Kind.BLOCK and f.default is not None:
        mark_defaults(s.block, path, reader, Source.DEFAULT)
    else:
        reader.sources[path] = Source.DEFAULT


def mark_defaults(cls: type, prefix: str, reader: Reader, source: Source) -> None:
    """Marks every leaf key of block class `cls` (a plain dataclass such as AioConfig included)."""
    for f in spec_fields(cls) or fields(cls):
        s = f.metadata.get("spec")
        if s is not None and s.kind is Kind.BLOCK and f.default is not None:
            mark_defaults(s.block, _join(prefix, f.name), reader, source)
        else:
            reader.sources[_join(prefix, f.name)] = source


def block_to_dict(block: Any) -> dict[str, Any]:
    """The block in its JSON spelling; None values of optional keys are left out."""
    out: dict[str, Any] = {}
    for f in spec_fields(block):
        value = getattr(block, f.name)
        if value is not None:
            out[f.name] = _to_json(spec_of(f), value)
    return out


def _to_json(s: Spec, value: Any) -> Any:
    if value is AUTO:
        return AUTO.value
    if dataclasses.is_dataclass(value):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if s.kind is Kind.LABELS:
        return dict(value)
    if s.kind is Kind.PAIR:
        return list(value)
    return value


def auto_paths(block: Any, prefix: str = "") -> list[str]:
    """Dotted keys of `block` (recursively) that still hold "auto"."""
    found: list[str] = []
    for f in spec_fields(block):
        value, path = getattr(block, f.name), _join(prefix, f.name)
        if value is AUTO:
            found.append(path)
        elif isinstance(value, Block):
            found.extend(auto_paths(value, path))
    return found


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _plain(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)

"""Coercion of JSON values as DeepSpeed users write them: counts as floats (1e8),
booleans as the strings "true"/"false" that DeepSpeed's tuner prints."""
from __future__ import annotations

import enum
import logging
import math
from typing import Any

from infinity.errors import Problem

log = logging.getLogger("infinity.config")

MAX_COUNT = 2 ** 63 - 1
"""The largest whole number a config or a flag may give: int64, the widest that torch's sizes and the native
engine's fields take.  [Note: NaN, infinity and 1e30]  JSON readers turn `NaN` and `Infinity` into floats and
1e400 into infinity; none is a count or a rate, and a finite count past int64 would fail deep inside torch
or the C side as an OverflowError.  So each is a problem here, naming the key."""


class Problems:
    """Collects every problem of one config so they are all reported together."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, key: str, message: str, fix: str = "") -> None:
        self.items.append(Problem(key, message, fix))

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def keys(self) -> set[str]:
        return {p.key for p in self.items}


def as_count(value: Any, key: str, problems: Problems, minimum: int | None = None) -> int | None:
    """A whole number, from an int or a float such as 1e8; None (and a problem) when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add(key, f"must be a whole number, got {value!r}", "write an integer such as 1048576 or 1e6")
        return None
    if isinstance(value, float) and not math.isfinite(value):
        problems.add(key, f"must be a finite whole number, got {value!r} (NaN, Infinity and numbers past 1e308 "
                     "read as such)", "write an integer such as 1048576 or 1e6")
        return None
    if isinstance(value, float) and not value.is_integer():
        below = math.floor(value)
        problems.add(key, f"must be a whole number, got {value!r}", f"use {below} or {below + 1}")
        return None
    count = int(value)
    if abs(count) > MAX_COUNT:
        problems.add(key, f"must be at most {MAX_COUNT} (2^63 - 1, the largest count torch and the native engine "
                     f"take), got {value!r}", f"set {key} to a smaller number")
        return None
    if minimum is not None and count < minimum:
        problems.add(key, f"must be at least {minimum}, got {count}", f"set {key} to {minimum} or more")
        return None
    return count


def as_bool(value: Any, key: str, problems: Problems) -> bool | None:
    """A boolean; the strings "true"/"false" are accepted with a warning."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        log.warning("%s: the string %r was read as the boolean %s; write it without quotes", key, value,
                    value.lower())
        return value.lower() == "true"
    problems.add(key, f"must be true or false, got {value!r}", "write true or false without quotes")
    return None


def did_you_mean(key: str, known: list[str] | tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"


def as_number(value: Any, key: str, problems: Problems) -> float | None:
    """A finite real number (int or float); None (and a problem) when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add(key, f"must be a number, got {value!r}", "write a number such as 0.001 or 1e-8")
        return None
    try:
        number = float(value)
    except OverflowError:  # an int past what a float holds
        number = math.inf
    if not math.isfinite(number):
        problems.add(key, f"must be a finite number, got {value!r} (NaN, Infinity and numbers past 1e308 read as "
                     "such)", "write a number such as 0.001 or 1e-8")
        return None
    return number


def as_text(value: Any, key: str, problems: Problems) -> str | None:
    if not isinstance(value, str):
        problems.add(key, f"must be a string, got {value!r}", "write it in double quotes")
        return None
    return value


def as_choice(value: Any, key: str, problems: Problems, choices: type[enum.Enum]) -> enum.Enum | None:
    """A member of `choices`, matched on its value without regard to case."""
    for member in choices:
        if isinstance(value, str) and value.lower() == str(member.value).lower():
            return member
    names = ", ".join(str(m.value) for m in choices)
    problems.add(key, f"must be one of {names}, got {value!r}", f"use one of {names}")
    return None

"""Coercion of JSON values as DeepSpeed users write them: counts as floats (1e8),
booleans as the strings "true"/"false" that DeepSpeed's tuner prints."""
from __future__ import annotations

import logging
from typing import Any

from infinity.errors import Problem

log = logging.getLogger("infinity.config")


class Problems:
    """Collects every problem of one config so they are all reported together."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, key: str, message: str, fix: str = "") -> None:
        self.items.append(Problem(key, message, fix))

    def __bool__(self) -> bool:
        return bool(self.items)


def as_count(value: Any, key: str, problems: Problems, minimum: int | None = None) -> int | None:
    """A whole number, from an int or a float such as 1e8; None (and a problem) when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add(key, f"must be a whole number, got {value!r}", "write an integer such as 1048576 or 1e6")
        return None
    if isinstance(value, float) and not value.is_integer():
        problems.add(key, f"must be a whole number, got {value!r}", f"use {int(value)} or {int(value) + 1}")
        return None
    count = int(value)
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

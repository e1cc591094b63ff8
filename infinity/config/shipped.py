"""The DeepSpeed-style configs shipped inside the package (infinity/config/shipped/*.json).

They are package data, read with importlib.resources, so an installed wheel has them wherever it lives:
`Config.load("nvme-local")`, `infinity-train --config nvme-local`, `infinity-config check nvme-local`.
A path that exists always wins over a shipped name.
"""
from __future__ import annotations

import os
from importlib import resources
from importlib.abc import Traversable

from infinity.errors import ConfigError, Problem

SUFFIX = ".json"


def _folder() -> Traversable:
    return resources.files("infinity.config").joinpath("shipped")


def names() -> list[str]:
    """The shipped configs' names, without .json: cpu-offload, hf-zero3-nvme, nvme-local."""
    return sorted(entry.name[:-len(SUFFIX)] for entry in _folder().iterdir() if entry.name.endswith(SUFFIX))


def find(source: str | os.PathLike[str]) -> Traversable | None:
    """The shipped config `source` names ("nvme-local" or "nvme-local.json"), or None when it names no
    shipped config or when a file of that name exists (a path always wins)."""
    text = os.fspath(source)
    if os.path.exists(text) or os.sep in text:
        return None
    name = text[:-len(SUFFIX)] if text.endswith(SUFFIX) else text
    return _folder().joinpath(name + SUFFIX) if name in names() else None


def read_text(name: str) -> str:
    """The JSON text of the shipped config `name` (ConfigError naming the shipped ones when there is none)."""
    found = find(name)
    if found is None:
        raise ConfigError([Problem("config", f"{name!r} is not a shipped config",
                                   f"name one of {', '.join(names())}, or give a path to a JSON file")])
    return found.read_text(encoding="utf-8")

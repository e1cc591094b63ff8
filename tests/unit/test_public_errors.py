"""Every error docs/errors.md documents is importable from `infinity` and is an InfinityError."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import infinity

ERRORS_DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def documented_errors() -> list[str]:
    """The first column of the table of errors: `Name` at the start of each row."""
    rows = re.findall(r"^\| `([A-Z]\w+)`", ERRORS_DOC.read_text(), flags=re.M)
    return sorted(set(rows))


def test_the_table_lists_the_errors():
    assert {"ConfigError", "CheckpointError", "ExporterError", "MetricsPortInUse"} <= set(documented_errors())


@pytest.mark.parametrize("name", documented_errors())
def test_documented_error_is_exported_from_infinity(name):
    assert name in infinity.__all__
    error = getattr(infinity, name)
    assert issubclass(error, infinity.InfinityError)

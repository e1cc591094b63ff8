"""infinity-train end to end: a real GPT, real swap files, the progress lines and the JSON record."""
from __future__ import annotations

import json

import pytest

from infinity.cli.train import DEFAULT_CONFIG, main

SMALL = ["--steps", "3", "--hidden", "64", "--layers", "1", "--heads", "4", "--vocab", "256", "--seq", "16",
         "--batch", "2"]


def test_trains_on_nvme_and_records_every_step(tmp_path, capsys):
    out = tmp_path / "run.json"
    swap = tmp_path / "swap"
    swap.mkdir()
    assert main(["--nvme_path", str(swap), "--json", str(out), *SMALL]) == 0
    record = json.loads(out.read_text())
    assert [s["step"] for s in record["steps"]] == [1, 2, 3]
    assert all(s["bytes_read"] > 0 and s["bytes_written"] > 0 and s["tokens"] == 2 * 16 for s in record["steps"])
    err = capsys.readouterr().err
    assert err.count("tok/s") == 3 and "read" in err and "written" in err  # one progress line a step
    assert not any((swap / "infinity-swap" / "rank-0").iterdir())  # swap files removed at the end


def test_default_config_is_the_nvme_example():
    assert DEFAULT_CONFIG.name == "nvme-local.json" and DEFAULT_CONFIG.is_file()


@pytest.mark.parametrize("args,message", [
    (["--hidden", "100", "--heads", "8"], "multiple of --heads"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_flags_exit_2_with_the_flag_named(tmp_path, capsys, args, message):
    assert main(["--nvme_path", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_nvme_path_names_it_and_the_fix(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["--nvme_path", str(missing), *SMALL]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "mkdir -p" in err

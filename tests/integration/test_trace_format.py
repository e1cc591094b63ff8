"""The trace infinity-train --trace writes, checked against the Trace Event Format's rules (which Perfetto
follows): every row's duration events nest strictly, async requests pair up, tids are numbers named by
thread_name metadata; and infinity-timeline draws it from any folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from trace_events import async_pairs_problems, partial_overlaps, thread_tracks

from infinity.cli.train import main as train

SMALL = ["--steps", "3", "--hidden", "512", "--heads", "8", "--layers", "2", "--vocab", "256", "--seq", "16",
         "--batch", "2"]  # blocks above the persistence threshold: parameters swap, per-module spans


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trace")
    (folder / "swap").mkdir()
    path = folder / "step.json"
    assert train(["--nvme_path", str(folder / "swap"), "--trace", str(path), *SMALL]) == 0
    return path


def test_every_row_nests_strictly_and_every_request_pairs_up(trace):
    events = json.loads(trace.read_text())["traceEvents"]
    tracks = thread_tracks(events)  # raises on a B without E (or the reverse)
    compute = [s for s in (e for e in events if e["ph"] == "X" and e["cat"] == "compute")]
    assert len(compute) > 20 and any(e["name"].startswith("backward ") for e in compute)
    assert {k: partial_overlaps(v) for k, v in tracks.items() if partial_overlaps(v)} == {}
    assert async_pairs_problems(events) == [] and any(e["ph"] == "b" for e in events)


def test_tids_are_numbers_named_by_metadata(trace):
    events = json.loads(trace.read_text())["traceEvents"]
    assert all(isinstance(e["pid"], int) and isinstance(e["tid"], int) for e in events)
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    used = {(e["pid"], e["tid"]) for e in events if e["ph"] != "M"}
    assert used <= names.keys()
    assert {"compute MainThread", "wait MainThread", "optimizer MainThread", "io", "steps"} <= set(names.values())
    assert len(set(names.values())) == len(names)  # one row per name


def test_infinity_timeline_draws_the_trace_from_another_folder(trace, tmp_path):
    svg = tmp_path / "step.svg"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "infinity.cli.timeline", str(trace), str(svg)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = svg.read_text()
    assert text.startswith("<svg") and text.rstrip().endswith("</svg>")
    for row in ("compute MainThread", "wait MainThread", "optimizer MainThread", "I/O reads", "I/O writes"):
        assert f">{row}</text>" in text
    assert "backward " in text and "optimizer step" in text


@pytest.mark.parametrize("argv,message", [
    (["missing.json", "out.svg"], "cannot be read"),
    (["bad.json", "out.svg"], "is not JSON"),
    (["step.json", "no/such/folder/out.svg"], "does not exist"),
])
def test_infinity_timeline_names_what_is_wrong(tmp_path, monkeypatch, capsys, argv, message):
    from infinity.cli.timeline import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "step.json").write_text(json.dumps({"traceEvents": []}))
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_checks_catch_what_perfetto_rejects():
    """The checks themselves: a partial overlap on one row, an unpaired B and an unended request are found."""
    x = [{"ph": "X", "name": "a", "ts": 0, "dur": 10, "pid": 1, "tid": 1},
         {"ph": "X", "name": "b", "ts": 9, "dur": 5, "pid": 1, "tid": 1},   # starts inside a, ends after it
         {"ph": "X", "name": "c", "ts": 1, "dur": 2, "pid": 1, "tid": 1},   # nested in a: fine
         {"ph": "X", "name": "d", "ts": 9, "dur": 5, "pid": 1, "tid": 2}]   # another row: fine
    found = {k: partial_overlaps(v) for k, v in thread_tracks(x).items()}
    assert found[(1, 1)] == [((0, 10, "a"), (9, 14, "b"))] and found[(1, 2)] == []
    with pytest.raises(AssertionError, match="never ended"):
        thread_tracks([{"ph": "B", "name": "a", "ts": 0, "pid": 1, "tid": 1}])
    assert async_pairs_problems([{"ph": "b", "name": "read", "ts": 0, "pid": 1, "cat": "io", "id": 7}])

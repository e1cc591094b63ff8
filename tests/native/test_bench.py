"""infinity-bench end to end: real sweeps with O_DIRECT on real files under tmp_path (ext4 here).
Figures are checked for shape and sense (positive, device bytes counted), never for speed."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from infinity.bench import sweep
from infinity.bench.diskstats import DiskProbe
from infinity.cli import bench as cli
from infinity.config import AioConfig
from infinity.errors import AioError
from infinity.io.files import direct_io_refusal

pytestmark = pytest.mark.native

SMALL = ["--io_size", "8M", "--block_size", "1M", "--queue_depth", "8", "--thread_count", "1"]  # later flags win
RESULT_KEYS = {"op", "block_size", "queue_depth", "thread_count", "single_submit", "overlap_events", "gbps",
               "device_bytes_ratio"}


@pytest.fixture
def nvme(tmp_path):
    if direct_io_refusal(tmp_path):
        pytest.skip(f"tmp_path takes no O_DIRECT here: {direct_io_refusal(tmp_path)}")
    folder = tmp_path / "nvme"
    folder.mkdir()
    return folder


def bench(capsys, nvme, *argv: str) -> tuple[int, str, str]:
    status = cli.main(["--nvme_path", str(nvme), *argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return status, out.out, out.err


def printed_block(stdout: str) -> dict:
    """The JSON printed after the 'aio block to paste' line."""
    start = stdout.index("{", stdout.index("aio block to paste"))
    block, _ = json.JSONDecoder().raw_decode(stdout[start:])
    return block


def leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith("infinity-bench-")]


def test_sweep_writes_json_and_prints_a_valid_best_block(capsys, nvme, tmp_path):
    report = tmp_path / "bench.json"
    status, out, err = bench(capsys, nvme, *SMALL, "--thread_count", "1,2", "--json", str(report))
    assert status == 0, err
    data = json.loads(report.read_text())
    results = data["results"]
    assert [(r["op"], r["thread_count"]) for r in results] == [("write", 1), ("read", 1), ("write", 2), ("read", 2)]
    for r in results:
        assert RESULT_KEYS <= set(r)
        assert r["block_size"] == 1 << 20 and r["queue_depth"] == 8
        assert r["single_submit"] is False and r["overlap_events"] is True
        assert r["gbps"] > 0 and math.isfinite(r["gbps"])
        if data["device"] is not None:  # O_DIRECT: every requested byte crossed the device
            assert r["device_bytes_ratio"] >= 0.9
    block = printed_block(out)
    assert block == {"aio": data["best"]["aio"]}
    assert set(block["aio"]) == {"block_size", "queue_depth", "intra_op_parallelism", "single_submit",
                                 "overlap_events"}
    chosen = AioConfig.from_dict(block["aio"])
    assert chosen.block_size == 1 << 20 and chosen.thread_count in (1, 2)
    assert "best read:" in out and "best write:" in out and "GB/s" in out
    assert leftovers(nvme) == []


def test_plot_writes_a_png(capsys, nvme, tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "sweep.png"
    status, _, err = bench(capsys, nvme, *SMALL, "--block_size", "256K,1M", "--thread_count", "1,2",
                           "--plot", str(picture))
    assert status == 0, err
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(nvme) == []


def test_compare_fio_adds_fio_figures(capsys, nvme, tmp_path):
    if shutil.which("fio") is None:
        pytest.skip("fio is not on PATH")
    report = tmp_path / "bench.json"
    status, out, err = bench(capsys, nvme, *SMALL, "--thread_count", "2", "--compare-fio", "--json", str(report))
    assert status == 0, err
    results = json.loads(report.read_text())["results"]
    assert len(results) == 2 and all(r["fio_gbps"] > 0 for r in results)
    assert "fio GB/s" in out and "ours/fio" in out
    assert leftovers(nvme) == []


def test_compare_fio_without_fio_says_so_and_goes_on(capsys, nvme, monkeypatch):
    monkeypatch.setattr(sweep, "fio_binary", lambda: None)
    status, out, err = bench(capsys, nvme, *SMALL, "--compare-fio")
    assert status == 0 and "fio is not on PATH" in err and "fio GB/s" not in out


@pytest.mark.parametrize("flag,ops", [("--read_only", ["read"]), ("--write_only", ["write"])])
def test_one_operation_only(capsys, nvme, tmp_path, flag, ops):
    report = tmp_path / "bench.json"
    status, out, err = bench(capsys, nvme, *SMALL, flag, "--json", str(report))
    assert status == 0, err
    data = json.loads(report.read_text())
    assert [r["op"] for r in data["results"]] == ops and f"only {ops[0]} ran" in out
    AioConfig.from_dict(printed_block(out)["aio"])
    assert leftovers(nvme) == []


def test_repeat_reports_the_median(capsys, nvme, tmp_path):
    report = tmp_path / "bench.json"
    status, _, err = bench(capsys, nvme, *SMALL, "--write_only", "--repeat", "3", "--json", str(report))
    assert status == 0, err
    (result,) = json.loads(report.read_text())["results"]
    assert len(result["runs_gbps"]) == 3 and result["gbps"] == sorted(result["runs_gbps"])[1]


def test_single_submit_and_overlap_events_axes(capsys, nvme, tmp_path):
    report = tmp_path / "bench.json"
    status, out, err = bench(capsys, nvme, *SMALL, "--single_submit", "false,true", "--overlap_events",
                             "true,false", "--json", str(report))
    assert status == 0, err
    combos = {(r["single_submit"], r["overlap_events"]) for r in json.loads(report.read_text())["results"]}
    assert combos == {(False, True), (False, False), (True, True), (True, False)}
    assert "single_submit" in out.splitlines()[1]


def test_without_a_block_device_the_ratio_is_null_with_one_warning(capsys, nvme, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep.DiskProbe, "for_path",
                        classmethod(lambda cls, path, source="": DiskProbe(None, "no block device under it")))
    report = tmp_path / "bench.json"
    status, out, err = bench(capsys, nvme, *SMALL, "--json", str(report))
    assert status == 0
    assert all(r["device_bytes_ratio"] is None for r in json.loads(report.read_text())["results"])
    assert err.count("warning: no block device under it") == 1 and "n/a" in out


@pytest.mark.parametrize("failure,status", [(KeyboardInterrupt, 130),
                                            (AioError(5, "read", "x", 0, 1, fix="test"), 1)])
def test_the_bench_file_is_removed_on_interrupt_and_error(capsys, nvme, monkeypatch, failure, status):
    real = sweep._timed
    calls = []

    def fail_on_the_read(handle, op, file, buffer, probe):
        calls.append(op)
        assert leftovers(nvme)  # the file exists while the sweep runs
        if len(calls) == 2:
            raise failure
        return real(handle, op, file, buffer, probe)

    monkeypatch.setattr(sweep, "_timed", fail_on_the_read)
    got, _, err = bench(capsys, nvme, *SMALL)
    assert got == status and leftovers(nvme) == []
    assert ("interrupted" in err) if status == 130 else ("infinity-bench: error:" in err)

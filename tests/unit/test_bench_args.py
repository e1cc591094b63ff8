"""infinity-bench's input handling and reporting, without running a sweep: human sizes, axis lists,
every bad flag (exit 2, no traceback, the flag named), /proc/diskstats parsing, choice of the best."""
from __future__ import annotations

import io
import math
import os

import pytest

from infinity.bench import diskstats
from infinity.bench.axes import OpSelection, parse_axes
from infinity.bench.diskstats import DiskCounters, DiskProbe, device_bytes, parse_diskstats
from infinity.bench.fio import FioError, fio_command, parse_fio_json
from infinity.bench.progress import ProgressBar
from infinity.bench.report import LOW_RATIO, choose_best, summary, table, to_json, warnings
from infinity.bench.sizes import format_size, parse_size
from infinity.bench.sweep import Measurement, SweepOutcome
from infinity.cli import bench as cli
from infinity.config.aio import AioConfig
from infinity.errors import ConfigError
from infinity.io.handle import Op

SAMPLE_DISKSTATS = """\
   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 259       0 nvme0n1 175621 94284 110470870 336635 39789 143845 120904288 172342 0 65140 510202 6749 50 4047456 1183 676 39
 259       1 nvme0n1p1 1000 0 2048 10 2000 0 4096 20 0 30 30 0 0 0 0 0 0
 253       0 dm-0 5 0 40 1 6 0 48 2 0 3 3
 short line
"""


# ---- sizes -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), ("4K", 4096), ("4k", 4096), ("256K", 256 << 10), ("1M", 1 << 20), ("256M", 256 << 20),
    ("1G", 1 << 30), ("1.5G", 3 << 29), ("2T", 2 << 40), ("1GiB", 1 << 30), ("1MB", 1 << 20), (" 8M ", 8 << 20),
    ("-4K", -4096), ("0", 0)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1X", "1 G B", "K", "1.2.3M", "0x1000", "1.00001K"])
def test_parse_size_rejects_with_the_flag_named(text):
    with pytest.raises(ConfigError) as err:
        parse_size(text, "--io_size")
    assert err.value.keys == ("--io_size",)


@pytest.mark.parametrize("nbytes,text", [(262144, "256K"), (1 << 20, "1M"), (4 << 20, "4M"), (1 << 30, "1G"),
                                         (3 << 29, "1536M"), (1000, "1000"), (0, "0"), (2 << 40, "2T")])
def test_format_size_is_exact_and_round_trips(nbytes, text):
    assert format_size(nbytes) == text
    assert parse_size(text) == nbytes


# ---- axes --------------------------------------------------------------------------------
def test_default_axes_are_the_documented_sweep():
    axes = parse_axes()
    assert axes.block_sizes == (256 << 10, 1 << 20, 4 << 20)
    assert axes.queue_depths == (8, 32, 64) and axes.thread_counts == (1, 2)
    assert axes.single_submits == (False,) and axes.overlap_events == (True,)
    settings = axes.settings()
    assert len(settings) == 18 and all(isinstance(s, AioConfig) for s in settings)
    assert settings[0] == AioConfig(block_size=256 << 10, queue_depth=8, intra_op_parallelism=1)


def test_axes_lists_booleans_and_duplicates():
    axes = parse_axes("1M, 4M,1M", "8", "2", "false,true", "TRUE,0")
    assert axes.block_sizes == (1 << 20, 4 << 20)
    assert axes.single_submits == (False, True) and axes.overlap_events == (True, False)
    assert len(axes.settings()) == 2 * 2 * 2


def test_op_selection_writes_before_reads():
    assert OpSelection.BOTH.ops == (Op.WRITE, Op.READ)
    assert OpSelection.READ_ONLY.ops == (Op.READ,) and OpSelection.WRITE_ONLY.ops == (Op.WRITE,)


def test_axis_problems_are_reported_together_with_flag_and_aio_key():
    with pytest.raises(ConfigError) as err:
        parse_axes("0,-4K,5000,1M", "0", "0")
    text = str(err.value)
    assert len(err.value.problems) == 5
    assert "--block_size (aio.block_size)" in text and "--queue_depth (aio.queue_depth)" in text
    assert "--thread_count (aio.intra_op_parallelism)" in text and "set --thread_count to 1 or more" in text


# ---- bad input through main: exit 2, the flag named, no traceback ------------------------
def run_main(capsys, *argv: str) -> tuple[int, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.err


def test_missing_nvme_path(capsys):
    status, err = run_main(capsys)
    assert status == 2 and "--nvme_path" in err and "required" in err


@pytest.mark.parametrize("case", ["missing", "file", "unwritable"])
def test_bad_nvme_path(capsys, tmp_path, case):
    if case == "missing":
        path, words = str(tmp_path / "nope"), "does not exist"
    elif case == "file":
        path, words = str(tmp_path / "f"), "is not a folder"
        open(path, "w").close()
    elif os.geteuid() != 0:
        path, words = str(tmp_path / "ro"), "not writable"
        os.mkdir(path, 0o500)
    else:  # root writes through permission bits; /proc takes no new file whoever asks
        path, words = "/proc", "not writable"
    status, err = run_main(capsys, "--nvme_path", path)
    assert status == 2 and err.startswith("infinity-bench: error:")
    assert "--nvme_path" in err and words in err


def test_no_room_for_io_size(capsys, tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    status, err = run_main(capsys, "--nvme_path", str(tmp_path), "--io_size", str((free // 4096 + 1024) * 4096))
    assert status == 2 and "--nvme_path" in err and "free space" in err


@pytest.mark.parametrize("argv,flag", [
    (["--block_size", "0"], "--block_size"), (["--block_size=-4096"], "--block_size"),
    (["--block_size", "5000"], "--block_size"), (["--block_size", "1M,,4M"], "--block_size"),
    (["--block_size", "1Q"], "--block_size"), (["--queue_depth", "0"], "--queue_depth"),
    (["--queue_depth=-1"], "--queue_depth"), (["--queue_depth", "x"], "--queue_depth"),
    (["--thread_count", "0"], "--thread_count"), (["--thread_count", "1.5"], "--thread_count"),
    (["--io_size", "abc"], "--io_size"), (["--io_size", "5000"], "--io_size"), (["--io_size", "0"], "--io_size"),
    (["--io_size=-1G"], "--io_size"), (["--repeat", "0"], "--repeat"), (["--repeat", "x"], "--repeat"),
    (["--single_submit", "maybe"], "--single_submit"), (["--overlap_events", ""], "--overlap_events"),
    (["--read_only", "--write_only"], "--write_only"), (["--json", "/nonexistent-dir/x.json"], "--json"),
    (["--plot", "/nonexistent-dir/x.png"], "--plot")])
def test_bad_flags_exit_2_naming_the_flag(capsys, tmp_path, argv, flag):
    status, err = run_main(capsys, "--nvme_path", str(tmp_path), *argv)
    assert status == 2, err
    assert flag in err and "infinity-bench: error:" in err
    assert not any(n.startswith("infinity-bench-") for n in os.listdir(tmp_path))


def test_plot_without_matplotlib_says_how_to_get_it(capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    status, err = run_main(capsys, "--nvme_path", str(tmp_path), "--plot", str(tmp_path / "x.png"))
    assert status == 2 and "pip install 'infinity[plot]'" in err


# ---- diskstats ---------------------------------------------------------------------------
def test_parse_diskstats_sample():
    stats = parse_diskstats(SAMPLE_DISKSTATS)
    assert stats["nvme0n1"] == DiskCounters(sectors_read=110470870, sectors_written=120904288)
    assert stats["nvme0n1p1"].bytes_read == 2048 * 512 and stats["nvme0n1p1"].bytes_written == 4096 * 512
    assert stats["dm-0"] == DiskCounters(40, 48)  # the short pre-4.18 format has the fields too
    assert "short" not in stats and stats["loop0"] == DiskCounters(0, 0)


def test_device_bytes_between_snapshots():
    before, after = DiskCounters(100, 200), DiskCounters(100 + 2048, 200 + 4096)
    assert device_bytes(before, after, reading=True) == 2048 * 512
    assert device_bytes(before, after, reading=False) == 4096 * 512
    assert device_bytes(None, after, reading=True) is None


def test_probe_reads_the_device_under_the_path(tmp_path, monkeypatch):
    source = tmp_path / "diskstats"
    source.write_text(SAMPLE_DISKSTATS)
    monkeypatch.setattr(diskstats, "block_device_name", lambda path: "nvme0n1p1")
    probe = DiskProbe.for_path(tmp_path, source=str(source))
    assert probe.device == "nvme0n1p1" and probe.snapshot() == DiskCounters(2048, 4096)


@pytest.mark.parametrize("name", [None, "0:27"])  # no link at all, or the unresolved link of a tmpfs
def test_probe_without_a_block_device_says_why(tmp_path, monkeypatch, name):
    source = tmp_path / "diskstats"
    source.write_text(SAMPLE_DISKSTATS)
    monkeypatch.setattr(diskstats, "block_device_name", lambda path: name)
    probe = DiskProbe.for_path(tmp_path, source=str(source))
    assert probe.device is None and "no block device" in probe.reason and probe.snapshot() is None


# ---- best, table, JSON, warnings ---------------------------------------------------------
def m(op: Op, bs: int, qd: int, gbps: float, ratio: float = 1.0, fio: float | None = None) -> Measurement:
    return Measurement(op, AioConfig(block_size=bs, queue_depth=qd), gbps, ratio, (gbps,), fio)


def outcome(*ms: Measurement, device: str | None = "nvme0n1", notes: tuple[str, ...] = ()) -> SweepOutcome:
    return SweepOutcome(tuple(ms), DiskProbe(device, "" if device else "no block device here"), 1 << 30, notes)


def test_best_is_the_geometric_mean_of_read_and_write():
    ms = [m(Op.WRITE, 1 << 20, 8, 4.0), m(Op.READ, 1 << 20, 8, 1.0),   # mean 2.5, geometric mean 2.0
          m(Op.WRITE, 4 << 20, 8, 2.2), m(Op.READ, 4 << 20, 8, 2.2)]   # geometric mean 2.2
    best = choose_best(ms)
    assert best.aio.block_size == 4 << 20 and math.isclose(best.score_gbps, 2.2)
    assert [(x.opname, x.aio.block_size) for x in best.by_op] == [("write", 1 << 20), ("read", 4 << 20)]


def test_best_of_one_operation():
    best = choose_best([m(Op.READ, 1 << 20, 8, 1.5), m(Op.READ, 1 << 20, 32, 2.5)])
    assert best.aio.queue_depth == 32 and "only read" in best.basis
    assert choose_best([]) is None


def test_low_ratio_warns_and_nan_becomes_null():
    low = m(Op.READ, 1 << 20, 8, 9.0, ratio=0.05)
    found = outcome(m(Op.WRITE, 1 << 20, 8, 2.0), low)
    lines = warnings(found)
    assert len(lines) == 1 and "page cache" in lines[0] and f"{0.05:.2f}" in lines[0] and LOW_RATIO > 0.05
    nan = outcome(m(Op.READ, 1 << 20, 8, 2.0, ratio=math.nan), device=None, notes=("no block device here",))
    assert warnings(nan) == ["no block device here"]
    report = to_json(nan, choose_best(nan.measurements))
    assert report["results"][0]["device_bytes_ratio"] is None and report["results"][0]["fio_gbps"] is None
    assert "n/a" in table(nan, None)


def test_table_has_fio_columns_when_fio_ran():
    text = table(outcome(m(Op.WRITE, 1 << 20, 8, 2.0, fio=2.5)), None)
    assert "fio GB/s" in text and "ours/fio" in text and "0.80" in text


def third_setting() -> SweepOutcome:
    """The fastest write (1M), the fastest read (4M qd 32) and the chosen setting (4M qd 8, the best geometric
    mean) are three different settings."""
    return outcome(m(Op.WRITE, 1 << 20, 8, 4.0), m(Op.READ, 1 << 20, 8, 1.0),
                   m(Op.WRITE, 4 << 20, 8, 2.4), m(Op.READ, 4 << 20, 8, 2.4),
                   m(Op.WRITE, 4 << 20, 32, 1.0), m(Op.READ, 4 << 20, 32, 2.5))


def test_table_marks_the_chosen_setting_and_each_operations_fastest_row_apart():
    found = third_setting()
    best = choose_best(found.measurements)
    assert best.aio.block_size == 4 << 20 and best.aio.queue_depth == 8
    lines = table(found, best).splitlines()
    assert lines[0].split()[-1] == "best"
    rows = {tuple(line.split()[:3]): line for line in lines[2:8]}
    assert rows[("write", "1M", "8")].endswith("  fastest write")
    assert rows[("read", "1M", "8")].endswith("1.00")  # nothing to mark
    assert rows[("write", "4M", "8")].endswith("  chosen") and rows[("read", "4M", "8")].endswith("  chosen")
    assert rows[("read", "4M", "32")].endswith("  fastest read") and rows[("write", "4M", "32")].endswith("1.00")
    assert "*" not in "\n".join(lines)
    assert lines[-1].startswith('best: "chosen" = the setting whose aio block is printed below')
    assert "(\"chosen\" in the table)" in summary(found, best)
    both = outcome(m(Op.WRITE, 1 << 20, 8, 3.0), m(Op.READ, 1 << 20, 8, 2.0))  # one setting: every mark on it
    assert table(both, choose_best(both.measurements)).splitlines()[3].endswith("  chosen, fastest read")


def test_heatmap_boxes_the_chosen_and_fastest_cells_on_one_colour_scale():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from infinity.bench.plot import CHOSEN, FASTEST, heatmap_figure
    found = third_setting()
    fig = heatmap_figure(found, choose_best(found.measurements))
    try:
        panels = [ax for ax in fig.axes if ax.get_title() in ("write", "read")]
        assert [ax.get_title() for ax in panels] == ["write", "read"]
        norms = {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in panels}
        assert norms == {(1.0, 4.0)}  # the sweep's lowest and highest GB/s, in both panels
        assert len(fig.axes) == 3  # the two panels and one colour bar

        def boxed(ax, gid):  # (row, column) of the cells boxed with gid; rows 1M, 4M; columns qd 8, qd 32
            return sorted((round(p.get_y() + p.get_height() / 2), round(p.get_x() + p.get_width() / 2))
                          for p in ax.patches if p.get_gid() == gid)
        write, read = panels
        assert boxed(write, CHOSEN) == [(1, 0)] and boxed(read, CHOSEN) == [(1, 0)]
        assert boxed(write, FASTEST) == [(0, 0)] and boxed(read, FASTEST) == [(1, 1)]
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels == ["chosen: the aio block printed", "fastest of this operation"]
    finally:
        plt.close(fig)


# ---- fio and progress --------------------------------------------------------------------
def test_fio_command_gives_each_job_its_slice():
    cmd = fio_command("fio", AioConfig(block_size=1 << 20, queue_depth=32, intra_op_parallelism=2), Op.READ,
                      "/x/f.dat", 1 << 30)
    for arg in ("--rw=read", "--bs=1048576", "--iodepth=32", "--numjobs=2", f"--size={1 << 29}",
                f"--offset_increment={1 << 29}", "--direct=1", "--ioengine=libaio", "--output-format=json"):
        assert arg in cmd
    assert not any("iodepth_batch" in a for a in cmd)


def test_parse_fio_json():
    text = 'fio: note\n{"jobs": [{"read": {"bw_bytes": 2000000000}, "write": {"bw_bytes": 0}}]}'
    assert parse_fio_json(text, Op.READ) == 2.0
    with pytest.raises(FioError):
        parse_fio_json(text, Op.WRITE)
    with pytest.raises(FioError):
        parse_fio_json("not json", Op.READ)


def test_progress_bar_off_a_terminal_writes_tenths():
    out = io.StringIO()
    bar = ProgressBar(20, out)
    for i in range(20):
        bar.advance(f"run {i}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 11 and lines[-1].startswith("[" + "#" * 30 + "] 20/20")

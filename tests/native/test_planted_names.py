"""Files infinity creates in a folder a user names are new files: a symlink or a file planted at the name is
never followed or overwritten (the bench file, swap folders and files), and infinity-bench refuses settings
past its bounds before anything starts."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from infinity.bench.bench_file import FILE_PREFIX, create_bench_file, remove_dead_bench_files
from infinity.cli import bench as cli
from infinity.config.aio import MAX_THREADS
from infinity.errors import AioError, NvmePathError
from infinity.io import Access, open_file
from infinity.io.files import direct_io_refusal
from infinity.memory.nvme_store import SWAP_DIR, NvmeStore

pytestmark = pytest.mark.native

SMALL = ["--io_size", "4M", "--block_size", "1M", "--queue_depth", "8", "--thread_count", "1"]
SECRET = b"the victim's own bytes\n"


@pytest.fixture
def nvme(tmp_path):
    if direct_io_refusal(tmp_path):
        pytest.skip(f"tmp_path takes no O_DIRECT here: {direct_io_refusal(tmp_path)}")
    folder = tmp_path / "nvme"
    folder.mkdir()
    return folder


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_bytes(SECRET)
    return path


def test_a_symlink_planted_at_the_bench_files_old_name_is_never_followed(nvme, victim, capsys):
    planted = nvme / f"{FILE_PREFIX}{os.getpid()}.dat"  # the name main used: the PID is easy to guess
    planted.symlink_to(victim)
    assert cli.main(["--nvme_path", str(nvme), *SMALL]) == 0
    assert victim.read_bytes() == SECRET
    assert planted.is_symlink() and os.listdir(nvme) == [planted.name]  # ours removed, theirs left alone
    assert "Traceback" not in capsys.readouterr().err


def test_new_files_refuse_an_existing_name_or_symlink(tmp_path, victim):
    (tmp_path / "link").symlink_to(victim)
    (tmp_path / "file").write_bytes(b"x")
    for name in ("link", "file"):
        with pytest.raises(AioError) as caught:
            open_file(tmp_path / name, Access.NEW)
        assert caught.value.errno == errno.EEXIST and "never follows or overwrites" in str(caught.value)
    assert victim.read_bytes() == SECRET and (tmp_path / "file").read_bytes() == b"x"
    with open_file(tmp_path / "new", Access.NEW) as f:
        assert f.size() == 0 and oct(os.stat(tmp_path / "new").st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("planted", [SWAP_DIR, f"{SWAP_DIR}/rank-0"])
def test_a_symlinked_swap_folder_is_refused_and_its_target_untouched(tmp_path, planted):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    nvme = tmp_path / "nvme"
    (nvme / planted).parent.mkdir(parents=True, exist_ok=True)
    (nvme / planted).symlink_to(elsewhere)
    with pytest.raises(NvmePathError, match="is a symlink or not a folder"):
        NvmeStore(nvme)
    assert os.listdir(elsewhere) == []


# A sweep's bench file, held by a process that then waits to be killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from infinity.bench.bench_file import create_bench_file
    bench = create_bench_file(sys.argv[1])
    print(bench.path, flush=True)
    time.sleep(600)
""")


def test_files_of_killed_sweeps_are_removed_and_live_ones_left_alone(nvme):
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(nvme)], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    live, dead = [(p, p.stdout.readline().strip()) for p in holders]
    try:
        dead[0].send_signal(signal.SIGKILL)
        dead[0].wait()
        assert os.path.exists(dead[1])  # SIGKILL removes nothing
        mine = create_bench_file(str(nvme))
        try:
            assert not os.path.exists(dead[1]) and os.path.exists(live[1])
            assert remove_dead_bench_files(str(nvme)) == []  # mine is locked too
        finally:
            mine.close()
        assert not os.path.exists(mine.path)
    finally:
        for p in holders:
            p.kill()
            p.wait()
            p.stdout.close()


REFUSED = textwrap.dedent("""
    import sys, threading
    from infinity.cli import bench
    status = bench.main(["--nvme_path", sys.argv[1], "--thread_count", "100000"])
    print(status, threading.active_count(), "torch" in sys.modules)
""")


def test_thread_count_100000_is_refused_with_the_limit_and_nothing_started(nvme):
    done = subprocess.run([sys.executable, "-c", REFUSED, str(nvme)], capture_output=True, text=True)
    assert f"--thread_count (aio.intra_op_parallelism): must be at most {MAX_THREADS}, got 100000" in done.stderr
    # exit 2; no thread besides the main one, and not even torch loaded (the sweep's import), so it is quick
    assert done.stdout.split() == ["2", "1", "False"]
    assert os.listdir(nvme) == []  # no bench file
    assert "Traceback" not in done.stderr


def test_bench_json_and_plot_replace_a_planted_symlink_never_follow_it(nvme, victim, tmp_path, capsys):
    outputs = ["--json"] + (["--plot"] if _have_matplotlib() else [])
    links = []
    for flag in outputs:
        link = tmp_path / ("result.json" if flag == "--json" else "result.png")
        link.symlink_to(victim)
        links += [flag, str(link)]
    assert cli.main(["--nvme_path", str(nvme), *SMALL, *links]) == 0
    assert victim.read_bytes() == SECRET
    for path in links[1::2]:
        assert not os.path.islink(path) and os.path.getsize(path) > 0
    capsys.readouterr()


def _have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None

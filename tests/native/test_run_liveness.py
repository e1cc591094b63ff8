"""A run's liveness rests on a lock held for its life, not on its PID: real processes, real SIGKILLs, and a
PID namespace (unshare) where the trainer is PID 1 at every restart."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from infinity.io.lock import Liveness, RunLock, claim
from infinity.memory.nvme_store import SWAP_DIR, NvmeStore, remove_dead_runs

pytestmark = pytest.mark.native

# A process that opens a store, lays out a region file, says where, and waits to be killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from infinity.memory.nvme_store import NvmeStore
    store = NvmeStore(sys.argv[1])
    store.allocate("x", 10)
    print(store.folder, flush=True)
    time.sleep(600)
""")


def start_holder(folder) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def test_run_folders_have_unique_names_and_hold_their_lock(tmp_path):
    with NvmeStore(tmp_path) as a, NvmeStore(tmp_path) as b:  # two stores of one process, one nvme_path
        assert a.folder != b.folder
        assert a.folder.name.startswith(f"run-{os.getpid()}-") and b.folder.name.startswith(f"run-{os.getpid()}-")
        for store in (a, b):
            liveness, lock = claim(store.folder / "lock")
            assert (liveness, lock) == (Liveness.LIVE, None)  # held, also against this very process
        assert remove_dead_runs(a.rank_dir) == []
        folder = a.folder
    assert not folder.exists()


def test_a_killed_run_is_dead_and_a_live_one_is_left_alone(tmp_path):
    live, live_folder = start_holder(tmp_path)
    dead, dead_folder = start_holder(tmp_path)
    try:
        kill(dead)
        with NvmeStore(tmp_path):
            assert not os.path.exists(dead_folder)  # removed at start
            assert os.path.isdir(live_folder)  # another process's live run: never touched
    finally:
        kill(live)
    with NvmeStore(tmp_path):
        assert not os.path.exists(live_folder)


def test_a_dead_run_whose_pid_is_alive_again_is_removed(tmp_path):
    """The PID of a dead run now names a live process (this one): the lock, not the PID, decides."""
    rank_dir = tmp_path / SWAP_DIR / "rank-0"
    rank_dir.mkdir(parents=True)
    stale = rank_dir / f"run-{os.getpid()}-deadbeef"
    stale.mkdir(mode=0o700)
    RunLock.create(stale / "lock").release()  # its run ended without removing it
    (stale / "param.swp").write_bytes(b"x" * 4096)
    with NvmeStore(tmp_path) as store:
        assert not stale.exists() and store.folder.exists()


def test_folders_of_an_infinity_without_locks_follow_the_old_rule(tmp_path):
    rank_dir = tmp_path / SWAP_DIR / "rank-0"
    rank_dir.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (rank_dir / f"run-{gone}").mkdir()
    (rank_dir / f"run-{os.getpid()}").mkdir()  # this process never makes such a folder: not a live run's
    (rank_dir / "run-1").mkdir()  # PID 1 lives (init): left alone
    removed = remove_dead_runs(rank_dir)
    assert sorted(p.name for p in removed) == sorted([f"run-{gone}", f"run-{os.getpid()}"])
    assert (rank_dir / "run-1").is_dir()


def _pid_namespaces() -> str | None:
    """None when `unshare --pid --fork --mount-proc` works here, else why not."""
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", "echo $$"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "1":
        return f"this machine gives no PID namespace to this user: {probe.stderr.strip() or probe.stdout.strip()}"
    return None


def test_pid_1_restarts_after_sigkill_in_a_pid_namespace(tmp_path):
    """A container's trainer is PID 1; after a SIGKILL (sent from outside, as a container runtime or the OOM
    killer does) the restart is PID 1 again and must start, removing the dead run's folder."""
    refusal = _pid_namespaces()
    if refusal:
        pytest.skip(refusal)
    as_pid_1 = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c"]
    first = subprocess.Popen([*as_pid_1, "import os; assert os.getpid() == 1\n" + HOLDER, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    dead = first.stdout.readline().strip()
    assert dead and os.path.isdir(dead)
    with open(f"/proc/{first.pid}/task/{first.pid}/children") as children:  # unshare's child: PID 1 inside
        os.kill(int(children.read().split()[0]), signal.SIGKILL)
    first.wait()
    first.stdout.close()
    assert os.path.isdir(dead)  # a SIGKILL cleans nothing up
    again = ("import os; from infinity.memory.nvme_store import NvmeStore; "
             f"s = NvmeStore({str(tmp_path)!r}); s.allocate('x', 10); print(os.getpid(), s.folder); s.close()")
    second = subprocess.run([*as_pid_1, again], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    pid, folder = second.stdout.split()
    assert pid == "1" and folder != dead
    assert not os.path.exists(dead)  # the dead PID 1's folder was removed at the restart
    assert os.listdir(tmp_path / SWAP_DIR / "rank-0") == []


# [Note: made, then locked]  A file is unlocked between the open that makes it and its flock; a clean-up
# starting at that moment must not leave the maker holding the lock of a removed file (CI saw it once).
def test_a_new_file_taken_by_a_clean_up_before_its_lock_is_given_up(tmp_path):
    path = str(tmp_path / "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    liveness, theirs = claim(path)  # the clean-up comes first and holds the lock
    assert liveness is Liveness.DEAD
    assert RunLock.try_hold_new(os.dup(fd), path) is None
    os.unlink(path)  # it removes the name, then lets go
    theirs.release()
    assert RunLock.try_hold_new(fd, path) is None  # the lock of a file with no name is worth nothing


MAKERS = textwrap.dedent("""
    import sys
    from infinity.bench.bench_file import create_bench_file
    from infinity.memory.nvme_store import NvmeStore
    for _ in range(int(sys.argv[2])):
        create_bench_file(sys.argv[1]).close()
        store = NvmeStore(sys.argv[1])
        store.close()
    print("ok", flush=True)
""")


def test_runs_and_sweeps_starting_together_never_take_each_others_files(tmp_path):
    makers = [subprocess.Popen([sys.executable, "-c", MAKERS, str(tmp_path), "150"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in makers]
    assert [(p.returncode, out) for p, (out, _) in zip(makers, outs)] == [(0, "ok\n")] * 3, [e for _, e in outs]
    assert os.listdir(tmp_path / SWAP_DIR / "rank-0") == [] and os.listdir(tmp_path) == [SWAP_DIR]

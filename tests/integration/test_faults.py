"""Faults under a real training run: each is a typed error naming the path and errno, the run refuses to
go on afterwards (EngineFailed naming the first error), close still works, and nothing outside the
run's folder is touched.  Or, where the run can go on correctly (its swap files deleted under it), it
does, with the same losses as plain PyTorch."""
from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

from infinity.config.aio import AioConfig, Backend
from infinity.errors import AioError, EngineFailed, ShortTransferError
from infinity.io import files
from infinity.swap import optimizer as optimizer_module
from infinity.swap.params import Tier
from infinity.zero import Engine, EngineSettings, UsageError

from tmpfs import size_limited_tmpfs
from training_reference import ADAM, SPEC, fresh_model, make_batches, plain_torch_run, train

SENTINEL = b"a user's file next to the swap files" * 100


@pytest.fixture(scope="module")
def batches():
    return make_batches()


def settings(nvme_path, backend: Backend = Backend.AUTO, optimizer_path=None, **extra) -> EngineSettings:
    return EngineSettings(param_tier=Tier.NVME, optimizer_tier=Tier.NVME, param_nvme_path=str(nvme_path),
                          optimizer_nvme_path=str(optimizer_path or nvme_path), adam=ADAM, gradient_clipping=1.0,
                          sub_group_size=20_000, aio=AioConfig(backend=backend), **extra)


def own_param_file(nvme_path, backend: Backend = Backend.AUTO, **extra) -> EngineSettings:
    """The optimizer under a folder of its own, so that the parameters keep a swap file of their own and the
    step writes it (on one path their partitions are ranges of the master file: memory/views.py)."""
    (nvme_path / "optimizer").mkdir(exist_ok=True)
    return settings(nvme_path, backend, optimizer_path=nvme_path / "optimizer", **extra)


def swap_file(engine: Engine, region: str) -> str:
    (path,) = [p for m in engine.run.managers if (p := m.store.folder / f"{region}.swp").exists()]
    return str(path)


def assert_refuses_everything(engine: Engine, batches, cause: str) -> None:
    """forward, backward and step each raise EngineFailed naming the first error."""
    x, y = batches[0]
    for call in (lambda: engine(x, y), lambda: engine.backward(torch.zeros((), requires_grad=True)), engine.step):
        with pytest.raises(EngineFailed, match=cause):
            call()


# ---- the disk fills up mid-step ------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A real 8 MiB tmpfs (it takes O_DIRECT on kernels >= 6.6) with a user's file on it."""
    with size_limited_tmpfs(tmp_path / "small", "8m") as folder:
        (folder / "keep.bin").write_bytes(SENTINEL)
        yield folder


def punch_hole(path: str) -> None:
    """Frees a file's blocks as `fallocate --punch-hole` does (size kept): what "freeing space" does."""
    fd = os.open(path, os.O_RDWR)
    try:
        err = files.punch_hole(fd, 0, os.fstat(fd).st_size)
        if err:
            pytest.skip(f"this file system cannot punch holes ({os.strerror(err)})")
    finally:
        os.close(fd)


def fill(folder) -> None:
    """Writes a filler file until the file system says ENOSPC."""
    with open(folder / "filler.bin", "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    f.write(b"\xff" * chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC
    assert os.statvfs(folder).f_bavail == 0


@pytest.mark.parametrize("backend", [Backend.LIBAIO, Backend.POSIX], ids=["libaio", "posix"])
@pytest.mark.parametrize("region,max_in_cpu", [("param", 0), ("param", SPEC.parameters), ("grad", 0)],
                         ids=["param", "param-kept-in-host", "grad"])
def test_disk_full_mid_step_is_a_typed_error_and_latches(small_fs, batches, backend, region, max_in_cpu):
    """param: the step's writes of new weights hit the hole (inside the optimizer pipeline: write_part,
    or write_kept for host-kept copies, completed at a flush); grad: backward's gradient writes do."""
    engine = Engine(fresh_model(), own_param_file(small_fs, backend, param_max_in_cpu=max_in_cpu))
    try:
        train(engine, batches[:1])
        assert (engine.run.homes[0].kept == engine.run.offloaded) == bool(max_in_cpu)  # type: ignore[attr-defined]
        path = swap_file(engine, region)
        x, y = batches[1]
        loss = engine(x, y)
        if region == "param":
            engine.backward(loss)
        punch_hole(path)
        fill(small_fs)
        with pytest.raises(AioError) as err:
            if region == "grad":
                engine.backward(loss)
            engine.step()
        assert err.value.errno == errno.ENOSPC and err.value.path == path
        assert "ENOSPC" in str(err.value) and path in str(err.value) and "free space" in str(err.value)
        assert_refuses_everything(engine, batches, f"AioError: .*{region}.swp.*ENOSPC")
    finally:
        engine.close()
    assert not os.path.exists(os.path.dirname(path))  # close removed the run's folder
    assert (small_fs / "keep.bin").read_bytes() == SENTINEL


# ---- a swap file cut short: the failure is inside the optimizer pipeline, or in a fetch ---------------
@pytest.mark.parametrize("region", ["exp_avg", "param"])
def test_truncated_swap_file_is_a_short_read_and_latches(tmp_path, batches, region):
    (tmp_path / "keep.bin").write_bytes(SENTINEL)
    engine = Engine(fresh_model(), own_param_file(tmp_path) if region == "param" else settings(tmp_path))
    try:
        train(engine, batches[:1])
        engine.run.optimizer.settle()  # the step's state writes left in flight land before the cut, not after
        path = swap_file(engine, region)
        os.truncate(path, 0)
        with pytest.raises(ShortTransferError) as err:
            train(engine, batches[1:2])  # param: the forward's first fetch; exp_avg: the step's first read
        assert err.value.path == path and err.value.op == "read" and path in str(err.value)
        assert_refuses_everything(engine, batches, f"ShortTransferError: .*{region}.swp")
    finally:
        engine.close()
    assert (tmp_path / "keep.bin").read_bytes() == SENTINEL


def test_error_inside_a_step_latches(tmp_path, batches, monkeypatch):
    """A step stopped midway (here the update of the second sub-group raises) leaves half the model
    stepped: the engine refuses to go on rather than train from that state."""
    calls = []
    real = optimizer_module.update_group

    def update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in the second sub-group")
        real(*args, **kwargs)

    engine = Engine(fresh_model(), settings(tmp_path))
    try:
        assert len(engine.run.groups) > 2
        monkeypatch.setattr(optimizer_module, "update_group", update)
        with pytest.raises(RuntimeError, match="injected"):
            train(engine, batches[:1])
        assert_refuses_everything(engine, batches, "RuntimeError: injected failure")
    finally:
        engine.close()


# ---- the swap files are deleted under the run ------------------------------------------------------
@pytest.mark.parametrize("what", ["nvme_path", "run folder"])
def test_deleted_swap_files_keep_training_exactly(tmp_path, batches, what, caplog):
    """The region files stay open for the run (memory/nvme_store.py): deleting them, or the whole
    nvme_path, changes nothing in the results; the run says once that the space returns at close."""
    want_losses, _ = plain_torch_run(batches)
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    engine = Engine(fresh_model(), settings(nvme))
    (manager,) = engine.run.managers
    folder = manager.store.folder
    try:
        losses = train(engine, batches[:2])
        shutil.rmtree(nvme if what == "nvme_path" else folder)
        losses += train(engine, batches[2:])
        assert not folder.exists()  # nothing is recreated by path
    finally:
        engine.close()  # and closing finds nothing to remove, without complaint
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses)) <= 1e-5
    warnings = [r.getMessage() for r in caplog.records if "were deleted while it runs" in r.getMessage()]
    assert len(warnings) == 1 and str(folder) in warnings[0] and "engine.close()" in warnings[0]


# ---- driving the engine wrongly ---------------------------------------------------------------------
def test_step_twice_after_one_backward(tmp_path, batches):
    engine = Engine(fresh_model(), settings(tmp_path))
    try:
        train(engine, batches[:1])
        with pytest.raises(UsageError, match="without a backward"):
            engine.step()
        train(engine, batches[1:2])  # the engine is still usable
    finally:
        engine.close()


@pytest.mark.parametrize("change", ["replaced", "removed"])
def test_parameter_replaced_or_removed_after_initialize(tmp_path, batches, change):
    model = fresh_model()
    engine = Engine(model, settings(tmp_path))
    try:
        if change == "replaced":
            model.head.weight = torch.nn.Parameter(torch.zeros(SPEC.vocab, SPEC.hidden))
        else:
            model.ln.bias = None
        name = "head.weight" if change == "replaced" else "ln.bias"
        with pytest.raises(UsageError, match=f"{change} after infinity.initialize: {name}"):
            engine(*batches[0])
    finally:
        engine.close()

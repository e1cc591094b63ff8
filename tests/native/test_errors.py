"""Every bad input raises its typed error, naming what is wrong and the fix; nothing on disk is lost."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

from infinity.config.aio import MAX_QUEUE_DEPTH, MAX_THREADS, AioConfig, Backend
from infinity.errors import AioError, AlignmentError, CapacityError, ConfigError, NvmePathError, ShortTransferError
from infinity.io import DirectPolicy, check_nvme_path, open_handle
from infinity.memory import HostBuffer


@pytest.mark.parametrize("value", [0, -4096, 1000, 4097])
def test_block_size_must_be_positive_multiple_of_4096(value):
    with pytest.raises(ConfigError) as err:
        AioConfig(block_size=value)
    assert err.value.keys == ("aio.block_size",)
    assert "multiple of 4096" in str(err.value)


@pytest.mark.parametrize("key", ["queue_depth", "intra_op_parallelism"])
def test_queue_depth_and_threads_at_least_one(key):
    with pytest.raises(ConfigError) as err:
        AioConfig(**{key: 0})
    assert err.value.keys == (f"aio.{key}",)


def test_thread_count_alias_and_string_booleans_take_effect(caplog):
    config = AioConfig.from_dict({"block_size": 262144, "queue_depth": 32, "thread_count": 2,
                                  "single_submit": "false", "overlap_events": "true"})
    assert (config.thread_count, config.single_submit, config.overlap_events) == (2, False, True)
    assert "thread_count is the older name" in caplog.text


def test_every_aio_problem_reported_at_once():
    with pytest.raises(ConfigError) as err:
        AioConfig.from_dict({"block_size": 100, "queue_deph": 8, "single_submit": "maybe"})
    assert set(err.value.keys) == {"aio.block_size", "aio.queue_deph", "aio.single_submit"}
    assert "did you mean 'queue_depth'" in str(err.value)


def test_unaligned_buffer_where_direct_is_required(tmp_path):
    with open_handle(AioConfig(backend=Backend.LIBAIO), direct=DirectPolicy.REQUIRE) as h:
        buf = HostBuffer(8192 + 1)
        with pytest.raises(AlignmentError) as err:
            h.pwrite(buf.tensor[1:], tmp_path / "a.bin")
    assert err.value.errno == errno.EINVAL
    assert "aligned to" in str(err.value) and "HostBuffer" in str(err.value)


@pytest.mark.parametrize("nbytes,shift,offset", [(1, 1, 0), (100, 8, 0), (4095, 1, 0), (512, 0, 1), (100, 0, 4097)])
def test_small_unaligned_request_where_direct_is_required(tmp_path, nbytes, shift, offset):
    # Shorter than one block, it would fit the buffered descriptor; REQUIRE refuses it all the same.
    path = tmp_path / "small.bin"
    path.write_bytes(os.urandom(3 * 4096))
    before = path.read_bytes()
    with open_handle(AioConfig(backend=Backend.LIBAIO), direct=DirectPolicy.REQUIRE) as h:
        view = HostBuffer(8192).tensor[shift:shift + nbytes]
        for move in (h.pread, h.pwrite):
            with pytest.raises(AlignmentError) as err:
                move(view, path, offset)
            assert err.value.errno == errno.EINVAL and str(path) in str(err.value)
        assert h.stats.requests == 0
        # Aligned address and offset: a short tail goes through the buffered descriptor, as documented.
        assert h.pread(HostBuffer(8192).tensor[:100], path, 4096) == 100
    assert path.read_bytes() == before


def test_reading_past_end_of_file_is_a_short_read(make_handle, tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(os.urandom(10000))
    with pytest.raises(ShortTransferError) as err:
        make_handle().pread(HostBuffer(16384).tensor, path)
    assert err.value.actual < err.value.expected
    assert str(path) in str(err.value) and "expected" in str(err.value)
    assert path.stat().st_size == 10000  # the file is untouched


def test_missing_file(make_handle, tmp_path):
    with pytest.raises(AioError) as err:
        make_handle().pread(HostBuffer(4096).tensor, tmp_path / "nope.bin")
    assert err.value.errno == errno.ENOENT
    assert "nope.bin" in str(err.value)


def test_io_setup_beyond_aio_max_nr_names_the_limit_file():
    """The engine's own EAGAIN, for a handle built past the config's events check (config.aio.events_problem)."""
    limit = int(open("/proc/sys/fs/aio-max-nr").read())
    if MAX_THREADS * MAX_QUEUE_DEPTH <= limit:
        pytest.skip(f"aio-max-nr {limit} holds the largest valid setting here")
    with pytest.raises(AioError) as err:
        open_handle(AioConfig(backend=Backend.LIBAIO, queue_depth=MAX_QUEUE_DEPTH, intra_op_parallelism=MAX_THREADS))
    assert "/proc/sys/fs/aio-max-nr" in str(err.value)
    assert err.value.op == "io_setup" and err.value.errno == errno.EAGAIN


def test_nvme_path_missing(tmp_path):
    with pytest.raises(NvmePathError, match="does not exist"):
        open_handle(AioConfig(), nvme_path=tmp_path / "absent")


def test_nvme_path_not_a_folder(tmp_path):
    (tmp_path / "file").write_bytes(b"keep me")
    with pytest.raises(NvmePathError, match="is not a folder"):
        check_nvme_path(tmp_path / "file")
    assert (tmp_path / "file").read_bytes() == b"keep me"


def test_nvme_path_not_writable(tmp_path):
    # root passes permission bits, so as root use a real folder that refuses new files to everyone.
    folder = "/sys" if os.geteuid() == 0 else str(tmp_path)
    if os.geteuid() != 0:
        os.chmod(folder, 0o500)
    try:
        with pytest.raises(NvmePathError, match="not writable"):
            check_nvme_path(folder)
    finally:
        if os.geteuid() != 0:
            os.chmod(folder, 0o700)


def test_nvme_path_without_room(tmp_path):
    with pytest.raises(CapacityError) as err:
        check_nvme_path(tmp_path, need_bytes=1 << 60)
    assert err.value.needed == 1 << 60 and "free space" in str(err.value)


@pytest.fixture
def no_direct_dir(tmp_path):
    """A real ramfs mount: a file system that refuses O_DIRECT (tmpfs takes it on kernels >= 6.6)."""
    folder = tmp_path / "ramfs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here ({mounted.stderr.strip()}); needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_file_system_refusing_o_direct_falls_back_to_posix(no_direct_dir, caplog):
    with open_handle(AioConfig(), nvme_path=no_direct_dir) as h:
        assert h.backend is Backend.POSIX
        data = os.urandom(10000)
        h.pwrite(bytearray(data), no_direct_dir / "f.bin")
        assert (no_direct_dir / "f.bin").read_bytes() == data
    assert "refuses O_DIRECT" in caplog.text


def test_libaio_on_a_file_system_refusing_o_direct(no_direct_dir):
    data = os.urandom(3 * 65536 + 5)
    with open_handle(AioConfig(backend=Backend.LIBAIO, block_size=65536)) as h:
        buf = HostBuffer(len(data))
        buf.numpy()[:] = list(data)
        h.pwrite(buf.tensor, no_direct_dir / "f.bin")
        out = HostBuffer(len(data))
        h.pread(out.tensor, no_direct_dir / "f.bin")
        assert h.stats.direct_bytes == 0
    assert out.numpy().tobytes() == data
    with open_handle(AioConfig(backend=Backend.LIBAIO), direct=DirectPolicy.REQUIRE) as h:
        with pytest.raises(AioError, match="refuses O_DIRECT"):
            h.pread(HostBuffer(4096).tensor, no_direct_dir / "f.bin")


def test_negative_offset(make_handle, tmp_path):
    with pytest.raises(AioError, match="offset must be a non-negative integer"):
        make_handle().pwrite(HostBuffer(4096).tensor, tmp_path / "x.bin", -1)


def test_closed_handle(make_handle, tmp_path):
    h = make_handle()
    h.close()
    with pytest.raises(AioError, match="closed"):
        h.pwrite(HostBuffer(4096).tensor, tmp_path / "x.bin")

"""Numbers that are NaN, infinite or past what torch and the native engine take, settings past aio's upper
bounds, and config files that are not UTF-8 JSON: each a ConfigError naming the key or the file, exit 2,
never a traceback (config check, infinity-estimate, infinity-train alike)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from infinity.cli import config as config_cli
from infinity.cli import estimate as estimate_cli
from infinity.config import Config
from infinity.config.aio import MAX_BLOCK_SIZE, MAX_QUEUE_DEPTH, MAX_THREADS, aio_events
from infinity.errors import ConfigError

NVME = '"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}'


def check(capsys, tmp_path, text: str | bytes) -> tuple[int, str]:
    path = tmp_path / "ds.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    status = config_cli.main(["check", str(path)])  # raises on a traceback
    return status, capsys.readouterr().err


# JSON as users (and tools) write it: Python's reader takes NaN, Infinity and 1e400 (as infinity).
@pytest.mark.parametrize("key,text", [
    ("aio.queue_depth", '{"aio": {"queue_depth": 1e30}}'),
    ("aio.queue_depth", '{"aio": {"queue_depth": 1e400}}'),
    ("aio.queue_depth", '{"aio": {"queue_depth": NaN}}'),
    ("aio.block_size", '{"aio": {"block_size": -Infinity}}'),
    ("train_micro_batch_size_per_gpu", '{"train_micro_batch_size_per_gpu": NaN}'),
    ("zero_optimization.offload_param.buffer_count",
     '{"zero_optimization": {"offload_param": {"buffer_count": 1e400}}}'),
    ("zero_optimization.sub_group_size", '{"zero_optimization": {"sub_group_size": 1e20}}'),
    ("gradient_clipping", '{"gradient_clipping": NaN}'),
    ("optimizer.params.lr", '{"optimizer": {"type": "AdamW", "params": {"lr": Infinity}}}'),
    ("optimizer.params.eps", '{"optimizer": {"type": "AdamW", "params": {"eps": 1e400}}}'),
])
def test_nan_infinite_and_huge_numbers_are_problems_naming_the_key(capsys, tmp_path, key, text):
    status, err = check(capsys, tmp_path, text)
    assert status == 2
    assert f"problem: {key}: must be" in err and "Traceback" not in err


@pytest.mark.parametrize("key,value,limit", [
    ("queue_depth", MAX_QUEUE_DEPTH + 1, MAX_QUEUE_DEPTH), ("queue_depth", 10 ** 15, MAX_QUEUE_DEPTH),
    ("intra_op_parallelism", 100_000, MAX_THREADS), ("thread_count", 100_000, MAX_THREADS),
    ("block_size", 2 * MAX_BLOCK_SIZE, MAX_BLOCK_SIZE)])
def test_aio_settings_past_their_upper_bound_are_refused_with_the_limit(capsys, tmp_path, key, value, limit):
    status, err = check(capsys, tmp_path, f'{{"aio": {{"{key}": {value}}}}}')
    assert status == 2
    name = "intra_op_parallelism" if key == "thread_count" else key
    assert f"problem: aio.{name}: must be at most {limit}" in err


def test_more_libaio_events_than_the_machine_has_free_is_refused_naming_the_limit(capsys, tmp_path):
    counts = aio_events()
    if counts is None:
        pytest.skip("/proc/sys/fs/aio-max-nr is not readable here")
    free = counts[0] - counts[1]
    if MAX_THREADS * MAX_QUEUE_DEPTH <= free:
        pytest.skip(f"this machine has {free} libaio events free, more than the largest valid setting takes")
    status, err = check(capsys, tmp_path, f'{{{NVME}, "aio": {{"intra_op_parallelism": {MAX_THREADS}, '
                                          f'"queue_depth": {MAX_QUEUE_DEPTH}}}}}')
    assert status == 2
    assert "problem: aio.intra_op_parallelism × aio.queue_depth:" in err
    assert "/proc/sys/fs/aio-max-nr" in err and "sysctl -w fs.aio-max-nr=" in err


def test_the_events_rule_only_counts_when_something_goes_to_nvme(capsys, tmp_path):
    status, _ = check(capsys, tmp_path, f'{{"train_micro_batch_size_per_gpu": 1, "aio": {{"intra_op_parallelism": '
                                        f'{MAX_THREADS}, "queue_depth": {MAX_QUEUE_DEPTH}}}}}')
    assert status == 0


def test_a_config_file_that_is_not_utf8_names_the_file(capsys, tmp_path):
    status, err = check(capsys, tmp_path, b'{"aio": {"queue_depth": 8}, "note": "caf\xe9"}')  # Latin-1
    assert status == 2
    assert f"problem: {tmp_path / 'ds.json'}: is not UTF-8 text (byte 0xe9 at offset 40" in err
    with pytest.raises(ConfigError, match="is not UTF-8"):
        Config.load(tmp_path / "ds.json")


@pytest.mark.parametrize("argv,flag", [(["--params", "nan", "--largest-layer", "1"], "--params"),
                                       (["--params", "1e400", "--largest-layer", "1"], "--params"),
                                       (["--params", "1e9", "--largest-layer", "inf"], "--largest-layer"),
                                       (["--params", "1e30", "--largest-layer", "1"], "--params"),
                                       (["--params", "1e9", "--largest-layer", "1", "--step-seconds", "nan"],
                                        "--step-seconds")])
def test_estimate_refuses_odd_numbers_naming_the_flag(capsys, argv, flag):
    assert estimate_cli.main(argv) == 2
    assert f"- {flag}: must be" in capsys.readouterr().err


@pytest.mark.parametrize("text,named", [(b'{"aio": {"queue_depth": 1e30}}', "aio.queue_depth"),
                                        (b'{"aio": {"block_size": NaN}}', "aio.block_size"),
                                        (b'\xff\xfe{"aio": {}}', "is not UTF-8 text")])
def test_train_refuses_them_with_exit_2_and_no_traceback(tmp_path, text, named):
    path = tmp_path / "ds.json"
    path.write_bytes(text)
    done = subprocess.run([sys.executable, "-m", "infinity.cli.train", "--config", str(path), "--steps", "1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr
    if named == "is not UTF-8 text":
        assert str(path) in done.stderr

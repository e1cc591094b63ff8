"""Output files a user names (--trace, --json, --plot, SVG): a symlink planted at the name is replaced by the
new file, never followed; a failed write leaves the name as it was and no temporary file."""
from __future__ import annotations

import os
import stat

import pytest

from infinity.outputs import replacing, write_output
from infinity.timeline import Timeline, Track

SECRET = b"the victim's own bytes\n"


@pytest.fixture
def planted(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(SECRET)
    link = tmp_path / "out" / "trace.json"
    link.parent.mkdir()
    link.symlink_to(victim)
    return link, victim


def test_a_symlink_at_the_name_is_replaced_never_followed(planted):
    link, victim = planted
    write_output(link, "{}")
    assert victim.read_bytes() == SECRET
    assert not link.is_symlink() and link.read_text() == "{}"
    assert os.listdir(link.parent) == ["trace.json"]


def test_the_timeline_of_infinity_train_trace_is_written_the_same_way(planted):
    link, victim = planted
    timeline = Timeline(enabled=True)
    with timeline.span("forward", Track.COMPUTE):
        pass
    timeline.write(link)
    assert victim.read_bytes() == SECRET and b"traceEvents" in link.read_bytes() and not link.is_symlink()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "run.json"
    out.write_text("old")
    with pytest.raises(RuntimeError), replacing(out) as f:
        f.write(b"half")
        raise RuntimeError("the disk filled up")
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["run.json"]


def test_the_mode_is_what_open_would_give(tmp_path):
    old = os.umask(0o027)
    try:
        write_output(tmp_path / "a.json", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640

"""checkpoint/files.exchange_in: a complete rank folder put in place over an earlier save of the same tag,
by an atomic exchange where the file system has one, by two renames where it has not."""
from __future__ import annotations

import pytest

from infinity.checkpoint import files


def folders(tmp_path):
    final = tmp_path / "tag" / "rank_0"
    new = files.saving_dir(final)
    new.mkdir(parents=True)
    (new / "manifest.json").write_text("new")
    return new, final


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_the_new_folder_replaces_an_earlier_save_and_nothing_else_is_left(tmp_path, monkeypatch, exchange):
    new, final = folders(tmp_path)
    final.mkdir()
    (final / "manifest.json").write_text("old")
    (final / "optimizer.safetensors").write_text("old state")
    if not exchange:  # a file system without RENAME_EXCHANGE
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    files.exchange_in(new, final)
    assert (final / "manifest.json").read_text() == "new" and not (final / "optimizer.safetensors").exists()
    assert [p.name for p in final.parent.iterdir()] == ["rank_0"]


def test_a_new_tag_is_renamed_into_place(tmp_path):
    new, final = folders(tmp_path)
    files.exchange_in(new, final)
    assert (final / "manifest.json").read_text() == "new" and not new.exists()


def test_leftovers_of_an_interrupted_save_are_removed(tmp_path):
    new, final = folders(tmp_path)
    old = final.with_name(".rank_0.old")
    old.mkdir()
    files.remove_leftovers(final)
    assert not new.exists() and not old.exists()

"""Every ```sh and ```python block of README.md and docs/*.md runs as written.

How a block runs:
- `sh` (and `bash`) blocks run with bash -e, `python` blocks with the project's Python, each in a fresh
  process, with the project's .venv/bin first on PATH, in an empty temporary folder outside the checkout
  ("from any folder"). Blocks of other languages, and plain ``` blocks (synopses, output, file layouts),
  are not run.
- Markers, an HTML comment on the line right before the block's fence:
    <!-- doc-test: skip (reason) -->      not run; the reason is required and shown by pytest -rs
    <!-- doc-test: from the checkout -->  run with the checkout as the working folder (scripts/main)
- Placeholders, and only these, are replaced: `/local_nvme` by a folder in the temporary one (on the
  disk that holds it), and the metrics port `9400` by a free port.
- Long commands are shortened only through these environment variables (the doc's text is unchanged),
  each added only when the command does not give that flag itself:
    INFINITY_DOC_TEST_TRAIN_ARGS  default "--steps 2"  (infinity-train, scripts/main)
    INFINITY_DOC_TEST_BENCH_ARGS  default "--io_size 16M"  (infinity-bench)
  Set one to an empty string to run those commands at full length.  (infinity-train and infinity-bench are
  small scripts first on PATH that exec the real ones, scripts/main a bash function.)
- KNOWN_FAILING lists blocks that fail as written, reported as xfail without running; it is empty, and
  should stay so: a block that cannot run here (a benchmark recipe of an hour) is marked skip in its doc.
- INFINITY_SKIP_PROMETHEUS=1 is set, so scripts/setup (run by scripts/main) never reaches for apt.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = {"sh": "sh", "bash": "sh", "python": "python"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
SKIP = re.compile(r"skip\s*\((.+)\)$")
BLOCK_TIMEOUT_S = 600
KNOWN_FAILING: dict[tuple[str, str], str] = {  # (doc, the block's first line): why it fails as written. Empty:
    # a block that cannot run here is marked skip in its doc, with the reason.
}
TRAIN_ARGS = os.environ.get("INFINITY_DOC_TEST_TRAIN_ARGS", "--steps 2")
BENCH_ARGS = os.environ.get("INFINITY_DOC_TEST_BENCH_ARGS", "--io_size 16M")


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence
    language: str  # "sh" or "python"
    code: str
    marker: str | None  # the doc-test marker's text, or None

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks_of(doc: Path) -> list[Block]:
    text = doc.read_text()
    found = []
    for match in FENCE.finditer(text):
        language = RUN_LANGUAGES.get(match.group(1))
        if language is None:
            continue
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        found.append(Block(doc, text.count("\n", 0, match.start()) + 1, language, match.group(2),
                           marker.group(1) if marker else None))
    return found


ALL_BLOCKS = [block for doc in DOCS for block in blocks_of(doc)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def substituted(code: str, nvme: Path) -> str:
    return re.sub(r"\b9400\b", str(free_port()), code.replace("/local_nvme", str(nvme)))


def shims(folder: Path) -> Path:
    """A folder, first on PATH, of scripts named infinity-train and infinity-bench that exec the real ones
    with the shortening arguments (see the module docstring); exec keeps the PID, so `cmd &` ... `kill $!`
    in a doc stops the real process."""
    folder.mkdir()
    real = ROOT / ".venv" / "bin"
    for name, flag, extra in (("infinity-train", "--steps", TRAIN_ARGS), ("infinity-bench", "--io_size", BENCH_ARGS)):
        script = folder / name
        script.write_text(f'#!/usr/bin/env bash\nfor a in "$@"; do case "$a" in {flag}|{flag}=*) '
                          f'exec {real / name} "$@";; esac; done\nexec {real / name} "$@" {extra}\n')
        script.chmod(0o755)
    return folder


def shell_prelude() -> str:
    """set -e, and scripts/main (a relative path, so no PATH shim) as a function adding TRAIN_ARGS."""
    return ('set -e\nscripts/main() { local a; for a in "$@"; do case "$a" in --steps|--steps=*) '
            f'command scripts/main "$@"; return;; esac; done; command scripts/main "$@" {TRAIN_ARGS}; }}\n')


def environment(shim_folder: Path) -> dict[str, str]:
    path = os.pathsep.join([str(shim_folder), str(ROOT / ".venv" / "bin"), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path,
           "INFINITY_SKIP_PROMETHEUS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return env


def test_blocks_are_found_and_every_skip_gives_a_reason():
    assert len(ALL_BLOCKS) > 10
    for block in ALL_BLOCKS:
        if block.marker is not None:
            assert block.marker == "from the checkout" or SKIP.match(block.marker), (block.id, block.marker)


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.id)
def test_doc_block_runs_as_written(block: Block, tmp_path: Path):
    skip = SKIP.match(block.marker or "")
    if skip:
        pytest.skip(f"{block.id}: {skip.group(1)}")
    known = KNOWN_FAILING.get((str(block.doc.relative_to(ROOT)), block.code.split("\n", 1)[0]))
    if known:
        pytest.xfail(f"{block.id}: {known}")  # not run: some would take an hour
    work = tmp_path / "work"
    nvme = tmp_path / "local_nvme"
    work.mkdir()
    nvme.mkdir()
    cwd = ROOT if block.marker == "from the checkout" else work
    code = substituted(block.code, nvme)
    if block.language == "sh":
        command = ["bash", "-c", shell_prelude() + code]
    else:
        command = [str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else sys.executable,
                   "-c", code]
    done = subprocess.run(command, cwd=cwd, env=environment(shims(tmp_path / "shims")), capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, (f"{block.id} failed (exit {done.returncode}):\n{code}\n--- stdout\n"
                                  f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")

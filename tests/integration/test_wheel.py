"""infinity as an installed package: the wheel builds (native engine and shipped configs inside), installs
into a fresh virtual environment, and the main job's first steps run from a folder outside the checkout.

Offline and quick (about 30 s here): the wheel is built with --no-build-isolation from a copy of the
source tree, and installed with --no-deps into a fresh venv (no system site-packages) that sees the
project's own .venv site-packages (torch and the other dependencies) through a .pth file.  That .venv
holds infinity as an editable install, but its finder is set up by a .pth of its own, which a path
added this way does not run: the fresh venv imports the wheel's infinity, and the test checks so.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ANYWHERE = shutil.ignore_patterns("*.egg-info", "__pycache__", "*.so", ".pytest_cache")
AT_THE_ROOT = {".git", ".venv", "build", "dist", "swap", "bench-out"}  # infinity/swap is source


def not_source(folder: str, names: list[str]) -> set[str]:
    """What a fresh clone would not hold: build outputs, the venv, run folders at the root."""
    return set(ANYWHERE(folder, names)) | (AT_THE_ROOT & set(names) if Path(folder) == ROOT else set())
SMALL = ["--steps", "2", "--hidden", "64", "--layers", "1", "--heads", "2", "--vocab", "512", "--seq", "32",
         "--batch", "2"]


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; its bin folder."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=not_source)
    if not (ROOT / "native").is_dir():
        pytest.skip("no native/ folder to build the wheel from")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(work / "dist"), str(source)], cwd=work)
    wheels = list((work / "dist").glob("infinity-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = work / "fresh"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    fresh_python = env_dir / "bin" / "python"
    fresh_site = Path(run([str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         cwd=work).stdout.strip())
    (fresh_site / "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([sys.executable, "-m", "pip", "--python", str(fresh_python), "install", "--no-deps", "--no-index", "-q",
         str(wheels[0])], cwd=work)
    return env_dir / "bin"


def test_wheel_holds_the_native_engine_and_the_shipped_configs(installed, tmp_path):
    code = ("import infinity, infinity._native._aio, infinity.config.shipped as s; "
            "print(infinity.__file__); print(','.join(s.names()))")
    out = run([str(installed / "python"), "-c", code], cwd=tmp_path).stdout.split("\n")
    assert out[0].startswith(str(installed.parent)), out[0]  # the wheel's copy, not the checkout
    assert out[1] == "cpu-offload,hf-zero3-nvme,nvme-local"


def test_installed_infinity_train_runs_the_main_job_from_another_folder(installed, tmp_path):
    """The README's first command as an installed package: the default config ships with it, and the
    missing ./swap is created."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{installed}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    done = run(["infinity-train", "--nvme_path", "swap", *SMALL], cwd=tmp_path, env=env)
    assert "2 steps" in done.stdout, done.stdout
    assert (tmp_path / "swap").is_dir()
    done = run(["infinity-config", "check", "nvme-local"], cwd=tmp_path, env=env)
    assert '"valid": true' in done.stdout

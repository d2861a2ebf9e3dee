"""The package as a user installs it: the wheel built from a clean clone of the committed HEAD,
installed non-editable into a fresh venv, runs `lgt demo` to a published release.

`make` installs editable, so a file missing from the wheel (prompt templates, the sample, the
lineage SQL) only shows up here. The clone holds only what is committed: an untracked or
uncommitted file cannot make this pass. One clone, wheel and venv per test session.

    pytest -m wheel tests/test_wheel.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Installed:
    clone: Path
    wheel: Path
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's env minus anything that could import the checkout or pick settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LGT_SQL_DIR")
        and not k.startswith(("LGT_", "AIRFLOW"))
    }
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert done.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {done.returncode}\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    )
    return done


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    env = _clean_env()
    # 1. A clone of the committed HEAD (works with a detached HEAD too, as in CI).
    head = _run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], 30).stdout.strip()
    clone = base / "clone"
    _run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(clone)], 120)
    _run(["git", "-C", str(clone), "checkout", "--quiet", head], 60)
    # 2. The wheel, built the way the Dockerfile's `pip install .` builds it (isolated build).
    dist = base / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(clone)],
        300,
        env=env,
    )
    (wheel,) = dist.glob("lgt_etl-*.whl")
    # 3. A fresh venv (no system site-packages), the wheel installed non-editable, pinned.
    # The venv gets no pip of its own: this interpreter's pip installs into it (`--python`),
    # which skips ensurepip; --no-compile skips byte-compiling the dependencies (~1 min less).
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], 120, env=env)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-compile",
            "--constraint",
            str(clone / "constraints" / "py311.txt"),
            str(wheel),
        ],
        600,
        env=env,
        cwd=base,
    )
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    return Installed(clone=clone, wheel=wheel, venv=venv)


def _package_files(clone: Path) -> set[str]:
    """Every non-Python file under lgt_ops/ in the clone, plus sql/ as lgt_ops/sql/."""
    want = {
        p.relative_to(clone).as_posix()
        for p in (clone / "lgt_ops").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    want |= {
        "lgt_ops/" + p.relative_to(clone).as_posix()
        for p in (clone / "sql").rglob("*")
        if p.is_file()
    }
    return want


def test_wheel_carries_every_package_file(installed: Installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    want = _package_files(installed.clone)
    assert any(n.endswith(".prompt") for n in want) and any("migrations/" in n for n in want)
    missing = sorted(want - names)
    assert not missing, f"files under lgt_ops/ (or sql/) missing from the wheel: {missing}"
    # Nothing of the build machine leaks in.
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_installed_demo_publishes_a_release(installed: Installed, tmp_path: Path):
    data = tmp_path / "data"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = _clean_env(LGT_DATA_DIR=str(data))
    py = str(installed.bin / "python")
    # The package is imported from the venv, and its SQL is the copy inside it.
    where = _run(
        [py, "-c", "import lgt_ops.db.migrate as m; print(m.__file__); print(m.sql_dir())"],
        60,
        env=env,
        cwd=elsewhere,
    ).stdout.split()
    site = installed.venv / "lib"
    assert all(Path(p).is_relative_to(site) for p in where), where

    demo = _run([str(installed.bin / "lgt"), "demo"], 600, env=env, cwd=elsewhere)
    m = re.search(r"^release (\S+)\s+\(SIMULATED", demo.stdout, re.M)
    assert m, demo.stdout[-3000:]
    release_id = m.group(1)
    assert release_id.startswith("lgt-demo/")
    loc = re.search(r"^\s+location: file://(\S+)$", demo.stdout, re.M)
    assert loc, demo.stdout[-3000:]
    release_dir = Path(loc.group(1))
    assert release_dir.is_relative_to(data), (release_dir, data)
    manifest = json.loads((release_dir / "manifest.json").read_text())
    assert manifest["release_id"] == release_id and manifest["simulated"] is True
    assert manifest["counts"]["images"] > 0, manifest["counts"]
    rows = {name: split["rows"] for name, split in manifest["splits"].items()}
    assert rows and all(n > 0 for n in rows.values()), rows
    for split in manifest["splits"].values():
        for f in split["files"]:
            assert (release_dir / f["path"]).is_file(), f
    # The installed CLI re-hashes every file of the release against its manifest.
    verify = _run(
        [str(installed.bin / "lgt"), "release", "verify", release_id], 120, env=env, cwd=elsewhere
    )
    assert verify.stdout.strip().endswith(": ok"), verify.stdout
    assert not (elsewhere / ".lgt").exists(), "the demo wrote outside LGT_DATA_DIR"

"""Test inputs: the bundled sample and small generated images."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "lgt_ops" / "sample"


def run_demo(data_dir: Path, cwd: Path | None = None) -> str:
    """`lgt demo` in a subprocess on embedded defaults under `data_dir`; its stdout."""
    env = {**os.environ, "LGT_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)}
    for var in [v for v in env if v.startswith(("LGT_DATABASE", "LGT_STORE"))]:
        del env[var]
    return subprocess.run(
        [sys.executable, "-m", "lgt_ops.cli", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        cwd=cwd,
    ).stdout


def jpeg(w: int, h: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def upload_sample(store, prefix: str = "sources/sample/") -> None:  # noqa: ANN001
    from lgt_ops.demo import upload_sample as upload

    upload(store, prefix)


def new_photos(store, prefix: str, names: tuple[str, ...] = ("chelsea.jpg", "coffee.jpg")):  # noqa: ANN001, ANN201
    """New images for a refresh: mirrored copies of sample photos, with no metadata (so the
    annotate stage writes their caption and boxes). Returns their sha256 image ids."""
    import hashlib

    ids = set()
    for name in names:
        with Image.open(SAMPLE / "images" / name) as im:
            buf = io.BytesIO()
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, "JPEG", quality=92)
        data = buf.getvalue()
        store.put(f"{prefix}mirrored-{name}", data)
        ids.add(hashlib.sha256(data).hexdigest())
    return ids

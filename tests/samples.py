"""Test inputs: the bundled sample and small generated images."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

SAMPLE = Path(__file__).resolve().parents[1] / "lgt_ops" / "sample"


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

"""Bounding boxes: one canonical convention (absolute pixels x0,y0,x1,y1) from several."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lgt_ops.reasons import IngestReason, Rejected

# format -> the four numbers it expects (named in errors, so a producer can fix its file)
LAYOUTS = {
    "xyxy": "[x0, y0, x1, y1] in pixels",
    "xywh": "[x, y, width, height] in pixels",
    "xyxy_norm": "[x0, y0, x1, y1] in 0..1",
    "xywh_norm": "[x, y, width, height] in 0..1",
    "cxcywh_norm": "[cx, cy, width, height] in 0..1",
}
BOX_FORMATS = tuple(LAYOUTS)


def _number(v: Any) -> float | None:
    """A finite JSON number as float; None for NaN, inf, bools, strings and anything else."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # an integer too large for a float
        return None
    return f if math.isfinite(f) else None


def to_xyxy(
    box: Any, fmt: str, width: int, height: int, *, field: str = "box"
) -> tuple[float, ...]:
    """Convert `box` from `fmt` to absolute x0,y0,x1,y1 (not yet validated). `field` is the
    name the box came under, for the error message."""
    if fmt not in BOX_FORMATS:
        raise Rejected(IngestReason.BOX_FORMAT_UNKNOWN, f"box_format {fmt!r} not in {BOX_FORMATS}")
    expected = f"'{field}' must be 4 finite numbers {LAYOUTS[fmt]} (box_format {fmt})"
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise Rejected(IngestReason.BOX_MALFORMED, f"{expected}, got {box!r}"[:300])
    nums = [_number(v) for v in box]
    if any(v is None for v in nums):
        raise Rejected(IngestReason.BOX_MALFORMED, f"{expected}, got {box!r}"[:300])
    a, b, c, d = (float(v) for v in nums)  # type: ignore[arg-type]
    if fmt == "xyxy":
        return a, b, c, d
    if fmt == "xywh":
        return a, b, a + c, b + d
    if fmt == "xyxy_norm":
        return a * width, b * height, c * width, d * height
    if fmt == "xywh_norm":
        return a * width, b * height, (a + c) * width, (b + d) * height
    cx, cy, w, h = a * width, b * height, c * width, d * height  # cxcywh_norm
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def validate(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """A box inside the image with positive size; up to 2 px of overhang is clipped."""
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box):  # e.g. a huge normalised value times the width
        raise Rejected(IngestReason.BOX_MALFORMED, f"box {list(box)} is not finite")
    slack = 2.0
    if x1 <= x0 or y1 <= y0:
        raise Rejected(IngestReason.BOX_EMPTY, f"box {list(box)} has no area")
    if x0 < -slack or y0 < -slack or x1 > width + slack or y1 > height + slack:
        raise Rejected(
            IngestReason.BOX_OUTSIDE_IMAGE,
            f"box {[round(v, 1) for v in box]} outside {width}x{height}",
        )
    clipped = (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))
    return tuple(round(v, 2) for v in clipped)  # type: ignore[return-value]


def area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])

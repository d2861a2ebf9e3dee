"""Bounding boxes: one canonical convention (absolute pixels x0,y0,x1,y1) from several."""

from __future__ import annotations

from collections.abc import Sequence

BOX_FORMATS = ("xyxy", "xywh", "xyxy_norm", "xywh_norm", "cxcywh_norm")


class BoxRejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def to_xyxy(box: Sequence[float], fmt: str, width: int, height: int) -> tuple[float, ...]:
    """Convert `box` from `fmt` to absolute x0,y0,x1,y1 (not yet validated)."""
    if fmt not in BOX_FORMATS:
        raise BoxRejected("box_format_unknown", f"box_format {fmt!r} not in {BOX_FORMATS}")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise BoxRejected("box_malformed", f"expected 4 numbers, got {box!r}")
    try:
        a, b, c, d = (float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise BoxRejected("box_malformed", f"non-numeric box {box!r}") from exc
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
    slack = 2.0
    if x1 <= x0 or y1 <= y0:
        raise BoxRejected("box_empty", f"box {list(box)} has no area")
    if x0 < -slack or y0 < -slack or x1 > width + slack or y1 > height + slack:
        raise BoxRejected(
            "box_outside_image", f"box {[round(v, 1) for v in box]} outside {width}x{height}"
        )
    clipped = (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))
    return tuple(round(v, 2) for v in clipped)  # type: ignore[return-value]


def area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0

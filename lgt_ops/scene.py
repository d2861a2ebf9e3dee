"""The image's metadata as prose for the text-only reasoner: what it would see, in words.

The expansion prompt used to hand the reasoner object ids and pixel boxes, and the reasoner
copied them into its thinking ("object c14", "[84, 30, 592, 392]"). Here every object
becomes words a viewer would use: where it is (left/centre/right, top/middle/bottom), how big
it looks, how many there are, and how neighbours relate (left of, above). No ids, no
coordinates, no digits; counts are spelled out.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lgt_ops.annotations import ImageContext

_COUNTS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_RELATIONS = 12  # neighbour relations listed; enough for the questions, short for the prompt


def count_word(n: int) -> str:
    return _COUNTS[n] if 0 <= n < len(_COUNTS) else "many"


def plural(label: str, n: int) -> str:
    if n == 1 or label.endswith("s"):
        return label
    return (
        label[:-1] + "ies" if label.endswith("y") and label[-2:-1] not in "aeiou" else label + "s"
    )


def _where(box: list[float], w: float, h: float) -> str:
    cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
    col = "on the left" if cx < 1 / 3 else "on the right" if cx > 2 / 3 else "in the centre"
    row = "near the top" if cy < 1 / 3 else "near the bottom" if cy > 2 / 3 else ""
    return f"{col}, {row}" if row else col


def _size(box: list[float], w: float, h: float) -> str:
    share = max(0.0, (box[2] - box[0]) * (box[3] - box[1])) / max(1.0, w * h)
    if share < 0.01:
        return "tiny"
    if share < 0.05:
        return "small"
    if share < 0.2:
        return "medium-sized"
    if share < 0.5:
        return "large"
    return "filling most of the view"


def _relation(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    ab, bb = a["box"], b["box"]
    if ab[2] <= bb[0]:
        return f"the {a['label']} is left of the {b['label']}"
    if bb[2] <= ab[0]:
        return f"the {a['label']} is right of the {b['label']}"
    if ab[3] <= bb[1]:
        return f"the {a['label']} is above the {b['label']}"
    if bb[3] <= ab[1]:
        return f"the {a['label']} is below the {b['label']}"
    return f"the {a['label']} overlaps the {b['label']}"


def prose(ctx: ImageContext) -> str:
    """Caption, objects and their relations in words (see the module doc)."""
    w, h = float(ctx.width or 1), float(ctx.height or 1)
    objs = [o for o in ctx.objects or () if o.get("label") and len(o.get("box") or ()) == 4]
    parts = []
    if ctx.caption:
        parts.append(f"Overall: {ctx.caption.strip()}")
    if objs:
        counts = Counter(o["label"] for o in objs)
        lines = [f"- {count_word(n)} {plural(label, n)}" for label, n in sorted(counts.items())]
        parts.append("What is in view:\n" + "\n".join(lines))
        where = [f"- a {_size(o['box'], w, h)} {o['label']} {_where(o['box'], w, h)}" for o in objs]
        parts.append("Where things are:\n" + "\n".join(where))
        unique = sorted((o for o in objs if counts[o["label"]] == 1), key=lambda o: o["box"][0])
        rel = [r for a, b in zip(unique, unique[1:], strict=False) if (r := _relation(a, b))]
        if rel:
            parts.append("How they relate:\n" + "\n".join(f"- {r}" for r in rel[:MAX_RELATIONS]))
    return "\n\n".join(parts) or "An image (nothing more is known about it)."

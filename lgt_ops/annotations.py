"""The caption and objects a stage should use for an image.

Metadata that came with the image wins (the manifest, then a COCO file); a model's
annotation from the annotate stage fills what is missing. Each source row points at the
annotation rows its current metadata produced, so an edited manifest takes effect and a
reverted one goes back, without guessing from timestamps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from lgt_ops.db.repo import select_in
from lgt_ops.ids import content_id


def context_input_id(image_id: str, caption_id: str | None, objects_id: str | None) -> str:
    """Identity of what a question writer sees: changes when an annotation changes."""
    return content_id("image-context", image_id, caption_id, objects_id)


@dataclass(frozen=True)
class ContextIds:
    """An image's context by its annotation ids only: what finds the questions written
    for it (their item ids), without reading or parsing the annotations."""

    image_id: str
    caption_id: str | None
    objects_id: str | None

    @property
    def input_id(self) -> str:
        return context_input_id(self.image_id, self.caption_id, self.objects_id)


@dataclass(frozen=True)
class ImageContext:
    image_id: str
    width: int
    height: int
    caption: str | None
    caption_id: str | None
    objects: tuple[dict[str, Any], ...] | None
    objects_id: str | None

    @property
    def input_id(self) -> str:
        """Identity of what a question writer sees: changes when an annotation changes."""
        return context_input_id(self.image_id, self.caption_id, self.objects_id)

    def object_ids(self) -> set[str]:
        return {o["id"] for o in self.objects or ()}

    def objects_text(self) -> str:
        return "\n".join(
            f"{o['id']}: {o['label']} [{', '.join(str(round(v)) for v in o['box'])}]"
            for o in self.objects or ()
        )

    def description(self) -> str:
        """Caption and objects as text, given to text-only models in place of pixels."""
        parts = [f"Image size: {self.width} x {self.height} pixels."]
        if self.caption:
            parts.append(f"Image description: {self.caption}")
        if self.objects:
            parts.append("Objects (id: label [x0, y0, x1, y1]):\n" + self.objects_text())
        return "\n\n".join(parts)


def _chosen(
    conn: Connection, ids: list[str], model_fingerprint: str | None
) -> dict[str, dict[str, str]]:
    """image_id -> {kind: annotation_id} of the annotations its context uses."""
    chosen: dict[str, dict[str, str]] = {i: {} for i in ids}
    for r in select_in(
        conn,
        "SELECT image_id, caption_annotation_id, objects_annotation_id FROM sources"
        " WHERE status = 'ok' AND image_id IN :ids ORDER BY bucket, key",
        ids,
    ):
        pick = chosen[r.image_id]
        if r.caption_annotation_id and "caption" not in pick:
            pick["caption"] = r.caption_annotation_id
        if r.objects_annotation_id and "objects" not in pick:
            pick["objects"] = r.objects_annotation_id
    if model_fingerprint is not None:
        for r in select_in(
            conn,
            "SELECT image_id, kind, annotation_id FROM annotations WHERE source = 'model'"
            " AND fingerprint = :fp AND image_id IN :ids ORDER BY annotation_id",
            ids,
            fp=model_fingerprint,
        ):
            chosen[r.image_id].setdefault(r.kind, r.annotation_id)
    return chosen


def current_ids(
    conn: Connection, images: list[Any], model_fingerprint: str | None = None
) -> dict[str, ContextIds]:
    """ContextIds for each row of `images` (rows with image_id): the same annotation
    choice as `current`, for stages that only look questions up."""
    chosen = _chosen(conn, [r.image_id for r in images], model_fingerprint)
    return {
        r.image_id: ContextIds(
            r.image_id, chosen[r.image_id].get("caption"), chosen[r.image_id].get("objects")
        )
        for r in images
    }


def current(
    conn: Connection, images: list[Any], model_fingerprint: str | None = None
) -> dict[str, ImageContext]:
    """ImageContext for each row of `images` (rows with image_id, width, height)."""
    chosen = _chosen(conn, [r.image_id for r in images], model_fingerprint)
    ann_ids = [a for pick in chosen.values() for a in pick.values()]
    contents = {
        r.annotation_id: json.loads(r.content)
        for r in select_in(
            conn,
            "SELECT annotation_id, content FROM annotations WHERE annotation_id IN :ids",
            ann_ids,
        )
    }
    out = {}
    for r in images:
        pick = chosen[r.image_id]
        cap_id, obj_id = pick.get("caption"), pick.get("objects")
        out[r.image_id] = ImageContext(
            image_id=r.image_id,
            width=r.width,
            height=r.height,
            caption=contents[cap_id]["caption"] if cap_id else None,
            caption_id=cap_id,
            objects=tuple(contents[obj_id]["objects"]) if obj_id else None,
            objects_id=obj_id,
        )
    return out

"""Annotation rows from the metadata that came with an image (a JSONL manifest or a COCO file).

Ingest records a caption and the objects of each image as `annotations` rows; every object is
checked (label, unique id, a finite box inside the image, in a known convention) and a bad one
is rejected with its reason while the rest of the image's objects are kept. The annotate stage
writes the model's captions and objects as the same rows (`annotation_row`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lgt_ops import boxes, registry
from lgt_ops.db.repo import dumps
from lgt_ops.ids import content_id
from lgt_ops.images import ImageFacts
from lgt_ops.reasons import IngestReason as R
from lgt_ops.reasons import Rejected
from lgt_ops.stages.base import StageEnv, StageStats, rejection

STAGE = registry.Ingest.name


def _box_of(obj: dict[str, Any], objects_source: str | None) -> tuple[Any, str]:
    """The box and the field it came under: `box`, or `bbox` (the COCO habit) as an alias.
    COCO files spell it `bbox`, so errors about their boxes name that field."""
    if "box" in obj and "bbox" in obj and obj["box"] != obj["bbox"]:
        raise Rejected(R.BOX_MALFORMED, "'box' and 'bbox' disagree; give one")
    value = obj["box"] if "box" in obj else obj.get("bbox")
    alias = objects_source == "coco" or ("bbox" in obj and "box" not in obj)
    return value, "bbox" if alias else "box"


def manifest_annotations(
    env: StageEnv,
    fp: str,
    entry: dict[str, Any],
    facts: ImageFacts,
    rejections: list[dict[str, Any]],
    stats: StageStats,
) -> Iterator[dict[str, Any]]:
    meta = entry["metadata"]
    if not meta:
        return
    ref = entry["key"]
    if meta.get("caption"):
        content = {"caption": meta["caption"]}
        yield annotation_row(env, facts.image_id, "caption", "manifest", ref, content, fp)
    if meta.get("objects") is None:
        return
    objects, seen = [], set()
    for n, obj in enumerate(meta["objects"], start=1):
        oid = str(obj.get("id") or f"o{n}") if isinstance(obj, dict) else f"o{n}"
        try:
            if not isinstance(obj, dict) or not str(obj.get("label") or "").strip():
                raise Rejected(R.OBJECT_LABEL_MISSING, f"object {obj!r}"[:200])
            if oid in seen:
                raise Rejected(R.DUPLICATE_OBJECT_ID, f"id {oid} used twice")
            raw, name = _box_of(obj, meta.get("objects_source"))
            fmt = meta.get("box_format", "xyxy")
            xyxy = boxes.to_xyxy(raw, fmt, facts.width, facts.height, field=name)
            box = boxes.validate(xyxy, facts.width, facts.height)
        except Rejected as exc:
            stats.rejected_by_reason[exc.reason] += 1
            rejections.append(
                rejection(
                    env,
                    STAGE,
                    fp,
                    "object",
                    f"{ref}#{oid}",
                    exc.reason,
                    exc.detail,
                    image_id=facts.image_id,
                )
            )
            continue
        seen.add(oid)
        item = {"id": oid, "label": str(obj["label"]).strip().lower(), "box": list(box)}
        synonyms = _synonyms(obj.get("synonyms"))
        if synonyms:  # other names of the object (a composed chain must not use them either)
            item["synonyms"] = synonyms
        objects.append(item)
    if objects:
        content = {"objects": objects, "source_box_format": meta.get("box_format", "xyxy")}
        source = meta.get("objects_source") or "manifest"
        yield annotation_row(env, facts.image_id, "objects", source, ref, content, fp)


def _synonyms(value: Any) -> list[str]:
    """An object's `synonyms` as given: a list of names, lower-cased; anything else ignored."""
    if not isinstance(value, list):
        return []
    names = (" ".join(v.lower().split()) for v in value if isinstance(v, str))
    return list(dict.fromkeys(n for n in names if n))


def annotation_row(
    env: StageEnv,
    image_id: str,
    kind: str,
    source: str,
    source_ref: str,
    content: dict[str, Any],
    fp: str,
    request_key: str | None = None,
) -> dict[str, Any]:
    return {
        "annotation_id": content_id("annotation", image_id, kind, source, content),
        "image_id": image_id,
        "kind": kind,
        "source": source,
        "source_ref": source_ref,
        "request_key": request_key,
        "content": dumps(content),
        "fingerprint": fp,
        "run_id": env.run.run_id,
    }

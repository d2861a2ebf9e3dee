"""Image metadata that arrives with the images: JSONL manifests and COCO detection files.

Under a source prefix every `*.jsonl` file is a manifest (one object per line:
`{"key", "caption", "objects": [{"id", "label", "box"}], "box_format", ...}`) and every
`*.json` file with `images` and `annotations` is a COCO detection file. Keys are relative to
the folder of the file that names them. Problems are returned with a reason, never raised,
so one bad line costs one line.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from lgt_ops.boxes import BOX_FORMATS

METADATA_SUFFIXES = (".jsonl", ".json")


def is_metadata(key: str) -> bool:
    return key.lower().endswith(METADATA_SUFFIXES)


@dataclass(frozen=True)
class Problem:
    item_ref: str
    reason: str
    detail: str


@dataclass
class Metadata:
    """What the metadata files say about one image key."""

    key: str
    caption: str | None = None
    objects: list[dict[str, Any]] | None = None
    box_format: str = "xyxy"
    objects_source: str | None = None  # manifest | coco
    origin: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "caption": self.caption,
            "objects": self.objects,
            "box_format": self.box_format,
            "objects_source": self.objects_source,
            "origin": self.origin,
            "extra": self.extra,
        }


def _resolve(meta_key: str, rel: str) -> str | None:
    """The key `rel` names, relative to the metadata file's folder; None if it leaves it."""
    base = posixpath.dirname(meta_key)
    full = posixpath.normpath(posixpath.join(base, rel.lstrip("/")))
    inside = not base or full.startswith(base + "/")
    return full if inside and not full.startswith("..") and full != "." else None


def parse_jsonl(meta_key: str, data: bytes) -> tuple[list[Metadata], list[Problem]]:
    out: list[Metadata] = []
    problems: list[Problem] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [Problem(meta_key, "manifest_not_utf8", str(exc))]
    for lineno, line in enumerate(text.splitlines(), start=1):
        ref = f"{meta_key}:{lineno}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(ref, "manifest_malformed", f"not JSON: {exc}"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("key"), str) or not row["key"]:
            problems.append(Problem(ref, "manifest_malformed", "a line needs a string 'key'"))
            continue
        key = _resolve(meta_key, row["key"])
        if key is None:
            problems.append(
                Problem(ref, "manifest_bad_key", f"key {row['key']!r} escapes the prefix")
            )
            continue
        caption = row.get("caption")
        objects = row.get("objects")
        fmt = row.get("box_format", "xyxy")
        if caption is not None and not isinstance(caption, str):
            problems.append(Problem(ref, "manifest_malformed", "'caption' must be a string"))
            caption = None
        if objects is not None and not isinstance(objects, list):
            problems.append(Problem(ref, "manifest_malformed", "'objects' must be a list"))
            objects = None
        if fmt not in BOX_FORMATS:
            problems.append(Problem(ref, "box_format_unknown", f"box_format {fmt!r}"))
            objects = None
        extra = {
            k: v for k, v in row.items() if k not in ("key", "caption", "objects", "box_format")
        }
        out.append(
            Metadata(
                key=key,
                caption=caption.strip() if caption and caption.strip() else None,
                objects=objects,
                box_format=fmt,
                objects_source="manifest" if objects is not None else None,
                origin={"manifest": ref},
                extra=extra,
            )
        )
    return out, problems


def parse_coco(meta_key: str, data: bytes) -> tuple[list[Metadata], list[Problem]]:
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [], [Problem(meta_key, "coco_malformed", f"not JSON: {exc}")]
    if not isinstance(doc, dict) or not {"images", "annotations"} <= doc.keys():
        return [], [Problem(meta_key, "coco_malformed", "needs 'images' and 'annotations'")]
    cats = {c.get("id"): c.get("name") for c in doc.get("categories", []) if isinstance(c, dict)}
    by_image: dict[Any, Metadata] = {}
    problems: list[Problem] = []
    for img in doc["images"]:
        key = _resolve(meta_key, str(img.get("file_name", ""))) if isinstance(img, dict) else None
        if key is None:
            problems.append(Problem(meta_key, "coco_malformed", f"bad image entry {img!r}"[:200]))
            continue
        by_image[img.get("id")] = Metadata(
            key=key, objects=[], box_format="xywh", objects_source="coco", origin={"coco": meta_key}
        )
    for ann in doc["annotations"]:
        meta = by_image.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if meta is None:
            problems.append(
                Problem(meta_key, "coco_malformed", f"annotation for unknown image {ann!r}"[:200])
            )
            continue
        label = cats.get(ann.get("category_id"))
        if not label:
            problems.append(
                Problem(f"{meta_key}#{ann.get('id')}", "coco_malformed", "unknown category_id")
            )
            continue
        assert meta.objects is not None
        meta.objects.append({"id": f"c{ann.get('id')}", "label": label, "box": ann.get("bbox")})
    return list(by_image.values()), problems


def parse(meta_key: str, data: bytes) -> tuple[list[Metadata], list[Problem]]:
    if meta_key.lower().endswith(".jsonl"):
        return parse_jsonl(meta_key, data)
    return parse_coco(meta_key, data)


def merge(parsed: list[Metadata]) -> tuple[dict[str, Metadata], list[Problem]]:
    """One Metadata per key: the manifest's caption and objects, COCO objects as a fallback.

    `parsed` is in metadata-file key order, so the first file to describe a key wins and a
    later duplicate is reported.
    """
    merged: dict[str, Metadata] = {}
    problems: list[Problem] = []
    for meta in parsed:
        have = merged.get(meta.key)
        if have is None:
            merged[meta.key] = meta
            continue
        if "manifest" in meta.origin and "manifest" in have.origin:
            problems.append(
                Problem(
                    meta.origin["manifest"],
                    "manifest_duplicate_key",
                    f"{meta.key} already described at {have.origin['manifest']}",
                )
            )
            continue
        if have.caption is None and meta.caption is not None:
            have.caption = meta.caption
        if have.objects is None and meta.objects is not None:
            have.objects, have.box_format = meta.objects, meta.box_format
            have.objects_source = meta.objects_source
        have.origin.update(meta.origin)
        for k, v in meta.extra.items():
            have.extra.setdefault(k, v)
    return merged, problems
